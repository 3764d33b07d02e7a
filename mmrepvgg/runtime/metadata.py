"""What an exported segmentor's metadata says, as typed records, and the
checks that a model's metadata must pass before anything runs it.

Metadata comes from a file that may come from anyone: each value is JSON
of bounded size and depth, parsed into a record and checked field by
field. Anything else is one line that names the file and what is wrong.
"""
import json
import math
from dataclasses import asdict, dataclass, field, fields
from typing import List, Optional, Tuple

from ..errors import MetadataError, first_line
from ..version import __version__

__all__ = [
    'MIN_SIZE', 'MAX_SIZE', 'INT8_SCHEMES', 'INTERPOLATIONS',
    'plain_data_problem', 'DatasetMeta', 'ConvSensitivity', 'ResizeStep',
    'InferenceMode', 'ExportedModelInfo'
]

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
# More classes than any dataset has; a longer list is not metadata.
_MAX_CLASSES = 65536
_JSON_VALUES = (str, int, float, bool, type(None))
# mmcv's names of OpenCV's interpolations (mmcv.image.geometric).
INTERPOLATIONS = ('nearest', 'bilinear', 'bicubic', 'area', 'lanczos')
_MODES = ('whole', 'slide')


def plain_data_problem(value, max_depth, leaf_types):
    """What keeps ``value`` from being plain data (dicts with string keys,
    lists and tuples, of ``leaf_types``, nested at most ``max_depth``
    deep), as words that follow "it"; None if nothing does. It is walked
    without recursion, so no nesting can exhaust the stack."""
    stack = [(value, 1)]
    while stack:
        node, depth = stack.pop()
        if depth > max_depth:
            return f'is nested deeper than {max_depth} levels'
        if isinstance(node, dict):
            if not all(isinstance(k, str) for k in node):
                return 'has keys that are not strings'
            stack += [(v, depth + 1) for v in node.values()]
        elif isinstance(node, (list, tuple)):
            stack += [(v, depth + 1) for v in node]
        elif not isinstance(node, leaf_types):
            return f'holds a {type(node).__name__}'
    return None


@dataclass(frozen=True)
class DatasetMeta:
    """The classes a model predicts, and the colour of each.

    Attributes:
        classes (tuple[str]): Class names, one per logit channel.
        palette (tuple[tuple[int]]): An RGB colour (0-255) per class, or
            none at all.
    """
    classes: Tuple[str, ...]
    palette: Tuple[Tuple[int, int, int], ...] = ()

    @classmethod
    def parse(cls, value, source):
        """Check mmseg's ``dataset_meta`` (``classes``, optional
        ``palette``) and make a record of it.

        Raises:
            MetadataError: Anything else; ``source`` names the file.
        """
        if not isinstance(value, dict):
            raise MetadataError(f'{source}: its dataset metadata is a '
                                f'{type(value).__name__}, not a dict')
        classes = value.get('classes')
        if not (isinstance(classes,
                           (list, tuple)) and 0 < len(classes) <= _MAX_CLASSES
                and all(isinstance(c, str) for c in classes)):
            raise MetadataError(f'{source}: its classes are not a list of '
                                f'1 to {_MAX_CLASSES} names')
        palette = value.get('palette')
        if palette is None or len(palette) == 0:
            palette = ()
        return cls(
            tuple(classes), _parse_palette(palette, len(classes), source))


def _parse_palette(palette, count, source):
    if not palette:
        return ()
    if not (hasattr(palette, '__len__') and len(palette) == count):
        raise MetadataError(f'{source}: its palette does not hold one colour '
                            f'for each of its {count} classes')
    colours = []
    for colour in palette:
        if not (hasattr(colour, '__len__') and len(colour) == 3
                and all(_is_byte(value) for value in colour)):
            raise MetadataError(f'{source}: its palette holds {colour!r:.40},'
                                ' not an RGB colour of three integers 0-255')
        colours.append(tuple(int(value) for value in colour))
    return tuple(colours)


def _is_byte(value):
    # numpy integers too (a palette read from a checkpoint), not booleans.
    return (hasattr(value, '__index__') and not isinstance(value, bool)
            and 0 <= int(value) <= 255)


def _size_pair(value):
    return (isinstance(value, list) and len(value) == 2
            and all(type(s) is int and 1 <= s <= MAX_SIZE for s in value))


@dataclass
class ConvSensitivity:
    """How far one convolution's output moves when it alone computes in
    int8.

    Attributes:
        conv (str): The conv's module name (its weight's name without
            ``.weight``).
        error (float): ``sum (q - f)^2 / sum f^2`` of its output ``q``
            from its inputs and weights in int8 (every operator before it
            in fp32) and its fp32 output ``f``, on the first calibration
            images.
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
class ResizeStep:
    """The test pipeline's resize, as mmcv's ``Resize`` does it with
    OpenCV: to ``scale``, or within it with the image's aspect ratio.

    Attributes:
        scale (list[int]): ``(width, height)``, as mmcv writes it.
        keep_ratio (bool): Rescale within ``scale`` (``mmcv.imrescale``)
            instead of to it (``mmcv.imresize``).
        interpolation (str): One of :data:`INTERPOLATIONS`.
    """
    scale: List[int]
    keep_ratio: bool = False
    interpolation: str = 'bilinear'

    @classmethod
    def parse(cls, value):
        """The record of a metadata value, or None if it is not one."""
        if not (isinstance(value, dict) and set(value)
                == {f.name
                    for f in fields(cls)} and _size_pair(value['scale'])
                and isinstance(value['keep_ratio'], bool)
                and value['interpolation'] in INTERPOLATIONS):
            return None
        return cls(**value)


@dataclass
class InferenceMode:
    """How mmseg runs the model over an image (the config's
    ``model.test_cfg``).

    Attributes:
        mode (str): ``'whole'``: the image at once; ``'slide'``: windows of
            ``crop_size`` every ``stride``, their logits averaged where
            they overlap.
        crop_size (list[int], optional): ``(height, width)`` of a window.
        stride (list[int], optional): ``(height, width)`` between windows.
    """
    mode: str = 'whole'
    crop_size: Optional[List[int]] = None
    stride: Optional[List[int]] = None

    @classmethod
    def parse(cls, value):
        """The record of a metadata value, or None if it is not one."""
        if not (isinstance(value, dict) and set(value)
                <= {f.name
                    for f in fields(cls)} and value.get('mode') in _MODES):
            return None
        mode = cls(**value)
        slide = mode.mode == 'slide'
        if slide != (mode.crop_size is not None) or slide != (mode.stride
                                                              is not None):
            return None
        if slide and not (_size_pair(mode.crop_size)
                          and _size_pair(mode.stride)):
            return None
        return mode


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
        resize (ResizeStep, optional): The test pipeline's resize; None
            (and in files written before it was recorded): none.
        test_mode (InferenceMode): Whole-image or sliding-window inference;
            whole in files written before it was recorded.
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
    resize: Optional[ResizeStep] = None
    test_mode: InferenceMode = field(default_factory=InferenceMode)
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
        _parse_records(values, source)
        info = cls(**values)
        info._check(source)
        return info

    def _check(self, source):
        checks = (
            ('align_corners', isinstance(self.align_corners, bool)),
            ('input_size', self.input_size is None or
             (_size_pair(self.input_size)
              and min(self.input_size) >= MIN_SIZE)),
            ('precision', self.precision in _PRECISIONS),
            ('calibration', isinstance(self.calibration, dict)),
            ('agreement', isinstance(self.agreement, dict)),
            ('int8_scheme', self.int8_scheme in ('', *INT8_SCHEMES)),
            ('float_convs', _names(self.float_convs)),
            ('equalized_pairs', type(self.equalized_pairs) is int
             and 0 <= self.equalized_pairs <= _MAX_CONVS),
        ) + tuple(
            (name, isinstance(getattr(self, name), str))
            for name in ('source', 'source_sha256', 'config', 'mmrepvgg'))
        for name, ok in checks:
            if not ok:
                _refuse(source, name, getattr(self, name))


def _parse_records(values, source):
    """Replace the values of the record fields by their records."""
    if values.get('resize') is not None:
        values['resize'] = _record(ResizeStep, values['resize'], 'resize',
                                   source)
    if 'test_mode' in values:
        values['test_mode'] = _record(InferenceMode, values['test_mode'],
                                      'test_mode', source)
    sensitivity = values.get('sensitivity', [])
    if not (isinstance(sensitivity, list) and len(sensitivity) <= _MAX_CONVS):
        _refuse(source, 'sensitivity', sensitivity)
    values['sensitivity'] = [
        _record(ConvSensitivity, s, 'sensitivity', source) for s in sensitivity
    ]


def _record(record_cls, value, name, source):
    record = record_cls.parse(value)
    if record is None:
        _refuse(source, name, value)
    return record


def _refuse(source, name, value):
    raise MetadataError(f'{source}: its metadata {name} is {value!r:.60}')


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
