"""Evaluate a checkpoint with mmengine, as mmseg's tools/test.py."""
import argparse

from mmengine.config import DictAction

from mmrepvgg.cli import run_cli
from mmrepvgg.runner import build_runner, load_config, local_rank_to_env


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--work-dir', help='the dir to save the evaluation metrics')
    parser.add_argument(
        '--out', help='the dir to save the predicted label maps')
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
    cfg.load_from = args.checkpoint
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    build_runner(cfg).test()


if __name__ == '__main__':
    run_cli(main)
