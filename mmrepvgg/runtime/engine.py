"""Running an exported segmentor's graph on ONNX Runtime or OpenVINO.

:class:`SegmentationEngine` takes float32 image batches as the graph does
and returns its logits and labels; whatever the engine says when it
refuses or fails to run a model becomes one line.
"""
import os
from dataclasses import dataclass, field

import numpy as np

from ..errors import UsageError, first_line
from .model_file import INPUT, read_model

__all__ = [
    'BACKENDS', 'PRECISIONS', 'available_cores', 'bf16_available',
    'EngineSettings', 'onnxruntime_session', 'SegmentationEngine'
]

BACKENDS = ('onnxruntime', 'openvino')
# bf16 is OpenVINO's default on CPUs with bf16 units, and changes labels:
# it runs only when asked. An int8 model is int8 at any precision.
PRECISIONS = ('fp32', 'bf16')


def available_cores():
    """The cores this process may run on."""
    if hasattr(os, 'sched_getaffinity'):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


@dataclass(frozen=True)
class EngineSettings:
    """How an exported model runs.

    Attributes:
        backend (str): ``'onnxruntime'`` or ``'openvino'``.
        precision (str): ``'fp32'``, or ``'bf16'`` (OpenVINO only; an int8
            model's int8 layers stay int8 at either).
        threads (int): Threads the engine may use, at most the cores this
            process may run on; 0 for the engine's choice.
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
        # More threads than cores only wait on each other (ONNX Runtime
        # with 1000 of them never finishes a run): refused, not capped.
        if self.threads > available_cores():
            raise UsageError(f'threads must be at most {available_cores()}, '
                             'the cores this process may run on, got '
                             f'{self.threads}')
        return self


# oneDNN instruction sets with bf16 arithmetic, for ONEDNN_MAX_CPU_ISA.
_BF16_ISAS = ('AVX512_CORE_BF16', 'AVX512_CORE_FP16', 'AVX512_CORE_AMX',
              'AVX512_CORE_AMX_FP16', 'AVX10_1_512', 'AVX10_1_512_AMX',
              'AVX10_1_512_AMX_FP16', 'ALL', 'DEFAULT')


def bf16_available():
    """Whether OpenVINO can run bf16 here: the CPU has bf16 units, and
    ``ONEDNN_MAX_CPU_ISA`` (which OpenVINO's oneDNN obeys, though its
    report of the CPU does not) allows them."""
    try:
        import openvino
    except ImportError:
        return False
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
    try:
        import openvino
    except ImportError:
        raise UsageError('OpenVINO is not installed: pip install '
                         '"mmrepvgg[openvino]"') from None
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
    """An exported segmentor's graph on an inference engine.

    Args:
        model (str | bytes | ModelFile): An ONNX file (or its bytes, or
            it as :func:`~mmrepvgg.runtime.model_file.read_model` read it)
            exported by mmrepvgg.
        settings (EngineSettings): Engine, precision and threads.
        keep_memory (bool): Keep the engine's working memory from one run
            to the next, for speed. Without it the memory is freed after
            each run, for checks and single large images. Defaults to True.

    Attributes:
        info (ExportedModelInfo): The model's metadata.
        name (str): The model's file, for messages.

    Raises:
        MMRepVGGError: Bad settings, a model file that is not such a model,
            or one the engine refuses.
    """

    def __init__(self, model, settings=EngineSettings(), keep_memory=True):
        self.settings = settings.check()
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
