"""Writing an exported segmentor's metadata into its graph (with onnx).

What the metadata says, and reading a model file, are the runtime's
(:mod:`mmrepvgg.runtime.metadata`, :mod:`mmrepvgg.runtime.model_file`),
imported from there: reading a model needs neither onnx nor torch.
"""
from ..runtime.metadata import INT8_SCHEMES, ConvSensitivity, ExportedModelInfo
from ..runtime.model_file import INPUT, OUTPUTS, read_model

__all__ = [
    'INPUT', 'OUTPUTS', 'INT8_SCHEMES', 'ConvSensitivity', 'ExportedModelInfo',
    'set_info', 'read_model'
]


def set_info(proto, info):
    """Store :class:`ExportedModelInfo` in a model's metadata, replacing
    what it had."""
    import onnx
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_props())
