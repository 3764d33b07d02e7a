"""Exporting mmseg segmentors to ONNX, verified on ONNX Runtime first.

The exported model is self-contained: it takes images as ``mmcv.imread``
gives them and returns logits and labels (see
:class:`mmrepvgg.deploy.logits.ImageSegmentor`); what a runtime needs to
know (classes, palette, input size) is in its metadata
(:class:`ExportedModelInfo`).
"""
import copy
import hashlib
import logging
import os.path as osp
import warnings
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Tuple

import numpy as np
import torch
from mmengine.dataset import Compose
from mmengine.model import revert_sync_batchnorm
from mmseg.models.segmentors import EncoderDecoder
from torch import nn
from torch.nn.modules.utils import _pair

from ..config import inference_transforms, read_config
from ..errors import ConfigError, VerificationError
from ..fileio import check_output_path, write_files
from .logits import ImageSegmentor
from .onnx_model import (ExportedModelInfo, as_batch, load_image,
                         onnxruntime_session, set_info)
from .pair import dataset_meta, deploy_model
from .quantize import int8_model
from .verify import check_input_size, relative_error

OPSET = 18
# The frame the default export size is derived from: Cityscapes'.
CITYSCAPES_FRAME = (1024, 2048)
# fp32 engines sum in other orders than PyTorch; 1e-6 is typical.
EXPORT_TOLERANCE = 1e-5


class SlicedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` with integer bins, computed as ONNX exports
    it well: each bin's rows averaged, then each bin's columns, over
    PyTorch's own windows.

    The exporter unrolls adaptive pooling whose bins do not divide the
    input into one gather per window element (about 10,000 nodes and two
    minutes for PSPNet at 1024x2048) and fixes the windows to the example's
    size; slices and means stay small and follow the input's size.
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x):
        rows, columns = self.output_size
        return _pool(_pool(x, rows, 2), columns, 3)


def _pool(x, bins, dim):
    length = x.shape[dim]
    if bins == 1:
        return x.mean(dim, keepdim=True)
    windows = []
    for i in range(bins):
        start = i * length // bins
        # A ceiling without negative floor division, which ONNX's integer
        # Div (rounding towards zero) would get wrong.
        end = ((i + 1) * length + bins - 1) // bins
        windows.append(
            x.narrow(dim, start, end - start).mean(dim, keepdim=True))
    return torch.cat(windows, dim)


def replace_adaptive_pools(model):
    """Replace every ``nn.AdaptiveAvgPool2d`` with integer bins inside
    ``model`` by a :class:`SlicedAdaptiveAvgPool2d`, in place.

    Returns:
        int: How many were replaced.
    """
    found = [(name, module) for name, module in model.named_modules()
             if type(module) is nn.AdaptiveAvgPool2d and all(
                 isinstance(s, int) for s in _pair(module.output_size))]
    for name, module in found:
        parent, _, attribute = name.rpartition('.')
        setattr(
            model.get_submodule(parent), attribute,
            SlicedAdaptiveAvgPool2d(module.output_size))
    return len(found)


def exportable(segmentor):
    """An eval-mode :class:`ImageSegmentor` of a copy of ``segmentor``,
    with its adaptive pools replaced, as :func:`to_onnx` takes it."""
    module = ImageSegmentor(copy.deepcopy(segmentor)).eval()
    replace_adaptive_pools(module)
    return module


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how closely it matches PyTorch.

    Attributes:
        out (str): The ONNX file.
        input_size (tuple[int]): The size it was exported and checked at.
        dynamic (bool): Whether it takes any input size.
        max_error (float): Largest ``max|onnx - torch| / max|torch|`` of
            the logits over the checked inputs.
        tied_flips (int): Pixels whose label differs where PyTorch's two
            best classes tie within the tolerance (labels elsewhere are
            identical, or nothing is written).
        num_inputs (int): Inputs checked: random ones and the images.
        info (ExportedModelInfo): The model's metadata (for an int8 model,
            its calibration and its agreement with the fp32 model).
    """
    out: str
    input_size: Tuple[int, int]
    dynamic: bool
    max_error: float
    tied_flips: int
    num_inputs: int
    info: ExportedModelInfo


def pipeline_size(cfg, frame=CITYSCAPES_FRAME):
    """The ``(height, width)`` that the config's test pipeline makes of an
    image of size ``frame``."""
    pipeline = Compose(inference_transforms(cfg, leave_out=('Load', )))
    image = np.zeros((*frame, 3), np.uint8)
    results = pipeline(
        dict(img=image, img_shape=frame, ori_shape=frame, img_path=''))
    return tuple(results['inputs'].shape[-2:])


@contextmanager
def _quiet_exporter():
    logger = logging.getLogger('torch.onnx')
    level = logger.level
    logger.setLevel(logging.ERROR)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter('ignore')
            yield
    finally:
        logger.setLevel(level)


def to_onnx(module, size, dynamic=False, info=None):
    """Export an :class:`ImageSegmentor` to ONNX bytes.

    Args:
        module (ImageSegmentor): The model, with its adaptive pools
            replaced (:func:`exportable`).
        size (tuple[int]): ``(height, width)`` of the example input.
        dynamic (bool): Let height and width vary. The batch size always
            may.
        info (ExportedModelInfo, optional): Metadata to store.

    Returns:
        bytes: The model, with no trace of the exporting machine in it.
    """
    batch = torch.export.Dim('batch', min=1, max=1024)
    shapes = {0: batch}
    if dynamic:
        shapes.update({
            2: torch.export.Dim('height', min=8, max=16384),
            3: torch.export.Dim('width', min=8, max=16384)
        })
    # Two images: a batch of one would be specialized to one.
    example = torch.zeros(2, 3, *size)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module, (example, ),
            dynamo=True,
            opset_version=OPSET,
            input_names=['images'],
            output_names=['logits', 'labels'],
            dynamic_shapes={'images': shapes},
            verbose=False)
    proto = program.model_proto
    _check_dynamic_dims(proto, dynamic)
    for node in proto.graph.node:
        # Source paths and stack traces of the exporting machine.
        del node.metadata_props[:]
    if info is not None:
        set_info(proto, info)
    return proto.SerializeToString()


def _check_dynamic_dims(proto, dynamic):
    # The exporter may fall back to static sizes with a log line only.
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    wanted = [0, 2, 3] if dynamic else [0]
    fixed = [i for i in wanted if not dims[i].dim_param]
    if fixed:
        names = ', '.join(('batch', '', 'height', 'width')[i] for i in fixed)
        raise VerificationError(
            f'the model did not export with a free {names}: some operation '
            'of it depends on the input size')


def compare_labels(actual, expected_logits, tolerance):
    """Pixels whose labels differ, in all and outside near-ties.

    A label may only flip where the two best classes of the reference
    logits are within ``2 * tolerance * max|logits|`` of each other, since
    each logit may move by ``tolerance * max|logits|``.

    Returns:
        tuple[int, int]: Differing pixels, and those among them where the
        reference's two best classes do not tie.
    """
    expected = expected_logits.argmax(1)
    differ = actual != expected
    top2 = expected_logits.topk(2, dim=1).values
    tie = (top2[:, 0] - top2[:, 1]) <= (2 * tolerance *
                                        expected_logits.abs().max())
    return int(differ.sum()), int((differ & ~tie).sum())


def check_onnx(model, reference, inputs, tolerance=EXPORT_TOLERANCE):
    """Run the exported model on ONNX Runtime and compare it with
    ``reference`` (its PyTorch form).

    Returns:
        tuple[float, int]: The largest relative error of the logits, and
        the label flips at near-ties.

    Raises:
        VerificationError: The logits differ by more than ``tolerance`` or
            a label differs outside a near-tie.
    """
    session = onnxruntime_session(model)
    max_error, tied = 0.0, 0
    for images in inputs:
        with torch.no_grad():
            expected, _ = reference(images)
        logits, labels = session.run(None, {'images': images.numpy()})
        error = relative_error(torch.from_numpy(logits), expected)
        flips, untied = compare_labels(
            torch.from_numpy(labels), expected, tolerance)
        if not error <= tolerance or untied:
            raise VerificationError(
                f'ONNX Runtime differs from PyTorch (max relative difference '
                f'{error:.2e}, {untied} label(s) differ outside near-ties); '
                'nothing written')
        max_error, tied = max(max_error, error), tied + flips
    return max_error, tied


def _inputs(size, imgs, dynamic):
    generator = torch.Generator().manual_seed(0)
    sizes = [size]
    if dynamic:
        sizes.append((size[0] * 3 // 4, size[1] * 3 // 4))
    inputs = [torch.rand(1, 3, *s, generator=generator) * 255 for s in sizes]
    return inputs + [
        as_batch(load_image(img), None if dynamic else size) for img in imgs
    ]


def _segmentor(cfg, checkpoint, config):
    model, loaded = deploy_model(cfg, checkpoint, config)
    if not isinstance(model, EncoderDecoder):
        raise ConfigError(f'{config}: exports mmseg EncoderDecoder '
                          f'segmentors, not a {type(model).__name__}')
    return revert_sync_batchnorm(model).eval(), loaded


def _info(cfg, model, loaded, checkpoint, config, size):
    meta = dataset_meta(cfg, loaded.get('meta') or {}) or {}
    classes = list(meta.get('classes') or [])
    palette = [list(map(int, c)) for c in meta.get('palette') or []]
    with open(checkpoint, 'rb') as f:
        digest = hashlib.sha256(f.read()).hexdigest()
    return ExportedModelInfo(
        classes=classes,
        palette=palette,
        input_size=list(size) if size else None,
        align_corners=bool(model.align_corners),
        source=osp.basename(checkpoint),
        source_sha256=digest,
        config=osp.basename(config))


def export_onnx(config,
                checkpoint,
                out,
                size=None,
                imgs=(),
                dynamic=False,
                force=False,
                tolerance=EXPORT_TOLERANCE,
                int8=None):
    """Export a segmentor to a verified, self-contained ONNX model.

    Args:
        config (str): An mmseg ``EncoderDecoder`` config (RepVGG or not).
        checkpoint (str): A trained checkpoint (converted to deploy form
            and checked, as :func:`reparameterize` does) or a deploy
            checkpoint.
        out (str): The ONNX file to write.
        size (tuple[int], optional): ``(height, width)`` of the input.
            Defaults to what the config's test pipeline makes of a
            Cityscapes frame (1024x2048 for the shipped configs).
        imgs (Sequence[str]): Images to check on too (resized to ``size``
            unless ``dynamic``).
        dynamic (bool): Take any input size; the checks run at ``size``
            and at 3/4 of it.
        force (bool): Overwrite ``out``. Defaults to False.
        tolerance (float): Largest relative difference of the logits
            accepted. Defaults to 1e-5.
        int8 (Int8Settings, optional): Write an int8 model, calibrated
            and checked as these settings say, instead of the fp32 one
            (which is checked first all the same). Defaults to None.

    Returns:
        ExportResult: What was written.

    Raises:
        MMRepVGGError: Bad input, or a model that ONNX Runtime does not
            compute as PyTorch does; nothing is written.
    """
    if int8 is not None:
        int8.check()
    files = []
    cfg = read_config(config, files)
    check_output_path(out, [config, checkpoint, *files], force)
    model, loaded = _segmentor(cfg, checkpoint, config)
    size = tuple(size or pipeline_size(cfg))
    check_input_size(size)
    info = _info(cfg, model, loaded, checkpoint, config,
                 None if dynamic else size)
    data = to_onnx(exportable(model), size, dynamic, info)
    inputs = _inputs(size, imgs, dynamic)
    max_error, tied = check_onnx(data,
                                 ImageSegmentor(model).eval(), inputs,
                                 tolerance)
    if int8 is not None:
        data = int8_model(cfg, data, info, size, int8)
    write_files({out: data}, force)
    return ExportResult(out, size, dynamic, max_error, tied, len(inputs), info)
