"""Evaluate a checkpoint, or an ONNX model written by tools/export.py, on
the config's test set with mmseg's metrics (mmengine's Runner, as mmseg's
tools/test.py)."""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import add_settings, run_cli, settings_from, tool_parser
from mmrepvgg.deploy.engines import EngineSettings
from mmrepvgg.runner import (add_launch_arguments, build_runner,
                             load_launch_config, use_checkpoint_or_engine)


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='test config file path')
    parser.add_argument(
        'checkpoint', help='checkpoint file, or an ONNX model (.onnx)')
    parser.add_argument(
        '--out', help='the dir to save the predicted label maps')
    add_settings(parser, EngineSettings, 'engine (for an ONNX model)')
    return add_launch_arguments(parser)


def main(args):
    cfg = load_launch_config(args)
    use_checkpoint_or_engine(cfg, args.checkpoint,
                             settings_from(args, EngineSettings))
    if args.out is not None:
        cfg.test_evaluator.update(output_dir=args.out, keep_results=True)
    build_runner(cfg).test()


if __name__ == '__main__':
    run_cli(main, build_parser)
