"""Running exported segmentors without torch, mmcv, mmengine or mmseg.

Imports only numpy, OpenCV and an inference engine (ONNX Runtime, or
OpenVINO), and predicts what ``mmseg.apis.inference_model`` predicts on
the model that was exported::

    from mmrepvgg.runtime import Segmenter
    labels = Segmenter('model.onnx')('image.png')

One module per concept:

- :mod:`.metadata`: what a model's metadata says, as typed records;
- :mod:`.model_file`: reading and checking a model file;
- :mod:`.engine`: ONNX Runtime and OpenVINO;
- :mod:`.images`: reading images as mmseg does, with size limits;
- :mod:`.segmenter`: mmseg's resize, whole or sliding-window inference and
  postprocessing around the graph;
- :mod:`.infer`: the ``mmrepvgg-infer`` command.
"""
from .engine import BACKENDS, EngineSettings, SegmentationEngine
from .metadata import ExportedModelInfo
from .model_file import ModelFile, read_model
from .segmenter import Segmenter

__all__ = [
    'Segmenter', 'SegmentationEngine', 'EngineSettings', 'BACKENDS',
    'ExportedModelInfo', 'ModelFile', 'read_model'
]
