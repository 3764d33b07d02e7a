"""Deployed segmentors on inference engines, for the benchmark.

Each model is exported to ONNX in memory, as ``tools/export.py`` exports
it, and quantized to int8 when asked, calibrated on images of the
benchmarked config's training set (the same images for every model).
"""
import torch

from mmrepvgg.config import read_config
from mmrepvgg.deploy import SegmentationEngine
from mmrepvgg.deploy.export import exportable, to_onnx
from mmrepvgg.deploy.onnx_model import ExportedModelInfo
from mmrepvgg.deploy.quantize import quantize_int8, split_images
from mmrepvgg.errors import UsageError

ENGINES = ('onnxruntime', 'openvino')
PRECISIONS = ('fp32', 'bf16', 'int8')


def check_engines(backends, precisions):
    """Raise UsageError unless the backends include torch (the baseline)
    and name known engines and precisions."""
    unknown = set(backends) - {'torch', *ENGINES}
    if 'torch' not in backends or unknown:
        raise UsageError(f'backends must include torch (the baseline) and be '
                         f'among torch, {", ".join(ENGINES)}; got '
                         f'{list(backends)}')
    if not precisions or set(precisions) - set(PRECISIONS):
        raise UsageError(f'precisions must be among {PRECISIONS}, got '
                         f'{list(precisions)}')


def engine_forms(backends, precisions):
    """The (backend, precision) pairs to run; ONNX Runtime has no bf16 on
    CPUs."""
    return [(backend, precision) for backend in ENGINES if backend in backends
            for precision in precisions
            if not (backend == 'onnxruntime' and precision == 'bf16')]


def model_precision(precision):
    """Which exported model an engine form runs: the int8 one for
    ``'int8'``, else the fp32 one (bf16 is chosen when the engine runs)."""
    return 'int8' if precision == 'int8' else 'fp32'


def engine_precision(precision):
    """The precision an engine form asks :class:`SegmentationEngine` for:
    ``'bf16'`` for bf16, else ``'fp32'`` (an int8 model stays int8)."""
    return 'bf16' if precision == 'bf16' else 'fp32'


def exported_models(segmentor, config, size, precisions, calib_num):
    """The segmentor as fp32 ONNX bytes, and int8 bytes when asked for
    (calibrated on ``calib_num`` images of ``config``'s training set,
    read through its test pipeline)."""
    info = ExportedModelInfo(
        classes=[],
        palette=[],
        input_size=list(size),
        align_corners=bool(segmentor.align_corners))
    models = dict(fp32=to_onnx(exportable(segmentor), size, info=info))
    if 'int8' in precisions:
        images = split_images(read_config(config), 'train', calib_num, size)
        models['int8'] = quantize_int8(models['fp32'],
                                       images).SerializeToString()
    return models


def engine_runner(model, backend, precision, threads):
    """A function from a raw image batch (a tensor) to logits (a tensor)
    on an engine."""
    engine = SegmentationEngine(model, backend, threads,
                                engine_precision(precision))
    return lambda images: torch.from_numpy(engine(images.numpy())[0])
