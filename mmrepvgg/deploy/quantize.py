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
import os.path as osp
import tempfile
from dataclasses import asdict, dataclass

import numpy as np
import torch
from mmengine.dataset import Compose
from mmengine.registry import DATASETS

from ..config import inference_transforms
from ..errors import ConfigError, UsageError, VerificationError, first_line
from .onnx_model import as_batch, load_image, onnxruntime_session, set_info
from .verify import relative_error


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
    calib_num: int = 16
    eval_num: int = 8
    min_agreement: float = 0.99

    def check(self):
        """Raise UsageError for settings that cannot be met."""
        if self.calib_num < 1 or self.eval_num < 1:
            raise UsageError('--calib-num and --eval-num must be at least 1')
        if not 0 <= self.min_agreement <= 1:
            raise UsageError(f'--min-agreement is a share of pixels, from 0 '
                             f'to 1; got {self.min_agreement}')


def dataset_image_paths(cfg, split, count):
    """``count`` image files of a dataset split of the config, spread
    evenly over the split.

    Args:
        cfg (Config): A config with ``{split}_dataloader``.
        split (str): ``'train'``, ``'val'`` or ``'test'``.
        count (int): How many; fewer if the split is smaller.

    Raises:
        UsageError: ``count`` < 1, or the split lists no images (its data
            root missing or empty).
        ConfigError: The config has no such split.
    """
    if count < 1:
        raise UsageError(f'the number of {split} images must be at least 1, '
                         f'got {count}')
    loader = cfg.get(f'{split}_dataloader') or {}
    if 'dataset' not in loader:
        raise ConfigError(f'{cfg.filename}: has no {split}_dataloader dataset')
    dataset_cfg = dict(loader['dataset'], pipeline=[], lazy_init=False)
    try:
        dataset = DATASETS.build(dataset_cfg)
    except Exception as error:  # datasets fail in many ways on bad roots
        raise UsageError(f'no {split} images to read ({type(error).__name__}:'
                         f' {first_line(error)})') from None
    if not len(dataset):
        raise UsageError(f'the {split} split of {cfg.filename} lists no '
                         'images')
    chosen = np.linspace(0, len(dataset) - 1, min(count, len(dataset)))
    return [dataset.get_data_info(int(round(i)))['img_path'] for i in chosen]


def pipeline_images(cfg, paths, size):
    """Image files read through the config's test pipeline (annotations
    left out) and resized to ``size``, as the exported model takes them:
    float32 ``(1, 3, H, W)`` BGR batches."""
    pipeline = Compose(
        inference_transforms(cfg, leave_out=('LoadImage', 'LoadAnnotations')))
    batches = []
    for path in paths:
        image = load_image(path)
        shape = image.shape[:2]
        results = pipeline(
            dict(img=image, img_shape=shape, ori_shape=shape, img_path=path))
        batches.append(
            as_batch(results['inputs'].permute(1, 2, 0).numpy(), size))
    return batches


def split_images(cfg, split, count, size):
    """``count`` images of a dataset split of the config, spread evenly
    over it (:func:`dataset_image_paths`), as the exported model takes them
    (:func:`pipeline_images`)."""
    return pipeline_images(cfg, dataset_image_paths(cfg, split, count), size)


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
    with tempfile.TemporaryDirectory(prefix='mmrepvgg_int8_') as folder:
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
