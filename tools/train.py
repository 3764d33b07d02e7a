"""Train a segmentor or detector with mmengine, as mmseg's tools/train.py.

Works with one process, torchrun (tools/dist_train.sh) and Slurm
(tools/slurm_train.sh); on a machine without CUDA the distributed launch
falls back to the gloo backend.
"""
import argparse

from mmengine.config import DictAction

from mmrepvgg.cli import run_cli
from mmrepvgg.runner import (build_runner, enable_amp, load_config,
                             local_rank_to_env)


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='train config file path')
    parser.add_argument('--work-dir', help='the dir to save logs and models')
    parser.add_argument(
        '--resume',
        action='store_true',
        help='resume from the latest checkpoint in the work dir')
    parser.add_argument(
        '--amp', action='store_true', help='enable mixed precision training')
    parser.add_argument(
        '--cfg-options',
        nargs='+',
        action=DictAction,
        help='override settings of the config, as key=value pairs')
    parser.add_argument(
        '--launcher',
        choices=['none', 'pytorch', 'slurm', 'mpi'],
        default='none',
        help='job launcher')
    parser.add_argument('--local_rank', '--local-rank', type=int, default=0)
    return parser.parse_args()


def main():
    args = parse_args()
    local_rank_to_env(args.local_rank)
    cfg = load_config(args.config, args.work_dir, args.cfg_options,
                      args.launcher)
    if args.amp:
        enable_amp(cfg)
    cfg.resume = args.resume
    build_runner(cfg).train()


if __name__ == '__main__':
    run_cli(main)
