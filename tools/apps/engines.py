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
                                     SegmentationEngine, bf16_available,
                                     onnxruntime_session)
from mmrepvgg.deploy.graph import OPSET, exportable, to_onnx
from mmrepvgg.deploy.images import split_images
from mmrepvgg.deploy.loading import dataset_meta
from mmrepvgg.deploy.model_info import INPUT, ExportedModelInfo
from mmrepvgg.errors import UsageError
from mmrepvgg.quantization.ptq import quantize_int8

FORM_PRECISIONS = (*PRECISIONS, 'int8')
# The engines' int8 ceiling is timed on one 3x3 conv of 256 channels with
# its ReLU, at 64x128: the bulk of a RepVGG's arithmetic.
CONV_SHAPE = (1, 256, 64, 128)


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


def conv_models(seed=0):
    """One 3x3 conv with its ReLU at :data:`CONV_SHAPE`, as fp32 and int8
    ONNX bytes (random weights; int8 calibrated on random inputs, its
    input and output quantized as inside a model)."""
    from onnx import TensorProto, helper, numpy_helper
    generator = torch.Generator().manual_seed(seed)
    channels = CONV_SHAPE[1]
    weight = torch.randn(
        channels, channels, 3, 3, generator=generator) / (9 * channels)**0.5
    tensors = [
        numpy_helper.from_array(weight.numpy(), 'conv.weight'),
        numpy_helper.from_array(torch.zeros(channels).numpy(), 'conv.bias')
    ]
    nodes = [
        helper.make_node(
            'Conv', [INPUT, 'conv.weight', 'conv.bias'], ['conv'],
            name='conv',
            pads=[1] * 4),
        helper.make_node('Relu', ['conv'], ['logits'], name='relu')
    ]
    values = [
        helper.make_tensor_value_info(name, TensorProto.FLOAT, CONV_SHAPE)
        for name in (INPUT, 'logits')
    ]
    graph = helper.make_graph(nodes, 'conv3x3', values[:1], values[1:],
                              tensors)
    fp32 = helper.make_model(
        graph, opset_imports=[helper.make_opsetid('', OPSET)])
    fp32 = fp32.SerializeToString()
    calibration = [
        torch.randn(*CONV_SHAPE, generator=generator).relu() for _ in range(2)
    ]
    int8 = quantize_int8(fp32, calibration, outer_fp32=False)
    return dict(fp32=fp32, int8=int8.SerializeToString())


def conv_runner(model, backend, threads):
    """A function from an input tensor to the conv model's output on an
    engine, in fp32 arithmetic (an int8 model's convs stay int8)."""
    if backend == 'onnxruntime':
        session = onnxruntime_session(model, threads)
        return lambda x: session.run(None, {INPUT: x.numpy()})[0]
    import openvino
    core = openvino.Core()
    config = {'INFERENCE_PRECISION_HINT': 'f32'}
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    compiled = core.compile_model(core.read_model(model), 'CPU', config)
    return lambda x: compiled({INPUT: x.numpy()})['logits']
