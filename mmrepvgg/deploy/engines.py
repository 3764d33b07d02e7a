"""Running exported segmentors on ONNX Runtime or OpenVINO.

:class:`SegmentationEngine` turns images into label maps with a model that
:func:`mmrepvgg.deploy.export.export_onnx` wrote; :class:`EngineSegmentor`
puts it behind mmseg's segmentor interface, so that mmengine's Runner
evaluates it with mmseg's own datasets and metrics.

A model file is checked before an engine loads it
(:func:`mmrepvgg.deploy.model_info.read_model`), and whatever the engine
says when it refuses or fails to run a model becomes one line.
"""
import os
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F
from mmseg.models.segmentors import BaseSegmentor
from mmseg.registry import MODELS

from ..errors import UsageError, first_line
from .images import as_batch, fit_within
from .model_info import INPUT, ModelFile, read_model

__all__ = [
    'BACKENDS', 'PRECISIONS', 'RUN_PIXELS', 'bf16_available', 'EngineSettings',
    'onnxruntime_session', 'SegmentationEngine', 'EngineSegmentor'
]

BACKENDS = ('onnxruntime', 'openvino')
# bf16 is OpenVINO's default on CPUs with bf16 units, and changes labels:
# it runs only when asked. An int8 model is int8 at any precision.
PRECISIONS = ('fp32', 'bf16')
# The most pixels an image is run at by a model of any input size: a
# Cityscapes frame, to which mmseg's Cityscapes test pipeline resizes too.
# Larger images are scaled down to it, and their labels brought back up.
RUN_PIXELS = 1024 * 2048
# Rows of a label map computed at a time from the model's logits: a band of
# an 8000-pixel-wide map of 19 classes takes 150 MB.
_LABEL_ROWS = 256


@dataclass(frozen=True)
class EngineSettings:
    """How an exported model runs.

    Attributes:
        backend (str): ``'onnxruntime'`` or ``'openvino'``.
        precision (str): ``'fp32'``, or ``'bf16'`` (OpenVINO only; an int8
            model's int8 layers stay int8 at either).
        threads (int): Threads the engine may use; 0 for its own choice.
    """
    backend: str = field(
        default='onnxruntime',
        metadata=dict(choices=BACKENDS, help='inference engine'))
    precision: str = field(
        default='fp32',
        metadata=dict(choices=PRECISIONS, help='bf16: OpenVINO only'))
    threads: int = field(
        default=0,
        metadata=dict(help="engine threads, 0: the engine's choice"))

    def check(self):
        """Raise UsageError for settings that cannot run."""
        if self.backend not in BACKENDS:
            raise UsageError(f'backend must be one of {BACKENDS}, got '
                             f'{self.backend!r}')
        if self.precision not in PRECISIONS:
            raise UsageError(f'precision must be one of {PRECISIONS}, got '
                             f'{self.precision!r}')
        if self.backend == 'onnxruntime' and self.precision != 'fp32':
            raise UsageError('ONNX Runtime runs this model in fp32 only; use '
                             'OpenVINO for bf16')
        if self.precision == 'bf16' and not bf16_available():
            raise UsageError('this CPU has no bf16 units (or '
                             'ONEDNN_MAX_CPU_ISA holds them back): OpenVINO '
                             'runs fp32 here')
        if type(self.threads) is not int or self.threads < 0:
            raise UsageError('threads must be 0 (the engine\'s choice) or '
                             f'more, got {self.threads}')
        return self


# oneDNN instruction sets with bf16 arithmetic, for ONEDNN_MAX_CPU_ISA.
_BF16_ISAS = ('AVX512_CORE_BF16', 'AVX512_CORE_FP16', 'AVX512_CORE_AMX',
              'AVX512_CORE_AMX_FP16', 'AVX10_1_512', 'AVX10_1_512_AMX',
              'AVX10_1_512_AMX_FP16', 'ALL', 'DEFAULT')


def bf16_available():
    """Whether OpenVINO can run bf16 here: the CPU has bf16 units, and
    ``ONEDNN_MAX_CPU_ISA`` (which OpenVINO's oneDNN obeys, though its
    report of the CPU does not) allows them."""
    import openvino
    capabilities = openvino.Core().get_property('CPU',
                                                'OPTIMIZATION_CAPABILITIES')
    isa = os.environ.get('ONEDNN_MAX_CPU_ISA', 'ALL').upper()
    return 'BF16' in capabilities and isa in _BF16_ISAS


def _engine_errors():
    """What the engines raise for a model they cannot load or run."""
    from onnxruntime.capi import onnxruntime_pybind11_state as ort
    return tuple(
        getattr(ort, name)
        for name in ('Fail', 'InvalidArgument', 'InvalidGraph', 'NoSuchFile',
                     'NoModel', 'EngineError', 'RuntimeException',
                     'InvalidProtobuf', 'NotImplemented', 'EPFail')
        if hasattr(ort, name)) + (RuntimeError, )


def _reason(error):
    """The line of an engine's error that says what went wrong: OpenVINO's
    start with where they were raised, and say why last."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    if len(lines) > 1 and lines[0].startswith('Exception from'):
        return lines[-1]
    return first_line(error)


def onnxruntime_session(model, threads=0, keep_memory=True):
    """An ONNX Runtime CPU session for model bytes or a path, quiet on
    stderr; without ``keep_memory`` it frees its working memory after each
    run."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    options.enable_cpu_mem_arena = keep_memory
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        model, options, providers=['CPUExecutionProvider'])


def _openvino_model(data, settings, keep_memory):
    import openvino
    core = openvino.Core()
    config = {
        'INFERENCE_PRECISION_HINT':
        'bf16' if settings.precision == 'bf16' else 'f32'
    }
    if settings.threads:
        config['INFERENCE_NUM_THREADS'] = settings.threads
    compiled = core.compile_model(core.read_model(data), 'CPU', config)

    def run(images):
        results = compiled({INPUT: images})
        outputs = results['logits'], results['labels']
        if not keep_memory:
            compiled.release_memory()
        return outputs

    return run


def _onnxruntime_model(data, settings, keep_memory):
    session = onnxruntime_session(data, settings.threads, keep_memory)
    return lambda images: session.run(None, {INPUT: images})


class SegmentationEngine:
    """An exported segmentor on an inference engine.

    Args:
        model (str | bytes | ModelFile): An ONNX file (or its bytes, or
            it as :func:`~mmrepvgg.deploy.model_info.read_model` read it)
            written by :func:`mmrepvgg.deploy.export.export_onnx`.
        settings (EngineSettings): Engine, precision and threads.
        keep_memory (bool): Keep the engine's working memory from one run
            to the next, for speed. Without it the memory is freed after
            each run, for checks and single large images. Defaults to True.

    Attributes:
        info (ExportedModelInfo): The model's metadata: classes, palette,
            input size.

    Raises:
        MMRepVGGError: Bad settings, a model file that is not such a model,
            or one the engine refuses.
    """

    def __init__(self, model, settings=EngineSettings(), keep_memory=True):
        self.settings = settings.check()
        if not isinstance(model, ModelFile):
            model = read_model(model)
        self.info, self.name = model.info, model.name
        make = (
            _openvino_model
            if settings.backend == 'openvino' else _onnxruntime_model)
        self._run = self._guarded(make, model.data, settings, keep_memory)

    def _guarded(self, function, *args):
        try:
            return function(*args)
        except _engine_errors() as error:
            raise UsageError(f'{self.name}: {self.settings.backend} cannot '
                             f'run it ({_reason(error)})') from error

    def __call__(self, images):
        """Logits and labels of a float32 ``(N, 3, H, W)`` batch of BGR
        values 0-255 that the model takes (its input size, if it has one).
        """
        return self._guarded(self._run,
                             np.ascontiguousarray(images, np.float32))

    def model_size(self, size):
        """The size the model runs an image of ``size`` at: its input size,
        or for a model of any size, ``size`` brought within
        :data:`RUN_PIXELS`."""
        if self.info.input_size:
            return tuple(self.info.input_size)
        return fit_within(size, RUN_PIXELS)

    def logits(self, images):
        """Logits of a float32 BGR batch of any size: resized to the
        model's size and back, as mmseg resizes logits.

        Args:
            images (Tensor): ``(N, 3, H, W)``.

        Returns:
            Tensor: ``(N, C, H, W)`` logits.
        """
        size = tuple(images.shape[-2:])
        model_size = self.model_size(size)
        if model_size != size:
            images = F.interpolate(images, size=model_size, mode='bilinear')
        logits = torch.from_numpy(self(images.numpy())[0])
        if tuple(logits.shape[-2:]) != size:
            logits = F.interpolate(
                logits,
                size=size,
                mode='bilinear',
                align_corners=self.info.align_corners)
        return logits

    def predict(self, image):
        """The label map of one image as ``mmcv.imread`` gives it
        (``(H, W, 3)`` BGR uint8), at the image's size.

        The model runs at :meth:`model_size`; its logits are brought to the
        image's size a band of rows at a time, so that memory stays bounded
        however large the image (within
        :data:`~mmrepvgg.deploy.images.MAX_IMAGE_PIXELS`).
        """
        size = image.shape[:2]
        logits = self(as_batch(image, self.model_size(size)).numpy())[0]
        return self._labels(torch.from_numpy(logits[0]), size)

    def _labels(self, logits, size):
        """The argmax of ``(C, h, w)`` logits resized bilinearly to
        ``size``, as mmseg resizes them, a band of rows at a time."""
        height, width = size
        dtype = np.uint8 if len(logits) <= 256 else np.int32
        if tuple(logits.shape[1:]) == tuple(size):
            return logits.argmax(0).numpy().astype(dtype)
        columns = _source_coordinates(width, logits.shape[2],
                                      self.info.align_corners)
        rows = _source_coordinates(height, logits.shape[1],
                                   self.info.align_corners)
        labels = np.empty(size, dtype)
        for start in range(0, height, _LABEL_ROWS):
            band = rows[start:start + _LABEL_ROWS]
            grid = torch.stack(
                torch.broadcast_tensors(columns[None], band[:, None]), dim=-1)
            resized = F.grid_sample(
                logits[None],
                grid[None],
                mode='bilinear',
                padding_mode='border',
                align_corners=self.info.align_corners)
            labels[start:start + len(band)] = resized[0].argmax(0).numpy()
        return labels


def _source_coordinates(size, length, align_corners):
    """Where each of ``size`` resized samples reads a ``length``-sample
    axis, as ``F.interpolate`` maps them, in ``F.grid_sample``'s
    normalized coordinates."""
    samples = torch.arange(size, dtype=torch.float64)
    if align_corners:
        source = samples * ((length - 1) / max(size - 1, 1))
        return (2 * source / max(length - 1, 1) - 1).float()
    source = ((samples + 0.5) * (length / size) - 0.5).clamp(min=0)
    return ((2 * source + 1) / length - 1).float()


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
        precision (str): ``'fp32'`` or ``'bf16'`` (OpenVINO).
        threads (int): Engine threads; 0 for the engine's choice.
        data_preprocessor (dict, optional): Ignored: the Runner passes the
            config's, which would normalize the images a second time.
        init_cfg (dict, optional): Unused; there is nothing to initialize.
    """

    def __init__(self,
                 model,
                 backend='onnxruntime',
                 precision='fp32',
                 threads=0,
                 data_preprocessor=None,
                 init_cfg=None):
        super().__init__(
            data_preprocessor=dict(type='SegDataPreProcessor'),
            init_cfg=init_cfg)
        self.engine = SegmentationEngine(
            model, EngineSettings(backend, precision, threads))
        self.align_corners = self.engine.info.align_corners

    def predict(self, inputs, data_samples=None):
        return self.postprocess_result(
            self.engine.logits(inputs), data_samples)

    def _only_predicts(self, *args, **kwargs):
        raise NotImplementedError('an exported segmentor only predicts')

    loss = extract_feat = encode_decode = _forward = _only_predicts
