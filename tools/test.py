"""Evaluate a checkpoint with mmengine, as mmseg's tools/test.py."""
import argparse

from mmrepvgg.checkpoint import load_checkpoint_file
from mmrepvgg.cli import run_cli
from mmrepvgg.runner import (add_launch_arguments, build_runner,
                             load_launch_config)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='test config file path')
    parser.add_argument('checkpoint', help='checkpoint file')
    parser.add_argument(
        '--out', help='the dir to save the predicted label maps')
    args = add_launch_arguments(parser).parse_args()
    cfg = load_launch_config(args)
    # Refuse a missing, corrupt or unsafe file in one line, before the
    # Runner reads it.
    load_checkpoint_file(args.checkpoint)
    cfg.load_from = args.checkpoint
    if args.out is not None:
        cfg.test_evaluator['output_dir'] = args.out
        cfg.test_evaluator['keep_results'] = True
    build_runner(cfg).test()


if __name__ == '__main__':
    run_cli(main)
