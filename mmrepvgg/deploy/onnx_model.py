"""An exported segmentor's file: its metadata, the images it takes, and
an ONNX Runtime session that runs it."""
import json
from dataclasses import asdict, dataclass, field
from typing import List, Optional

import mmcv
import numpy as np
import torch

from ..errors import UsageError, first_line
from ..version import __version__
from .verify import check_image_file


@dataclass
class ExportedModelInfo:
    """What an exported model's metadata says, as ONNX ``metadata_props``
    of JSON values.

    Attributes:
        classes (list[str]): Class names, one per logit channel.
        palette (list[list[int]]): An RGB colour per class.
        input_size (list[int], optional): ``(height, width)`` the model
            takes; None if it takes any size.
        align_corners (bool): How the logits are resized, as mmseg does.
        precision (str): ``'fp32'`` or ``'int8'``.
        source (str): The checkpoint's file name.
        source_sha256 (str): The checkpoint's SHA-256.
        config (str): The config's file name.
        mmrepvgg (str): The version that exported the model.
        calibration (dict): For int8 models: the split and number of the
            images its activation ranges were calibrated on.
        agreement (dict): For int8 models: its agreement with the fp32
            model (:class:`mmrepvgg.deploy.quantize.Agreement`).
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

    def to_props(self):
        return {key: json.dumps(value) for key, value in asdict(self).items()}

    @classmethod
    def from_props(cls, props):
        names = cls.__dataclass_fields__
        return cls(**{
            key: json.loads(value)
            for key, value in props.items() if key in names
        })


def set_info(proto, info):
    """Store :class:`ExportedModelInfo` in a model's metadata, replacing
    what it had."""
    import onnx
    del proto.metadata_props[:]
    onnx.helper.set_model_props(proto, info.to_props())


def read_model_info(model):
    """The metadata and graph of an exported model (a path or bytes).

    Returns:
        tuple[ExportedModelInfo, onnx.ModelProto]: Its metadata and graph.

    Raises:
        UsageError: No ONNX model, or one that mmrepvgg did not export.
    """
    import onnx
    try:
        proto = (
            onnx.load_from_string(model)
            if isinstance(model, bytes) else onnx.load(model))
    except Exception as error:  # protobuf and file errors alike
        name = 'the model' if isinstance(model, bytes) else model
        raise UsageError(
            f'{name}: not a readable ONNX model ({first_line(error)})'
        ) from None
    props = {p.key: p.value for p in proto.metadata_props}
    if 'classes' not in props:
        raise UsageError('the ONNX model was not exported by mmrepvgg (its '
                         'metadata names no classes)')
    return ExportedModelInfo.from_props(props), proto


def onnxruntime_session(model, threads=None):
    """An ONNX Runtime CPU session for model bytes or a path."""
    import onnxruntime
    options = onnxruntime.SessionOptions()
    options.log_severity_level = 3
    if threads:
        options.intra_op_num_threads = threads
    return onnxruntime.InferenceSession(
        model, options, providers=['CPUExecutionProvider'])


def load_image(path):
    """An image file as ``mmcv.imread`` reads it: ``(H, W, 3)`` BGR uint8.

    Raises:
        UsageError: The file is missing, unreadable or too large.
    """
    check_image_file(path)
    try:
        image = mmcv.imread(path)
    except Exception as error:  # decoders fail in many ways
        raise UsageError(
            f'{path}: not a readable image ({first_line(error)})') from None
    if image is None:
        raise UsageError(f'{path}: not a readable image')
    return image


def as_batch(image, size=None):
    """An ``(H, W, 3)`` image as the exported model takes it: a float32
    ``(1, 3, H, W)`` batch, resized to ``size`` (height, width) if given."""
    if size is not None:
        image = mmcv.imresize(image, tuple(size[::-1]))
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]
