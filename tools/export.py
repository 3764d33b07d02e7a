"""Export an mmseg segmentor (RepVGG or not) to a self-contained ONNX model,
after checking on ONNX Runtime and OpenVINO that it computes what PyTorch
does.

The model takes float32 NCHW images of BGR values 0-255 (as mmcv.imread
gives them) named `images` and returns `logits` and `labels`; classes,
palette and the source checkpoint's SHA-256 are in its metadata.
"""

import apps.interrupts  # noqa: F401  (before the heavy imports)
from mmrepvgg.cli import (add_settings, given_options, run_cli, settings_from,
                          tool_parser)
from mmrepvgg.deploy.compare import Fp32Tolerance
from mmrepvgg.deploy.export import ExportJob, ExportSettings, export_onnx
from mmrepvgg.errors import CheckpointError, UsageError
from mmrepvgg.quantization.ptq import Int8Settings, export_int8
from mmrepvgg.quantization.qat_export import QATExportSettings, export_qat
from mmrepvgg.quantization.training import is_qat_checkpoint


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument('config', help='the model config')
    parser.add_argument(
        'checkpoint',
        help='trained checkpoint (converted on the fly), deploy checkpoint '
        'or QAT checkpoint (exported in int8 with the scales it trained)')
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
        'convs whose outputs int8 moves most in fp32 (see --max-float)')
    add_settings(
        parser, QATExportSettings, 'int8 of a QAT checkpoint', prefix='qat')
    parser.add_argument(
        '--force', action='store_true', help='overwrite OUT if it exists')
    return parser


def _is_qat(checkpoint):
    try:
        return is_qat_checkpoint(checkpoint)
    except CheckpointError:
        return False  # the model's loading reports it


def main(args):
    """Decide what to export from the flags and the checkpoint, before any
    model is built: an fp32 model, calibrated int8, or a QAT checkpoint's
    int8."""
    int8_options = given_options(args, Int8Settings)
    if int8_options and not args.int8:
        raise UsageError(f'{", ".join(int8_options)} given without --int8')
    export = settings_from(args, ExportSettings)
    export.check()
    int8 = settings_from(args, Int8Settings)
    int8.check()
    qat = settings_from(args, QATExportSettings, 'qat')
    qat.check()
    qat_checkpoint = _is_qat(args.checkpoint)
    qat_options = given_options(args, QATExportSettings, 'qat')
    if qat_options and not qat_checkpoint:
        raise UsageError(f'{", ".join(qat_options)}: {args.checkpoint} is '
                         'not a QAT checkpoint')
    if qat_checkpoint and not args.int8:
        raise UsageError(f'{args.checkpoint}: is a QAT checkpoint; export '
                         'it with --int8')
    if qat_checkpoint and int8_options:
        raise UsageError(f'{", ".join(int8_options)}: not for a QAT '
                         'checkpoint, exported in the cpu scheme with the '
                         f'scales it trained ({args.checkpoint})')
    job = ExportJob.checked(args.config, args.checkpoint, args.out, export,
                            args.img, args.force)
    tolerance = settings_from(args, Fp32Tolerance, 'tolerance')
    if qat_checkpoint:
        result = export_qat(job, qat)
    elif args.int8:
        result = export_int8(job, int8, tolerance)
    else:
        result = export_onnx(job, tolerance)
    report(result, args.verbose, int8.report)


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
    of = f' of {len(info.sensitivity)}' if info.sensitivity else ''
    print(f'convs kept in fp32: {len(info.float_convs)}{of} ({kept})' +
          (f'; with every conv in int8, {every:.2%} agreed' if every else ''))
    if ranking:
        print('rank  output error alone in int8  conv')
        for rank, conv in enumerate(info.sensitivity, 1):
            mark = '  (fp32)' if conv.conv in info.float_convs else ''
            print(f'{rank:4d}  {conv.error:26.3e}  {conv.conv}{mark}')


if __name__ == '__main__':
    run_cli(main, build_parser)
