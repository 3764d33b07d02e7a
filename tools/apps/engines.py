"""Deployed segmentors on inference engines, for the benchmark.

Each model is exported to ONNX in memory, as ``tools/export.py`` exports
it, and quantized to int8 when asked, calibrated on images of the
benchmarked config's training set (the same images for every model).

An engine form is a backend and a precision: ``fp32`` or ``bf16`` (the
engine's arithmetic), or ``int8`` (the model's).
"""
import torch

from mmrepvgg.config import read_config
from mmrepvgg.deploy.engines import (BACKENDS, PRECISIONS, EngineSettings,
                                     SegmentationEngine, bf16_available)
from mmrepvgg.deploy.export import exportable, to_onnx
from mmrepvgg.deploy.images import split_images
from mmrepvgg.deploy.loading import dataset_meta
from mmrepvgg.deploy.model_info import ExportedModelInfo
from mmrepvgg.deploy.quantize import quantize_int8
from mmrepvgg.errors import UsageError

FORM_PRECISIONS = (*PRECISIONS, 'int8')


def check_engines(backends, precisions):
    """Raise UsageError unless the backends include torch (the baseline)
    and name known engines and precisions."""
    unknown = set(backends) - {'torch', *BACKENDS}
    if 'torch' not in backends or unknown:
        raise UsageError(f'backends must include torch (the baseline) and be '
                         f'among torch, {", ".join(BACKENDS)}; got '
                         f'{list(backends)}')
    if not precisions or set(precisions) - set(FORM_PRECISIONS):
        raise UsageError(f'precisions must be among {FORM_PRECISIONS}, got '
                         f'{list(precisions)}')


def engine_forms(backends, precisions):
    """The (backend, precision) pairs to run: bf16 on OpenVINO only, and
    only on a CPU with bf16 units."""
    bf16 = 'openvino' in backends and 'bf16' in precisions and (
        bf16_available())
    return [(backend, precision) for backend in BACKENDS if backend in backends
            for precision in precisions
            if precision != 'bf16' or (backend == 'openvino' and bf16)]


def model_precision(precision):
    """Which exported model an engine form runs: the int8 one for
    ``'int8'``, else the fp32 one (bf16 is chosen when the engine runs)."""
    return 'int8' if precision == 'int8' else 'fp32'


def engine_settings(backend, precision, threads=0):
    """The :class:`EngineSettings` of an engine form (an int8 model runs
    with the engine in fp32: its int8 layers stay int8)."""
    return EngineSettings(backend, 'bf16' if precision == 'bf16' else 'fp32',
                          threads or 0)


def exported_models(segmentor, config, size, precisions, calib_num):
    """The segmentor as fp32 ONNX bytes, and int8 bytes when asked for
    (calibrated on ``calib_num`` images of ``config``'s training set,
    read through its test pipeline)."""
    cfg = read_config(config)
    dataset = dataset_meta(cfg)
    classes = (
        list(dataset.classes) if dataset else
        [str(i) for i in range(segmentor.decode_head.num_classes)])
    info = ExportedModelInfo(
        classes=classes,
        palette=[list(c) for c in dataset.palette] if dataset else [],
        input_size=list(size),
        align_corners=bool(segmentor.align_corners))
    models = dict(fp32=to_onnx(exportable(segmentor), size, info=info))
    if 'int8' in precisions:
        images = split_images(cfg, 'train', calib_num, size)
        models['int8'] = quantize_int8(models['fp32'],
                                       images).SerializeToString()
    return models


def engine_runner(model, backend, precision, threads):
    """A function from a raw image batch (a tensor) to logits (a tensor)
    on an engine."""
    engine = SegmentationEngine(model,
                                engine_settings(backend, precision, threads))
    return lambda images: torch.from_numpy(engine(images.numpy())[0])
