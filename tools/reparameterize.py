"""Convert a trained RepVGG segmentor or detector to its deploy form.

Writes OUT, the deploy checkpoint, and OUT with its suffix replaced by .py,
the deploy config, after checking that the deploy model computes what the
trained one did.
"""
import argparse

from mmrepvgg.cli import run_cli
from mmrepvgg.deploy.pair import (DEFAULT_INPUT_SIZE, DEFAULT_TOLERANCE,
                                  reparameterize)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument(
        'config', help='config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='trained checkpoint')
    parser.add_argument('out', help='deploy checkpoint to write')
    parser.add_argument(
        '--img', nargs='+', default=[], help='images to verify on too')
    parser.add_argument(
        '--input-size',
        type=int,
        nargs=2,
        default=DEFAULT_INPUT_SIZE,
        metavar=('HEIGHT', 'WIDTH'),
        help='size of the random verification input')
    parser.add_argument(
        '--tolerance',
        type=float,
        default=DEFAULT_TOLERANCE,
        help='largest relative difference accepted')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    args = parser.parse_args()
    result = reparameterize(
        args.config,
        args.checkpoint,
        args.out,
        imgs=args.img,
        force=args.force,
        input_size=args.input_size,
        tolerance=args.tolerance,
        progress=bool(args.img))
    print(f'converted {result.converted} RepVGG blocks: '
          f'{result.params_before:,} -> {result.params_after:,} parameters')
    print(f'max relative difference {result.max_error:.1e} on '
          f'{result.num_inputs} input(s) (tolerance {args.tolerance:.0e})')
    print(f'wrote {result.out} and {result.out_config}')


if __name__ == '__main__':
    run_cli(main)
