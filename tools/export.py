"""Export an mmseg segmentor (RepVGG or not) to a self-contained ONNX model,
after checking on ONNX Runtime and OpenVINO that it computes what PyTorch
does.

The model takes float32 NCHW images of BGR values 0-255 (as mmcv.imread
gives them) named `images` and returns `logits` and `labels`; classes,
palette and the source checkpoint's SHA-256 are in its metadata.
"""
import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import add_settings, run_cli, settings_from, tool_parser
from mmrepvgg.deploy.compare import Fp32Tolerance
from mmrepvgg.deploy.export import ExportSettings, export_onnx
from mmrepvgg.deploy.quantize import Int8Settings
from mmrepvgg.qat import QATExportSettings


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='the model config')
    parser.add_argument(
        'checkpoint',
        help='trained checkpoint (converted on the fly) or deploy checkpoint')
    parser.add_argument('out', help='the ONNX file to write')
    add_settings(parser, ExportSettings, 'input size')
    parser.add_argument(
        '--img', nargs='+', default=[], help='images to check on too')
    add_settings(parser, Fp32Tolerance, 'tolerance', prefix='tolerance')
    int8 = add_settings(parser, Int8Settings, 'int8')
    int8.add_argument(
        '--int8',
        action='store_true',
        help='write an int8 model (QDQ, per-channel weights), calibrated on '
        "images of the config's training set, if its labels agree with the "
        "fp32 model's on the validation set; if they do not, equalizing "
        "the backbone's channels (see --int8-equalize), then keeping the "
        'convs that move its logits most in fp32 (see --max-float)')
    int8.add_argument(
        '--int8-report',
        action='store_true',
        help='print every conv, ranked by how much it alone moves the logits '
        'in int8 (the ranking is in the metadata too)')
    add_settings(
        parser, QATExportSettings, 'int8 of a QAT checkpoint', prefix='qat')
    parser.add_argument(
        '--force', action='store_true', help='overwrite OUT if it exists')
    return parser


def main():
    args = build_parser().parse_args()
    result = export_onnx(
        args.config,
        args.checkpoint,
        args.out,
        settings=settings_from(args, ExportSettings),
        imgs=args.img,
        force=args.force,
        tolerance=settings_from(args, Fp32Tolerance, 'tolerance'),
        int8=settings_from(args, Int8Settings) if args.int8 else None,
        qat=settings_from(args, QATExportSettings, 'qat'))
    report(result, args.verbose, args.int8_report)


def report(result, verbose, int8_report=False):
    """Print what was exported and how closely it matches."""
    shape = 'x'.join(map(str, result.input_size))
    print(f'exported at {shape}' + (' (any size)' if result.dynamic else ''))
    if verbose and result.conversion is not None:
        print(f'converted to deploy form: {result.conversion.describe()}')
    if result.check is not None:
        print(f'{" and ".join(result.backends)} vs PyTorch on '
              f'{result.num_inputs} input(s): {result.check.describe()}; '
              f'{result.tied_flips} label(s) flipped at near-ties')
    if result.info.precision == 'int8':
        report_int8(result.info, int8_report)
    print(f'wrote {result.out}')


def report_int8(info, ranking):
    """Print an int8 model's agreement and the convs it keeps in fp32;
    with ``ranking``, every conv's sensitivity."""
    agreement = info.agreement
    if 'qat' in info.calibration:
        print(f'int8 ({info.int8_scheme} scheme) from QAT: ONNX Runtime '
              f'labels agree with the QAT model on {agreement["labels"]:.2%} '
              f'of the pixels of {agreement["images"]} '
              f'{agreement["split"]} image(s)')
        return
    if info.equalized_pairs:
        unequalized = agreement.get('unequalized_labels')
        print(f'channels equalized between {info.equalized_pairs} pairs of '
              'backbone convs before calibrating' +
              (f' (without, every conv in int8: {unequalized:.2%} agreed)'
               if unequalized is not None else ''))
    equalized = agreement.get('equalized_labels')
    if equalized is not None:
        print('the backbone equalized was tried and not kept (every conv in '
              f'int8: {equalized:.2%} agreed)')
    print(f'int8 ({info.int8_scheme} scheme), calibrated on '
          f'{info.calibration["images"]} training image(s): labels agree '
          f'with fp32 on {agreement["labels"]:.2%} of the pixels of '
          f'{agreement["images"]} validation image(s) (logits within '
          f'{agreement["max_rel_error"]:.1e} relative)')
    kept = ', '.join(info.float_convs) or 'none'
    every = agreement.get('all_int8_labels')
    print(f'convs kept in fp32: {len(info.float_convs)} of '
          f'{len(info.sensitivity)} ({kept})' +
          (f'; with every conv in int8, {every:.2%} agreed' if every else ''))
    if ranking:
        print('rank  logits error alone in int8  conv')
        for rank, conv in enumerate(info.sensitivity, 1):
            mark = '  (fp32)' if conv.conv in info.float_convs else ''
            print(f'{rank:4d}  {conv.error:26.3e}  {conv.conv}{mark}')


if __name__ == '__main__':
    run_cli(main)
