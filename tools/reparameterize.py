"""Convert a trained RepVGG segmentor or detector to its deploy form.

Writes OUT, the deploy checkpoint, and OUT with its suffix replaced by .py,
the deploy config, after checking that the deploy model computes what the
trained one did: its fp32 outputs within a small factor of the trained
model's own fp32 error from the exact (float64) outputs.
"""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import add_settings, run_cli, settings_from, tool_parser
from mmrepvgg.deploy.compare import Fp32Tolerance
from mmrepvgg.deploy.loading import DEFAULT_CHECK_SIZE
from mmrepvgg.deploy.pair import reparameterize


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument(
        'config', help='config the checkpoint was trained with')
    parser.add_argument('checkpoint', help='trained checkpoint')
    parser.add_argument('out', help='deploy checkpoint to write')
    parser.add_argument(
        '--img', nargs='+', default=[], help='images to verify on too')
    parser.add_argument(
        '--check-size',
        type=int,
        nargs=2,
        default=DEFAULT_CHECK_SIZE,
        metavar=('H', 'W'),
        help='size of the random verification input (default: '
        f'{DEFAULT_CHECK_SIZE[0]} {DEFAULT_CHECK_SIZE[1]})')
    add_settings(parser, Fp32Tolerance, 'tolerance', prefix='tolerance')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing outputs')
    return parser


def main(args):
    result = reparameterize(
        args.config,
        args.checkpoint,
        args.out,
        imgs=args.img,
        force=args.force,
        check_size=tuple(args.check_size),
        tolerance=settings_from(args, Fp32Tolerance, 'tolerance'))
    print(f'converted {result.converted} blocks: '
          f'{result.params_before:,} -> {result.params_after:,} parameters')
    print(f'{result.check.describe()}, on {result.num_inputs} input(s)')
    print(f'wrote {result.out} and {result.out_config}')


if __name__ == '__main__':
    run_cli(main, build_parser)
