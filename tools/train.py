"""Train a segmentor or detector with mmengine, as mmseg's tools/train.py.

Works with one process, torchrun (tools/dist_train.sh) and Slurm
(tools/slurm_train.sh); on a machine without CUDA the distributed launch
falls back to the gloo backend.
"""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import run_cli, tool_parser
from mmrepvgg.errors import UsageError
from mmrepvgg.runner import (add_launch_arguments, build_runner, enable_amp,
                             load_launch_config)


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='train config file path')
    parser.add_argument(
        '--resume',
        action='store_true',
        help='resume from the latest checkpoint in the work dir')
    parser.add_argument(
        '--amp', action='store_true', help='enable mixed precision training')
    parser.add_argument(
        '--qat',
        metavar='CHECKPOINT',
        help='fine-tune the deploy form of a trained RepVGG checkpoint with '
        'quantization-aware training (int8 fake quantization)')
    parser.add_argument(
        '--qat-equalize',
        action='store_true',
        help="with --qat: equalize the ranges of the channels between the "
        "backbone's blocks first (as export's --int8-equalize)")
    parser.add_argument(
        '--qat-distill',
        action='store_true',
        help="with --qat: learn the trained model's predictions (each "
        "head's class probabilities) instead of the labels")
    return add_launch_arguments(parser)


def main(args):
    for flag in ('qat_equalize', 'qat_distill'):
        if getattr(args, flag) and not args.qat:
            raise UsageError(f"--{flag.replace('_', '-')} needs --qat")
    cfg = load_launch_config(args)
    if args.amp:
        enable_amp(cfg)
    if args.qat:
        from mmrepvgg.quantization.training import use_qat
        use_qat(cfg, args.qat, args.config, args.qat_equalize,
                args.qat_distill)
    cfg.resume = args.resume
    build_runner(cfg).train()


if __name__ == '__main__':
    run_cli(main, build_parser)
