"""An exported segmentor's file: what its metadata says, and the checks
that make a file one that the engines can run.

A model file may come from anyone: it is read without its external data,
its metadata is parsed with limits on size and depth into a typed record,
and its graph must take ``images`` and give ``logits`` and ``labels`` as
:func:`mmrepvgg.deploy.export.export_onnx` writes them. Anything else is
one line that names the file and what is wrong.
"""
import json
import math
import os.path as osp
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional

from ..checkpoint import plain_data_problem
from ..errors import MetadataError, UsageError, first_line
from ..version import __version__
from .loading import DatasetMeta

__all__ = [
    'INPUT', 'OUTPUTS', 'MAX_MODEL_BYTES', 'INT8_SCHEMES', 'ConvSensitivity',
    'ExportedModelInfo', 'ModelFile', 'set_info', 'read_model'
]

INPUT = 'images'
OUTPUTS = ('logits', 'labels')
# Protocol buffers cannot hold more in one file.
MAX_MODEL_BYTES = 2**31 - 1
# Limits of the metadata: far above what an export writes.
_MAX_VALUE_CHARS = 1 << 20
_MAX_DEPTH = 16
# The input sizes an exported model may have (its height and width).
MIN_SIZE, MAX_SIZE = 8, 16384
_PRECISIONS = ('fp32', 'int8')
# How int8 activations are stored: see mmrepvgg.quantization.ptq.
INT8_SCHEMES = ('cpu', 'tensorrt')
# Far above the convolutions of any model we export.
_MAX_CONVS = 4096
_JSON_VALUES = (str, int, float, bool, type(None))
# ONNX element types: FLOAT, INT64.
_FLOAT, _INT64 = 1, 7


@dataclass
class ConvSensitivity:
    """How much one convolution alone moves an int8 model's logits.

    Attributes:
        conv (str): The conv's module name (its weight's name without
            ``.weight``).
        error (float): ``sum (q - f)^2 / sum f^2`` of the logits ``q``
            with this conv alone in int8 and the fp32 logits ``f``, on
            the calibration images.
    """
    conv: str
    error: float

    @classmethod
    def parse(cls, value):
        """The record of a metadata value, or None if it is not one."""
        if not (isinstance(value, dict) and set(value) == {'conv', 'error'}
                and isinstance(value['conv'], str)
                and type(value['error']) in (int, float)
                and math.isfinite(value['error']) and value['error'] >= 0):
            return None
        return cls(value['conv'], float(value['error']))


@dataclass
class ExportedModelInfo:
    """What an exported model's metadata says, as ONNX ``metadata_props``
    of JSON values.

    Attributes:
        classes (list[str]): Class names, one per logit channel.
        palette (list[list[int]]): An RGB colour per class (or none).
        input_size (list[int], optional): ``(height, width)`` the model
            takes; None if it takes any size.
        align_corners (bool): How the logits are resized, as mmseg does.
        precision (str): ``'fp32'`` or ``'int8'``.
        source (str): The checkpoint's file name.
        source_sha256 (str): The SHA-256 of the checkpoint's bytes.
        config (str): The config's file name.
        mmrepvgg (str): The version that exported the model.
        calibration (dict): For int8 models: the split and number of the
            images its activation ranges were calibrated on.
        agreement (dict): For int8 models: its agreement with the fp32
            model (:class:`mmrepvgg.quantization.agreement.Agreement`).
        int8_scheme (str): For int8 models: how activations are stored,
            one of :data:`INT8_SCHEMES`.
        float_convs (list[str]): For int8 models: the convs kept in fp32,
            most sensitive first.
        sensitivity (list[ConvSensitivity]): For int8 models: every conv,
            most sensitive first.
        equalized_pairs (int): For int8 models: the pairs of backbone
            convs whose channels were equalized before calibration
            (:mod:`mmrepvgg.models.equalization`).
    """
    classes: List[str]
    palette: List[List[int]]
    input_size: Optional[List[int]]
    align_corners: bool
    precision: str = 'fp32'
    source: str = ''
    source_sha256: str = ''
    config: str = ''
    mmrepvgg: str = __version__
    calibration: dict = field(default_factory=dict)
    agreement: dict = field(default_factory=dict)
    int8_scheme: str = ''
    float_convs: List[str] = field(default_factory=list)
    sensitivity: List[ConvSensitivity] = field(default_factory=list)
    equalized_pairs: int = 0

    def to_props(self):
        return {key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_props(cls, props, source='the model'):
        """Parse and check ``metadata_props`` (a dict of JSON strings).

        Raises:
            MetadataError: Missing, oversized, too deeply nested or
                ill-typed metadata; ``source`` names the model.
        """
        if 'classes' not in props:
            raise MetadataError(f'{source}: not exported by mmrepvgg (its '
                                'metadata names no classes)')
        values = {
            f.name: _parse_json(props[f.name], f.name, source)
            for f in fields(cls) if f.name in props
        }
        dataset = DatasetMeta.parse(
            dict(classes=values['classes'], palette=values.get('palette')),
            source)
        values.update(
            classes=list(dataset.classes),
            palette=[list(c) for c in dataset.palette])
        for name in ('align_corners', 'input_size'):
            if name not in values:
                raise MetadataError(f'{source}: its metadata has no {name}')
        info = cls(**values)
        info._check(source)
        info.sensitivity = [ConvSensitivity.parse(s) for s in info.sensitivity]
        return info

    def _check(self, source):
        checks = (
            ('align_corners', isinstance(self.align_corners, bool)),
            ('input_size', self.input_size is None or
             (isinstance(self.input_size, list) and len(self.input_size) == 2
              and all(
                  type(s) is int and MIN_SIZE <= s <= MAX_SIZE
                  for s in self.input_size))),
            ('precision', self.precision in _PRECISIONS),
            ('calibration', isinstance(self.calibration, dict)),
            ('agreement', isinstance(self.agreement, dict)),
            ('int8_scheme', self.int8_scheme in ('', *INT8_SCHEMES)),
            ('float_convs', _names(self.float_convs)),
            ('sensitivity', isinstance(self.sensitivity, list)
             and len(self.sensitivity) <= _MAX_CONVS
             and all(ConvSensitivity.parse(s) for s in self.sensitivity)),
            ('equalized_pairs', type(self.equalized_pairs) is int
             and 0 <= self.equalized_pairs <= _MAX_CONVS),
        ) + tuple(
            (name, isinstance(getattr(self, name), str))
            for name in ('source', 'source_sha256', 'config', 'mmrepvgg'))
        for name, ok in checks:
            if not ok:
                raise MetadataError(f'{source}: its metadata {name} is '
                                    f'{getattr(self, name)!r:.60}')


def _names(value):
    return (isinstance(value, list) and len(value) <= _MAX_CONVS
            and all(isinstance(v, str) for v in value))


def _parse_json(text, name, source):
    if not isinstance(text, str) or len(text) > _MAX_VALUE_CHARS:
        raise MetadataError(f'{source}: its metadata {name} is longer than '
                            f'{_MAX_VALUE_CHARS:,} characters')
    try:
        value = json.loads(text)
    except (ValueError, RecursionError) as error:
        raise MetadataError(f'{source}: its metadata {name} is not JSON '
                            f'({first_line(error)})') from error
    problem = plain_data_problem(value, _MAX_DEPTH, _JSON_VALUES)
    if problem:
        raise MetadataError(f'{source}: its metadata {name} {problem}')
    return value


def set_info(proto, info):
    """Store :class:`ExportedModelInfo` in a model's metadata, replacing
    what it had."""
    import onnx
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_props())


@dataclass
class ModelFile:
    """An exported model as read and checked.

    Attributes:
        name (str): The file, or ``'the model'`` for bytes.
        data (bytes): Its bytes, as the engines take them.
        proto (onnx.ModelProto): Its graph.
        info (ExportedModelInfo): Its metadata.
    """
    name: str
    data: bytes
    proto: object
    info: ExportedModelInfo


def read_model(model):
    """An exported model's bytes, graph and metadata, checked.

    Args:
        model (str | bytes): An ONNX file or its bytes.

    Returns:
        ModelFile: The model.

    Raises:
        UsageError: No readable ONNX model, or one with external data.
        MetadataError: Its metadata or graph is not that of a model that
            :func:`~mmrepvgg.deploy.export.export_onnx` writes.
    """
    name = 'the model' if isinstance(model, bytes) else model
    data = model if isinstance(model, bytes) else _read(model)
    proto = _parse(data, name)
    info = ExportedModelInfo.from_props(
        {p.key: p.value
         for p in proto.metadata_props}, name)
    _check_graph(proto, info, name)
    return ModelFile(name, data, proto, info)


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


def _parse(data, name):
    import onnx
    from google.protobuf.message import DecodeError
    try:
        proto = onnx.load_from_string(data)
    except (DecodeError, ValueError, RuntimeError) as error:
        raise UsageError(
            f'{name}: not a readable ONNX model ({first_line(error)})'
        ) from error
    # External data could name any file on this machine: it is never read.
    if any(t.data_location == onnx.TensorProto.EXTERNAL
           for t in proto.graph.initializer):
        raise UsageError(f'{name}: keeps weights in external files, which '
                         'are not read')
    return proto


def _dims(value):
    shape = value.type.tensor_type.shape
    return [
        d.dim_value if d.HasField('dim_value') else None for d in shape.dim
    ]


def _check_graph(proto, info, name):
    initializers = {t.name for t in proto.graph.initializer}
    inputs = [i for i in proto.graph.input if i.name not in initializers]
    outputs = {o.name: o for o in proto.graph.output}
    expected = [(INPUT, inputs[0] if len(inputs) == 1 else None, _FLOAT, 4)]
    expected += [(n, outputs.get(n), t, r)
                 for n, t, r in zip(OUTPUTS, (_FLOAT, _INT64), (4, 3))]
    for value_name, value, elem_type, rank in expected:
        if (value is None or value.name != value_name
                or value.type.tensor_type.elem_type != elem_type
                or len(_dims(value)) != rank):
            raise MetadataError(
                f'{name}: not a segmentor as mmrepvgg exports them (it must '
                f"take one rank-4 float32 '{INPUT}' and give rank-4 float32 "
                "'logits' and rank-3 int64 'labels')")
    height_width = _dims(inputs[0])[2:]
    wanted = info.input_size or [None, None]
    if height_width != wanted:
        raise MetadataError(
            f'{name}: its graph takes inputs of {_size(height_width)}, its '
            f'metadata says {_size(wanted)}')
    channels = _dims(outputs['logits'])[1]
    if channels not in (None, len(info.classes)):
        raise MetadataError(f'{name}: gives {channels} logits per pixel for '
                            f'{len(info.classes)} classes')


def _size(dims):
    if dims == [None, None]:
        return 'any size'
    return 'x'.join('?' if d is None else str(d) for d in dims)
