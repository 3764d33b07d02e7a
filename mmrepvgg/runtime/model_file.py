"""An exported segmentor's file, read and checked without the ``onnx``
package: its metadata, its external data and its inputs and outputs are
read from the protocol-buffer encoding directly.

A model file may come from anyone: it is read without its external data,
its metadata is parsed with limits (:mod:`.metadata`), and its graph must
take ``images`` and give ``logits`` and ``labels`` as mmrepvgg exports
them. Anything else is one line that names the file and what is wrong.
"""
import os.path as osp
from dataclasses import dataclass
from typing import List, Optional

from ..errors import MetadataError, UsageError
from .metadata import ExportedModelInfo

__all__ = ['INPUT', 'OUTPUTS', 'MAX_MODEL_BYTES', 'ModelFile', 'read_model']

INPUT = 'images'
OUTPUTS = ('logits', 'labels')
# Protocol buffers cannot hold more in one file.
MAX_MODEL_BYTES = 2**31 - 1
# ONNX element types: FLOAT, INT64; TensorProto.DataLocation.EXTERNAL.
_FLOAT, _INT64, _EXTERNAL = 1, 7, 1
# Field numbers of onnx.proto that are read.
_MODEL_GRAPH, _MODEL_METADATA = 7, 14
_GRAPH_INITIALIZER, _GRAPH_INPUT, _GRAPH_OUTPUT = 5, 11, 12
_TENSOR_NAME, _TENSOR_DATA_LOCATION = 8, 14


class _Truncated(ValueError):
    pass


def _varint(buffer, pos):
    value = shift = 0
    while True:
        if pos >= len(buffer) or shift > 63:
            raise _Truncated('a truncated or overlong varint')
        byte = buffer[pos]
        pos += 1
        value |= (byte & 0x7f) << shift
        if byte < 0x80:
            return value, pos
        shift += 7


def _fields(buffer):
    """``(number, value)`` of each field of an encoded message: varints as
    integers, everything else as a memoryview of its bytes."""
    pos = 0
    while pos < len(buffer):
        key, pos = _varint(buffer, pos)
        number, wire = key >> 3, key & 7
        if wire == 0:
            value, pos = _varint(buffer, pos)
        elif wire in (1, 5):
            length = 8 if wire == 1 else 4
            value, pos = buffer[pos:pos + length], pos + length
        elif wire == 2:
            length, pos = _varint(buffer, pos)
            value, pos = buffer[pos:pos + length], pos + length
        else:
            raise _Truncated(f'wire type {wire} of field {number}')
        if pos > len(buffer) or number == 0:
            raise _Truncated(f'field {number} runs past the end')
        yield number, value


def _text(value):
    return bytes(value).decode('utf-8', errors='replace')


def _repeated(buffer, number):
    return [value for n, value in _fields(buffer) if n == number]


def _last(buffer, number, default=None):
    values = _repeated(buffer, number)
    return values[-1] if values else default


@dataclass
class _ValueInfo:
    """An input or output of the graph: name, element type and shape (a
    dimension without a fixed size is None)."""
    name: str
    elem_type: int
    dims: List[Optional[int]]

    @classmethod
    def decode(cls, buffer):
        name = _text(_last(buffer, 1, b''))
        tensor = _last(_last(buffer, 2, b''), 1, b'')
        shape = _last(tensor, 2)
        dims = [] if shape is None else [
            _last(dim, 1) for dim in _repeated(shape, 1)
        ]
        return cls(name, _last(tensor, 1, 0), dims)


@dataclass
class ModelFile:
    """An exported model as read and checked.

    Attributes:
        name (str): The file, or ``'the model'`` for bytes.
        data (bytes): Its bytes, as the engines take them.
        info (ExportedModelInfo): Its metadata.
    """
    name: str
    data: bytes
    info: ExportedModelInfo

    @property
    def proto(self):
        """Its graph as an ``onnx.ModelProto`` (needs the ``onnx``
        package)."""
        import onnx
        return onnx.load_from_string(self.data)


def read_model(model):
    """An exported model's bytes and metadata, checked.

    Args:
        model (str | bytes | ModelFile): An ONNX file or its bytes (a
            ModelFile is returned as it is).

    Returns:
        ModelFile: The model.

    Raises:
        UsageError: No readable ONNX model, or one with external data.
        MetadataError: Its metadata or graph is not that of a model that
            mmrepvgg exports.
    """
    if isinstance(model, ModelFile):
        return model
    name = 'the model' if isinstance(model, bytes) else model
    data = model if isinstance(model, bytes) else _read(model)
    try:
        graph, props = _decode(memoryview(data), name)
        inputs = [_ValueInfo.decode(v) for v in _repeated(graph, _GRAPH_INPUT)]
        outputs = [
            _ValueInfo.decode(v) for v in _repeated(graph, _GRAPH_OUTPUT)
        ]
    except _Truncated as error:
        raise UsageError(
            f'{name}: not a readable ONNX model ({error})') from None
    info = ExportedModelInfo.from_props(props, name)
    _check_graph(graph, inputs, outputs, info, name)
    return ModelFile(name, data, info)


def _read(path):
    if not osp.isfile(path):
        raise UsageError(f'{path}: no such file')
    if osp.getsize(path) > MAX_MODEL_BYTES:
        raise UsageError(f'{path}: larger than an ONNX model can be')
    try:
        with open(path, 'rb') as f:
            return f.read()
    except OSError as error:
        raise UsageError(
            f'{path}: cannot read ({error.strerror or error})') from error


def _decode(data, name):
    """The encoded graph and the metadata of an encoded model."""
    props = {}
    for entry in _repeated(data, _MODEL_METADATA):
        props[_text(_last(entry, 1, b''))] = _text(_last(entry, 2, b''))
    graph = _last(data, _MODEL_GRAPH)
    if graph is None:
        raise _Truncated('it has no graph')
    # External data could name any file on this machine: it is never read.
    for tensor in _repeated(graph, _GRAPH_INITIALIZER):
        if _last(tensor, _TENSOR_DATA_LOCATION, 0) == _EXTERNAL:
            raise UsageError(f'{name}: keeps weights in external files, '
                             'which are not read')
    return graph, props


def _check_graph(graph, inputs, outputs, info, name):
    initializers = {
        _text(_last(t, _TENSOR_NAME, b''))
        for t in _repeated(graph, _GRAPH_INITIALIZER)
    }
    inputs = [i for i in inputs if i.name not in initializers]
    outputs = {o.name: o for o in outputs}
    expected = [(INPUT, inputs[0] if len(inputs) == 1 else None, _FLOAT, 4)]
    expected += [(n, outputs.get(n), t, r)
                 for n, t, r in zip(OUTPUTS, (_FLOAT, _INT64), (4, 3))]
    for value_name, value, elem_type, rank in expected:
        if (value is None or value.name != value_name
                or value.elem_type != elem_type or len(value.dims) != rank):
            raise MetadataError(
                f'{name}: not a segmentor as mmrepvgg exports them (it must '
                f"take one rank-4 float32 '{INPUT}' and give rank-4 float32 "
                "'logits' and rank-3 int64 'labels')")
    height_width = inputs[0].dims[2:]
    wanted = info.input_size or [None, None]
    if height_width != wanted:
        raise MetadataError(
            f'{name}: its graph takes inputs of {_size(height_width)}, its '
            f'metadata says {_size(wanted)}')
    channels = outputs['logits'].dims[1]
    if channels not in (None, len(info.classes)):
        raise MetadataError(f'{name}: gives {channels} logits per pixel for '
                            f'{len(info.classes)} classes')


def _size(dims):
    if dims == [None, None]:
        return 'any size'
    return 'x'.join('?' if d is None else str(d) for d in dims)
