"""The benchmark's engine forms: a backend and a precision, ``fp32`` or
``bf16`` (the engine's arithmetic) or ``int8`` (the model's).

Each segmentor is exported in memory as ``tools/export.py`` exports it and
quantized to int8 when asked, calibrated on images of the benchmarked
config's training set (the same images for every model). The engines' int8
ceiling is one 3x3 conv, timed on the same engines.
"""
import torch

from mmrepvgg.deploy.engines import (BACKENDS, PRECISIONS, EngineSettings,
                                     SegmentationEngine, bf16_available)
from mmrepvgg.deploy.graph import (OPSET, exportable, exported_model_info,
                                   to_onnx)
from mmrepvgg.deploy.model_info import (INPUT, OUTPUTS, ExportedModelInfo,
                                        set_info)
from mmrepvgg.errors import UsageError
from mmrepvgg.quantization.ptq import quantize_int8

FORM_PRECISIONS = (*PRECISIONS, 'int8')
# One 3x3 conv of 256 channels with its ReLU, at 64x128: the bulk of a
# RepVGG's arithmetic.
CONV_SHAPE = (1, 256, 64, 128)


def check_engines(backends, precisions):
    """Raise UsageError unless the backends include torch (the baseline)
    and some backend runs each precision."""
    unknown = set(backends) - {'torch', *BACKENDS}
    if 'torch' not in backends or unknown:
        raise UsageError(f'backends must include torch (the baseline) and be '
                         f'among torch, {", ".join(BACKENDS)}; got '
                         f'{list(backends)}')
    if not precisions or set(precisions) - set(FORM_PRECISIONS):
        raise UsageError(f'precisions must be among {FORM_PRECISIONS}, got '
                         f'{list(precisions)}')
    engines = set(backends) & set(BACKENDS)
    for precision, runs in (('int8', engines), ('bf16',
                                                engines & {'openvino'})):
        if precision in precisions and not runs:
            raise UsageError(
                f'--precisions {precision}: no backend asked for runs it; '
                'add --backends ' +
                ('openvino' if precision == 'bf16' else ' or '.join(BACKENDS)))


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
    ``'int8'``, else the fp32 one (bf16 is the engine's arithmetic)."""
    return 'int8' if precision == 'int8' else 'fp32'


def engine_settings(backend, precision, threads=0):
    """The :class:`EngineSettings` of an engine form (an int8 model runs
    with the engine in fp32: its int8 layers stay int8)."""
    return EngineSettings(backend, 'bf16' if precision == 'bf16' else 'fp32',
                          threads)


def exported_models(cfg, loaded, config, size, calibration=None):
    """A loaded segmentor as fp32 ONNX bytes, and as int8 bytes calibrated
    on the image batches ``calibration`` if given."""
    info = exported_model_info(cfg, loaded, config, size)
    models = dict(fp32=to_onnx(exportable(loaded.model), size, info=info))
    if calibration is not None:
        models['int8'] = quantize_int8(models['fp32'],
                                       calibration).SerializeToString()
    return models


def engine_runner(model, backend, precision, threads):
    """A function from an input batch (a tensor) to the model's logits on an
    engine."""
    engine = SegmentationEngine(model,
                                engine_settings(backend, precision, threads))
    return lambda inputs: torch.from_numpy(engine(inputs.numpy())[0])


def conv_models(seed=0):
    """The ceiling's conv at :data:`CONV_SHAPE` as fp32 and int8 ONNX bytes
    that the engines run as a segmentor (its channels the classes): random
    weights, int8 calibrated on random inputs with its input and output
    quantized as inside a model."""
    import onnx
    from onnx import numpy_helper
    generator = torch.Generator().manual_seed(seed)
    channels, size = CONV_SHAPE[1], list(CONV_SHAPE[2:])
    weight = torch.randn(
        channels, channels, 3, 3, generator=generator) / (9 * channels)**0.5
    shape = ','.join(map(str, CONV_SHAPE))
    logits, labels = OUTPUTS
    fp32 = onnx.parser.parse_model(
        f'<ir_version: {onnx.IR_VERSION}, opset_import: ["": {OPSET}]> '
        f'conv3x3 (float[{shape}] {INPUT}) => (float[{shape}] {logits}, '
        f'int64[1,{size[0]},{size[1]}] {labels}) {{ '
        f'conv = Conv <pads = [1, 1, 1, 1]> ({INPUT}, weight, bias) '
        f'{logits} = Relu (conv) '
        f'{labels} = ArgMax <axis = 1, keepdims = 0> ({logits}) }}')
    fp32.graph.initializer.extend([
        numpy_helper.from_array(weight.numpy(), 'weight'),
        numpy_helper.from_array(torch.zeros(channels).numpy(), 'bias')
    ])
    set_info(
        fp32,
        ExportedModelInfo([str(c) for c in range(channels)], [], size, False))
    calibration = [
        torch.randn(*CONV_SHAPE, generator=generator).relu() for _ in range(2)
    ]
    fp32 = fp32.SerializeToString()
    int8 = quantize_int8(fp32, calibration, outer_fp32=False)
    return dict(fp32=fp32, int8=int8.SerializeToString())
