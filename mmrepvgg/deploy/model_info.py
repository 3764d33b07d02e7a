"""Writing an exported segmentor's metadata into its graph.

What the metadata says, and the checks of a model file, are the runtime's
(:mod:`mmrepvgg.runtime.metadata`, :mod:`mmrepvgg.runtime.model_file`):
they are imported from there, so that reading a model needs neither onnx
nor torch. Writing it needs onnx.
"""
from ..runtime.metadata import INT8_SCHEMES, ConvSensitivity, ExportedModelInfo
from ..runtime.model_file import (INPUT, MAX_MODEL_BYTES, OUTPUTS, ModelFile,
                                  read_model)

__all__ = [
    'INPUT', 'OUTPUTS', 'MAX_MODEL_BYTES', 'INT8_SCHEMES', 'ConvSensitivity',
    'ExportedModelInfo', 'ModelFile', 'set_info', 'read_model'
]


def set_info(proto, info):
    """Store :class:`ExportedModelInfo` in a model's metadata, replacing
    what it had."""
    import onnx
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_props())
