"""Segment images with an ONNX model written by tools/export.py, on ONNX
Runtime or OpenVINO: for each image, a coloured label map and an overlay
(PNG) in the dataset's palette."""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import add_settings, run_cli, settings_from, tool_parser
from mmrepvgg.deploy.engines import EngineSettings
from mmrepvgg.deploy.infer import segment_images


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument('model', help='ONNX model written by tools/export.py')
    parser.add_argument('img', nargs='+', help='images to segment')
    parser.add_argument(
        '--out-dir', required=True, help='where the PNGs are written')
    add_settings(parser, EngineSettings, 'engine')
    parser.add_argument(
        '--opacity',
        type=float,
        default=0.5,
        help='of the label colours in the overlay (default: 0.5)')
    parser.add_argument(
        '--force', action='store_true', help='overwrite existing PNGs')
    return parser


def main():
    args = build_parser().parse_args()
    written = segment_images(
        args.model,
        args.img,
        args.out_dir,
        settings=settings_from(args, EngineSettings),
        opacity=args.opacity,
        force=args.force)
    for path in written:
        print(f'wrote {path}')


if __name__ == '__main__':
    run_cli(main)
