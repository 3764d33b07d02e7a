"""Export an mmseg segmentor (RepVGG or not) to a self-contained ONNX model,
after checking on ONNX Runtime that it computes what PyTorch does.

The model takes float32 NCHW images of BGR values 0-255 (as mmcv.imread
gives them) named `images` and returns `logits` and `labels`; classes,
palette and the source checkpoint's SHA-256 are in its metadata.
"""
import argparse

from mmrepvgg.cli import run_cli
from mmrepvgg.deploy.export import EXPORT_TOLERANCE, export_onnx
from mmrepvgg.deploy.quantize import Int8Settings

INT8 = Int8Settings()


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument('config', help='the model config')
    parser.add_argument(
        'checkpoint',
        help='trained checkpoint (converted on the fly) or deploy checkpoint')
    parser.add_argument('out', help='the ONNX file to write')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        metavar=('H', 'W'),
        help='input height and width (default: what the test pipeline '
        'makes of a 1024x2048 Cityscapes frame)')
    parser.add_argument(
        '--dynamic',
        action='store_true',
        help='take any input size (checked at the shape and at 3/4 of it)')
    parser.add_argument(
        '--img', nargs='+', default=[], help='images to check on too')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=EXPORT_TOLERANCE,
        help='largest relative difference of the logits accepted')
    add_int8_options(parser)
    parser.add_argument(
        '--force', action='store_true', help='overwrite OUT if it exists')
    return parser.parse_args()


def add_int8_options(parser):
    """--int8 and how it is calibrated and checked."""
    parser.add_argument(
        '--int8',
        action='store_true',
        help='write an int8 model (QDQ, per-channel weights), calibrated on '
        "images of the config's training set, if its labels agree with the "
        "fp32 model's on the validation set")
    parser.add_argument(
        '--calib-num',
        type=int,
        default=INT8.calib_num,
        help=f'training images to calibrate on (default: {INT8.calib_num})')
    parser.add_argument(
        '--eval-num',
        type=int,
        default=INT8.eval_num,
        help='validation images to measure the agreement on (default: '
        f'{INT8.eval_num})')
    parser.add_argument(
        '--min-agreement',
        type=float,
        default=INT8.min_agreement,
        help='share of pixels whose int8 label must equal the fp32 one '
        f'(default: {INT8.min_agreement})')


def main():
    args = parse_args()
    int8 = Int8Settings(args.calib_num, args.eval_num,
                        args.min_agreement) if args.int8 else None
    result = export_onnx(
        args.config,
        args.checkpoint,
        args.out,
        size=args.shape,
        imgs=args.img,
        dynamic=args.dynamic,
        force=args.force,
        tolerance=args.tolerance,
        int8=int8)
    report(result)


def report(result):
    """Print what was exported and how closely it matches."""
    shape = 'x'.join(map(str, result.input_size))
    print(f'exported at {shape}' + (' (any size)' if result.dynamic else ''))
    print(f'ONNX Runtime vs PyTorch on {result.num_inputs} input(s): max '
          f'relative difference {result.max_error:.1e}, '
          f'{result.tied_flips} label(s) flipped at near-ties')
    if result.info.precision == 'int8':
        agreement = result.info.agreement
        print(f'int8, calibrated on {result.info.calibration["images"]} '
              f'training image(s): labels agree with fp32 on '
              f'{agreement["labels"]:.2%} of the pixels of '
              f'{agreement["images"]} validation image(s) (logits within '
              f'{agreement["max_rel_error"]:.1e} relative)')
    print(f'wrote {result.out}')


if __name__ == '__main__':
    run_cli(main)
