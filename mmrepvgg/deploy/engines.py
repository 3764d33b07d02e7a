"""Exported segmentors evaluated by mmengine's Runner with mmseg's datasets
and metrics (docs/deployment/engines.md). Running a model on an engine is
the runtime's (:mod:`mmrepvgg.runtime.engine`), imported from there.
"""
import torch
from mmseg.models.segmentors import BaseSegmentor
from mmseg.registry import MODELS

from ..runtime.engine import (BACKENDS, PRECISIONS, EngineSettings,
                              SegmentationEngine, bf16_available,
                              onnxruntime_session)
from ..runtime.segmenter import Segmenter

__all__ = [
    'BACKENDS', 'PRECISIONS', 'bf16_available', 'EngineSettings',
    'onnxruntime_session', 'SegmentationEngine', 'EngineSegmentor'
]


@MODELS.register_module()
class EngineSegmentor(BaseSegmentor):
    """An exported segmentor (the runtime's
    :class:`~mmrepvgg.runtime.segmenter.Segmenter`) behind mmseg's segmentor
    interface, for evaluation with mmengine's Runner and mmseg's metrics.

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
        self.segmenter = Segmenter(model,
                                   EngineSettings(backend, precision, threads))
        self.align_corners = self.segmenter.info.align_corners

    def predict(self, inputs, data_samples=None):
        logits, _ = self.segmenter.infer(inputs.numpy())
        return self.postprocess_result(torch.from_numpy(logits), data_samples)

    def _only_predicts(self, *args, **kwargs):
        raise NotImplementedError('an exported segmentor only predicts')

    loss = extract_feat = encode_decode = _forward = _only_predicts
