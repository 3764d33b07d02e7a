"""Calibrated post-training INT8 of exported segmentors.

An fp32 model written by :func:`mmrepvgg.deploy.export.to_onnx` becomes a
QDQ model (8-bit activations with zero points, per-channel 8-bit weights)
that ONNX Runtime and OpenVINO both run in int8. Its activation ranges are
calibrated on images of the config's training set, read through its test
pipeline; its agreement with the fp32 model is measured on images of the
validation set.

The choices were measured (a PSPNet-RepVGG-A0, 512x1024): MinMax ranges
agree with fp32 as well as entropy or percentile ones and take a third of
the time; OpenVINO computes wrong results with signed 8-bit activations
and runs unsigned weights in fp32, so activations are unsigned and weights
signed; the image normalization before the first conv and the resize and
argmax after the last one stay in fp32.
"""
import logging
import os.path as osp
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field

import torch

from ..errors import UsageError, VerificationError
from .compare import relative_error
from .engines import onnxruntime_session
from .images import split_images
from .model_info import set_info

__all__ = [
    'Agreement', 'Int8Settings', 'quantize_int8', 'measure_agreement',
    'int8_model'
]


@dataclass
class Agreement:
    """How an int8 model's predictions compare with its fp32 model's.

    Attributes:
        labels (float): The share of pixels with the same label.
        max_rel_error (float): The largest ``max|int8 - fp32| / max|fp32|``
            of the logits.
        images (int): The images compared on.
        split (str): The dataset split they came from.
    """
    labels: float
    max_rel_error: float
    images: int
    split: str

    def to_dict(self):
        return asdict(self)


@dataclass
class Int8Settings:
    """How :func:`export_onnx` quantizes to int8.

    Attributes:
        calib_num (int): Images of the config's training set that the
            activation ranges are calibrated on.
        eval_num (int): Images of the validation set that the agreement
            with fp32 is measured on.
        min_agreement (float): The share of pixels whose int8 label must
            equal the fp32 one, or nothing is written.
    """
    calib_num: int = field(
        default=16, metadata=dict(help='training images to calibrate on'))
    eval_num: int = field(
        default=8,
        metadata=dict(help='validation images to measure the agreement on'))
    min_agreement: float = field(
        default=0.99,
        metadata=dict(help="share of pixels whose int8 label must equal the "
                      "fp32 one"))

    def check(self):
        """Raise UsageError for settings that cannot be met."""
        if self.calib_num < 1 or self.eval_num < 1:
            raise UsageError('--calib-num and --eval-num must be at least 1')
        if not 0 <= self.min_agreement <= 1:
            raise UsageError(f'--min-agreement is a share of pixels, from 0 '
                             f'to 1; got {self.min_agreement}')


class _Batches:
    """An ONNX Runtime calibration data reader over image batches."""

    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {'images': batch.numpy()}

    def rewind(self):
        raise NotImplementedError('calibration reads its images once')


def _outer_nodes(proto):
    # The normalization before the first conv and the resize and argmax
    # after the last one.
    nodes = list(proto.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == 'Conv']
    return [n.name for n in nodes[:convs[0]] + nodes[convs[-1] + 1:]]


def quantize_int8(model, calibration):
    """An int8 QDQ model of an fp32 one.

    Args:
        model (bytes): The fp32 ONNX model.
        calibration (Sequence[Tensor]): Image batches the activation ranges
            are calibrated on.

    Returns:
        onnx.ModelProto: The int8 model, with the fp32 model's metadata.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    proto = onnx.load_from_string(model)
    # ONNX Runtime writes the model, and its calibration copy, to files.
    with _quiet_quantizer(), tempfile.TemporaryDirectory(
            prefix='mmrepvgg_int8_') as folder:
        out = osp.join(folder, 'int8.onnx')
        quantize_static(
            proto,
            out,
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType.QUInt8,
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=_outer_nodes(proto))
        return onnx.load(out)


@contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs advice on every run; a full temporary
    folder becomes one line."""
    import onnxruntime
    logger = logging.getLogger()
    level = logger.level
    logger.setLevel(logging.ERROR)
    onnxruntime.set_default_logger_severity(3)
    try:
        yield
    except OSError as error:
        raise UsageError(f'cannot quantize in {tempfile.gettempdir()} '
                         f'({error.strerror or error})') from error
    finally:
        logger.setLevel(level)
        onnxruntime.set_default_logger_severity(2)  # its default


def measure_agreement(int8, fp32, images, split):
    """:class:`Agreement` of two models on ONNX Runtime over ``images``."""
    sessions = [onnxruntime_session(m) for m in (int8, fp32)]
    same, total, error = 0, 0, 0.0
    for batch in images:
        (logits, labels), (ref_logits, ref_labels) = (
            s.run(None, {'images': batch.numpy()}) for s in sessions)
        same += int((labels == ref_labels).sum())
        total += labels.size
        error = max(
            error,
            relative_error(
                torch.from_numpy(logits), torch.from_numpy(ref_logits)))
    return Agreement(same / total, error, len(images), split)


def check_agreement(agreement, min_agreement):
    """Raise VerificationError if fewer labels agree than asked."""
    if not agreement.labels >= min_agreement:
        raise VerificationError(
            f'INT8 labels agree with fp32 on {agreement.labels:.2%} of the '
            f'pixels of {agreement.images} {agreement.split} image(s), below '
            f'the {min_agreement:.2%} asked; nothing written')


def int8_model(cfg, fp32, info, size, settings):
    """An int8 model of an fp32 one, calibrated and checked as ``settings``
    say, with its calibration and agreement in its metadata.

    Args:
        cfg (Config): The model's config, whose training set calibrates and
            whose validation set checks the int8 model.
        fp32 (bytes): The fp32 ONNX model.
        info (ExportedModelInfo): Its metadata; updated.
        size (tuple[int]): The model's input size.
        settings (Int8Settings): How to quantize.

    Returns:
        bytes: The int8 model.

    Raises:
        VerificationError: Its labels agree less than asked.
    """
    calibration = split_images(cfg, 'train', settings.calib_num, size)
    held_out = split_images(cfg, 'val', settings.eval_num, size)
    proto = quantize_int8(fp32, calibration)
    agreement = measure_agreement(proto.SerializeToString(), fp32, held_out,
                                  'val')
    check_agreement(agreement, settings.min_agreement)
    info.precision = 'int8'
    info.calibration = dict(split='train', images=len(calibration))
    info.agreement = agreement.to_dict()
    set_info(proto, info)
    return proto.SerializeToString()
