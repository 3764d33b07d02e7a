"""Running exported segmentors on ONNX Runtime or OpenVINO.

:class:`SegmentationEngine` turns images into label maps with a model that
:func:`mmrepvgg.deploy.export.export_onnx` wrote; :class:`EngineSegmentor`
puts it behind mmseg's segmentor interface, so that mmengine's Runner
evaluates it with mmseg's own datasets and metrics.
"""
import numpy as np
import torch
import torch.nn.functional as F
from mmseg.models.segmentors import BaseSegmentor
from mmseg.registry import MODELS

from ..errors import UsageError
from .onnx_model import as_batch, onnxruntime_session, read_model_info

BACKENDS = ('onnxruntime', 'openvino')
# bf16 is OpenVINO's default on CPUs with bf16 units, and changes labels:
# it runs only when asked. An int8 model is int8 at any precision.
PRECISIONS = ('fp32', 'bf16')


def _openvino_model(proto, threads, precision):
    import openvino
    core = openvino.Core()
    config = {
        'INFERENCE_PRECISION_HINT': 'bf16' if precision == 'bf16' else 'f32'
    }
    if threads:
        config['INFERENCE_NUM_THREADS'] = threads
    compiled = core.compile_model(
        core.read_model(proto.SerializeToString()), 'CPU', config)

    def run(images):
        results = compiled({'images': images})
        return results['logits'], results['labels']

    return run


def _onnxruntime_model(proto, threads, precision):
    if precision != 'fp32':
        raise UsageError('ONNX Runtime runs this model in fp32 only; use '
                         'OpenVINO for bf16')
    session = onnxruntime_session(proto.SerializeToString(), threads)
    return lambda images: session.run(None, {'images': images})


class SegmentationEngine:
    """An exported segmentor on an inference engine.

    Args:
        model (str | bytes): An ONNX file (or its bytes) written by
            :func:`mmrepvgg.deploy.export.export_onnx`.
        backend (str): ``'onnxruntime'`` or ``'openvino'``.
            Defaults to ``'onnxruntime'``.
        threads (int, optional): Threads the engine may use.
            Defaults to None (the engine's choice).
        precision (str): ``'fp32'`` or ``'bf16'`` (OpenVINO only; the
            exported model's int8 layers stay int8 at either).
            Defaults to ``'fp32'``.

    Attributes:
        info (ExportedModelInfo): The model's metadata: classes, palette,
            input size.
    """

    def __init__(self,
                 model,
                 backend='onnxruntime',
                 threads=None,
                 precision='fp32'):
        if backend not in BACKENDS:
            raise UsageError(f'backend must be one of {BACKENDS}, got '
                             f'{backend!r}')
        if precision not in PRECISIONS:
            raise UsageError(f'precision must be one of {PRECISIONS}, got '
                             f'{precision!r}')
        self.info, proto = read_model_info(model)
        self.backend, self.precision = backend, precision
        make = (
            _openvino_model if backend == 'openvino' else _onnxruntime_model)
        self._run = make(proto, threads, precision)

    def __call__(self, images):
        """Logits and labels of a float32 ``(N, 3, H, W)`` batch of BGR
        values 0-255 at the model's input size."""
        logits, labels = self._run(np.ascontiguousarray(images, np.float32))
        return logits, labels

    def logits(self, images):
        """Logits of a float32 BGR batch of any size: resized to the
        model's input size and back, as mmseg resizes logits.

        Args:
            images (Tensor): ``(N, 3, H, W)``.

        Returns:
            Tensor: ``(N, C, H, W)`` logits.
        """
        size = images.shape[-2:]
        model_size = self.info.input_size
        if model_size and tuple(size) != tuple(model_size):
            images = F.interpolate(
                images, size=tuple(model_size), mode='bilinear')
        logits = torch.from_numpy(self(images.numpy())[0])
        if tuple(logits.shape[-2:]) != tuple(size):
            logits = F.interpolate(
                logits,
                size=tuple(size),
                mode='bilinear',
                align_corners=self.info.align_corners)
        return logits

    def predict(self, image):
        """The label map of one image as ``mmcv.imread`` gives it
        (``(H, W, 3)`` BGR uint8), at the image's size."""
        return self.logits(as_batch(image))[0].argmax(0).numpy()


@MODELS.register_module()
class EngineSegmentor(BaseSegmentor):
    """An exported segmentor behind mmseg's segmentor interface, for
    evaluation with mmengine's Runner and mmseg's metrics.

    Its data preprocessor only stacks the images: the exported model
    normalizes them itself.

    Args:
        model (str): An ONNX file written by
            :func:`mmrepvgg.deploy.export.export_onnx`.
        backend (str): ``'onnxruntime'`` or ``'openvino'``.
        threads (int, optional): Threads the engine may use.
        precision (str): ``'fp32'`` or ``'bf16'`` (OpenVINO).
        data_preprocessor (dict, optional): Ignored: the Runner passes the
            config's, which would normalize the images a second time.
        init_cfg (dict, optional): Unused; there is nothing to initialize.
    """

    def __init__(self,
                 model,
                 backend='onnxruntime',
                 threads=None,
                 precision='fp32',
                 data_preprocessor=None,
                 init_cfg=None):
        super().__init__(
            data_preprocessor=dict(type='SegDataPreProcessor'),
            init_cfg=init_cfg)
        self.engine = SegmentationEngine(model, backend, threads, precision)
        self.align_corners = self.engine.info.align_corners

    def predict(self, inputs, data_samples=None):
        return self.postprocess_result(
            self.engine.logits(inputs), data_samples)

    def _only_predicts(self, *args, **kwargs):
        raise NotImplementedError('an exported segmentor only predicts')

    loss = extract_feat = encode_decode = _forward = _only_predicts
