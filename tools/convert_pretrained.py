"""Convert RepVGG ImageNet weights of any known layout to mmrepvgg's."""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import run_cli, tool_parser
from mmrepvgg.models import RepVGG
from mmrepvgg.pretrained import convert_pretrained


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument('src', help='official or OpenMMLab-zoo weights')
    parser.add_argument('dst', help='output checkpoint')
    parser.add_argument(
        '--arch',
        choices=sorted(RepVGG.arch_settings),
        help='the arch the weights must fit (default: found from them)')
    parser.add_argument(
        '--force', action='store_true', help='overwrite dst if it exists')
    return parser


def main(args):
    count, arch, deploy = convert_pretrained(
        args.src, args.dst, arch=args.arch, force=args.force)
    form = 'deploy' if deploy else 'training'
    print(f'wrote {count} tensors of RepVGG-{arch} ({form} form) to '
          f'{args.dst}')


if __name__ == '__main__':
    run_cli(main, build_parser)
