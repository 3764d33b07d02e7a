"""Export an mmseg segmentor (RepVGG or not) to a self-contained ONNX model,
after checking on ONNX Runtime that it computes what PyTorch does.

The model takes float32 NCHW images of BGR values 0-255 (as mmcv.imread
gives them) named `images` and returns `logits` and `labels`; classes,
palette and the source checkpoint's SHA-256 are in its metadata.
"""
import argparse

from mmrepvgg.cli import run_cli
from mmrepvgg.deploy.export import EXPORT_TOLERANCE, export_onnx


def main():
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
    parser.add_argument(
        '--force', action='store_true', help='overwrite OUT if it exists')
    args = parser.parse_args()
    result = export_onnx(
        args.config,
        args.checkpoint,
        args.out,
        size=args.shape,
        imgs=args.img,
        dynamic=args.dynamic,
        force=args.force,
        tolerance=args.tolerance)
    shape = 'x'.join(map(str, result.input_size))
    print(f'exported at {shape}' + (' (any size)' if result.dynamic else ''))
    print(f'ONNX Runtime vs PyTorch on {result.num_inputs} input(s): max '
          f'relative difference {result.max_error:.1e}, '
          f'{result.tied_flips} label(s) flipped at near-ties')
    print(f'wrote {result.out}')


if __name__ == '__main__':
    run_cli(main)
