"""Time the fp32 export against the int8 exports, side by side in one
process.

CONFIG's model, with its initial weights, is written as a training-form
checkpoint, and a copy of it made hostile to int8
(:func:`mmrepvgg.testing.make_quantization_hostile`); a toy dataset of
SHAPE-sized images stands in for the config's. Each round then times, one
after the other:

- fp32: :func:`mmrepvgg.deploy.export.export_onnx` (converted, exported and
  checked on ONNX Runtime and OpenVINO);
- int8: :func:`mmrepvgg.quantization.ptq.export_int8` where full int8
  agrees (``--min-agreement 0``): calibrated, checked, no conv's
  sensitivity measured;
- mixed: the same on the hostile model where full int8 cannot agree
  (``--min-agreement 1 --max-float 1``, no equalization): every conv's
  sensitivity measured and the most sensitive kept in fp32 (a refusal
  below the agreement asked ends it, after the same work).

The medians and the median of the per-round ratios to fp32 are printed.
"""
import apps.interrupts  # noqa: F401, isort: skip  (before the heavy imports)
import os.path as osp
import statistics
import tempfile

import torch

from apps.report import timed
from mmrepvgg.cli import run_cli, tool_parser
from mmrepvgg.config import build_model, read_config
from mmrepvgg.deploy.export import ExportJob, ExportSettings, export_onnx
from mmrepvgg.errors import UsageError, VerificationError
from mmrepvgg.quantization.ptq import Int8Settings, export_int8
from mmrepvgg.testing import (make_quantization_hostile, make_toy_cityscapes,
                              write_toy_config)

DEFAULT_CONFIG = osp.join(
    osp.dirname(osp.dirname(osp.abspath(__file__))), 'configs', 'pspnet',
    'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
# make_quantization_hostile's factor in the tests' hostile model.
HOSTILE_FACTOR = 1024.0


def _tasks(config, shape, folder):
    """The three exports, of checkpoints and a toy dataset written to
    ``folder``."""
    settings = Int8Settings()
    data = make_toy_cityscapes(
        osp.join(folder, 'data'),
        num_train=settings.calib_num,
        num_val=settings.eval_num,
        height=shape[0],
        width=shape[1])
    config = write_toy_config(
        config, data, osp.join(folder, 'config.py'), crop=shape)
    checkpoint = osp.join(folder, 'train.pth')
    # The values do not change the work, only the shapes do.
    torch.save(
        dict(state_dict=build_model(read_config(config)).state_dict()),
        checkpoint)
    hostile = make_quantization_hostile(
        checkpoint, osp.join(folder, 'hostile.pth'), factor=HOSTILE_FACTOR)
    print(f'{osp.basename(config)} at {shape[0]}x{shape[1]}, '
          f'{torch.get_num_threads()} threads')

    def job(source, size=shape):
        return ExportJob.checked(
            config,
            source,
            osp.join(folder, 'out.onnx'),
            ExportSettings(size),
            force=True)

    # Untimed, small: the exporter's and the engines' first use.
    export_onnx(job(checkpoint, (64, 128)))

    def mixed():
        try:
            result = export_int8(
                job(hostile),
                Int8Settings(min_agreement=1, max_float=1, equalize='never'))
            return f'{len(result.info.float_convs)} conv(s) in fp32'
        except VerificationError as error:
            return f'refused: {error}'

    return dict(
        fp32=lambda: export_onnx(job(checkpoint)) and 'written',
        int8=lambda: export_int8(
            job(checkpoint), Int8Settings(min_agreement=0)) and 'written',
        mixed=mixed)


def build_parser():
    parser = tool_parser(__doc__)
    parser.add_argument(
        '--config', default=DEFAULT_CONFIG, help='training-form config')
    parser.add_argument(
        '--shape',
        type=int,
        nargs=2,
        default=(512, 1024),
        metavar=('H', 'W'),
        help='export size (default: 512 1024)')
    parser.add_argument(
        '--rounds', type=int, default=1, help='timed rounds of each')
    return parser


def _check(args):
    """Refuse what cannot run, before any work."""
    ExportSettings(tuple(args.shape)).check()
    if args.rounds < 1:
        raise UsageError(f'rounds must be at least 1, got {args.rounds}')
    read_config(args.config)


def main(args):
    _check(args)
    times = {}
    with tempfile.TemporaryDirectory() as folder:
        tasks = _tasks(args.config, tuple(args.shape), folder)
        for _ in range(args.rounds):
            for name, task in tasks.items():
                seconds, outcome = timed(task)
                times.setdefault(name, []).append(seconds)
                print(f'{name}: {seconds:.1f} s ({outcome})', flush=True)
    # Ratios within a round share the machine's load at the time.
    print(f'median of {args.rounds} round(s), and of the ratios to fp32:')
    for name, seconds in times.items():
        ratios = [s / f for s, f in zip(seconds, times['fp32'])]
        print(f'{name:>6}: {statistics.median(seconds):7.1f} s '
              f'{statistics.median(ratios):5.1f}x')


if __name__ == '__main__':
    run_cli(main, build_parser)
