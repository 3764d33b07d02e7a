"""Time a RepVGG segmentor's train and deploy forms, and reference
configs, side by side (whole segmentors and their backbones)."""
import argparse

from apps.benchmark import PARTS, BenchmarkSettings, run_benchmark
from apps.engines import ENGINES, PRECISIONS
from apps.fast_path import FAST_STEPS, check_fast_path
from apps.mmpretrain import load_mmpretrain_repvgg
from apps.report import format_report, plot_chart, write_json
from mmrepvgg.cli import run_cli
from mmrepvgg.errors import UsageError
from mmrepvgg.fileio import check_output_path


def add_model_options(parser):
    """What is timed: the config, its weights and references."""
    parser.add_argument(
        'config', help='RepVGG segmentor config (path or mmseg::...)')
    parser.add_argument(
        '--reference',
        nargs='+',
        default=[],
        help='configs to compare with, e.g. mmseg::pspnet/'
        'pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py')
    parser.add_argument(
        '--checkpoint', help='train-form weights (default: random init)')
    parser.add_argument(
        '--mmpretrain',
        action='store_true',
        help="also time mmpretrain's deployed RepVGG backbone")
    parser.add_argument(
        '--parts',
        nargs='+',
        choices=PARTS,
        default=list(PARTS),
        help='what to time (default: both)')


def add_input_options(parser):
    """What the models run on, and how they are timed."""
    parser.add_argument(
        '--size',
        type=int,
        nargs=2,
        default=(512, 1024),
        metavar=('H', 'W'),
        help='input height and width (default: 512 1024)')
    parser.add_argument(
        '--batch', type=int, default=1, help='batch size (default: 1)')
    parser.add_argument(
        '--image',
        help='an image to run on, resized to --size (default: random '
        'pixels)')
    parser.add_argument(
        '--rounds', type=int, default=5, help='timed rounds (default: 5)')
    parser.add_argument(
        '--warmup',
        type=int,
        default=2,
        help='untimed runs per model first (default: 2)')
    parser.add_argument(
        '--threads', type=int, help='torch threads (default: unchanged)')
    parser.add_argument(
        '--device', default='cpu', help='cpu or cuda[:N] (default: cpu)')


def add_path_options(parser):
    """The faster forms of the deploy model that are timed too."""
    parser.add_argument(
        '--channels-last',
        action='store_true',
        help='run every model in channels-last memory format')
    parser.add_argument(
        '--fast-path',
        nargs='+',
        choices=FAST_STEPS,
        default=[],
        help='also time the deploy form on this fp32 path, after checking '
        'that it predicts the same (fold_psp: the PSP head with its pyramid '
        'pooling folded into its bottleneck conv; channels_last: memory '
        'format; mkldnn: the backbone on oneDNN tensors; jit: trace and '
        'freeze; compile: torch.compile with frozen weights)')
    parser.add_argument(
        '--backends',
        nargs='+',
        choices=['torch', *ENGINES],
        default=['torch'],
        help='torch, and the engines that also run every segmentor '
        'exported to ONNX (default: torch)')
    parser.add_argument(
        '--precisions',
        nargs='+',
        choices=PRECISIONS,
        default=['fp32'],
        help=('of the engines: fp32, bf16 (OpenVINO), int8 (every model '
              "calibrated on images of the config's training set) "
              '(default: fp32)'))
    parser.add_argument(
        '--calib-num',
        type=int,
        default=16,
        help='int8 calibration images (default: 16)')


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    for add_options in (add_model_options, add_input_options,
                        add_path_options):
        add_options(parser)
    parser.add_argument('--json', help='write the results as JSON here')
    parser.add_argument('--chart', help='write a PNG bar chart here')
    parser.add_argument(
        '--force', action='store_true', help='overwrite --json/--chart')
    args = parser.parse_args()
    if args.batch < 1 or min(args.size) < 1 or args.rounds < 1:
        parser.error('--batch, --size and --rounds must be positive')
    return parser, args


def main():
    parser, args = parse_args()
    try:
        check_fast_path(args.fast_path, args.config)
    except UsageError as error:
        parser.error(str(error))
    inputs = [p for p in (args.config, args.checkpoint) if p]
    for out in (args.json, args.chart):
        if out:
            check_output_path(out, inputs, args.force)
    if args.mmpretrain:
        load_mmpretrain_repvgg()  # fail now rather than after building
    result = run_benchmark(
        BenchmarkSettings(
            args.config,
            references=args.reference,
            checkpoint=args.checkpoint,
            shape=(args.batch, 3, *args.size),
            parts=args.parts,
            rounds=args.rounds,
            warmup=args.warmup,
            threads=args.threads,
            channels_last=args.channels_last,
            fast_path=args.fast_path,
            mmpretrain=args.mmpretrain,
            device=args.device,
            backends=args.backends,
            precisions=args.precisions,
            image=args.image,
            calib_num=args.calib_num))
    print(format_report(result))
    if args.json:
        write_json(result.to_dict(), args.json, args.force)
        print(f'wrote {args.json}')
    if args.chart:
        plot_chart(result, args.chart, args.force)
        print(f'wrote {args.chart}')


if __name__ == '__main__':
    run_cli(main)
