"""Exporting mmseg segmentors to ONNX, verified on the engines first.

The exported model is self-contained: it takes images as ``mmcv.imread``
gives them and returns logits and labels (see
:class:`mmrepvgg.deploy.logits.ImageSegmentor`); what a runtime needs to
know (classes, palette, input size) is in its metadata
(:class:`~mmrepvgg.deploy.model_info.ExportedModelInfo`).
"""
import copy
import logging
import os.path as osp
import warnings
from contextlib import contextmanager
from dataclasses import dataclass, field
from typing import List, Optional, Tuple

import torch
from mmseg.models.segmentors import EncoderDecoder
from torch import nn
from torch.nn.modules.utils import _pair

from ..config import read_config
from ..errors import ConfigError, UsageError, VerificationError
from ..fileio import check_output_path, write_files
from .compare import (Fp32Comparison, Fp32Tolerance, LabelComparison,
                      compare_labels, fp32_and_exact, relative_error)
from .convert import ConversionComparison
from .engines import BACKENDS, EngineSettings, SegmentationEngine
from .images import (TestPipeline, as_batch, check_input_size, fit_within,
                     image_size, read_image)
from .loading import dataset_meta, deploy_model
from .logits import ImageSegmentor
from .model_info import INPUT, OUTPUTS, ExportedModelInfo, read_model, set_info
from .modules import replace_modules

__all__ = [
    'OPSET', 'ExportSettings', 'ExportResult', 'SlicedAdaptiveAvgPool2d',
    'exportable', 'to_onnx', 'check_on_engines', 'export_onnx'
]

OPSET = 18
# The frame the default export size is derived from: Cityscapes'.
CITYSCAPES_FRAME = (1024, 2048)
# The exporter's bounds of a free height or width; the check at 3/4 of the
# size must stay within them too.
_MIN_DYNAMIC, _MAX_DYNAMIC = 11, 16384


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


def _sliced_pool(module):
    if type(module) is nn.AdaptiveAvgPool2d and all(
            isinstance(s, int) for s in _pair(module.output_size)):
        return SlicedAdaptiveAvgPool2d(module.output_size)
    return None


def exportable(segmentor):
    """An eval-mode :class:`ImageSegmentor` of a copy of ``segmentor``,
    with its adaptive pools sliced, as :func:`to_onnx` takes it."""
    module = ImageSegmentor(copy.deepcopy(segmentor)).eval()
    replace_modules(module, _sliced_pool)
    return module


@dataclass(frozen=True)
class ExportSettings:
    """The input size of an exported model.

    Attributes:
        shape (tuple[int], optional): ``(height, width)`` of the input;
            None: what the config's test pipeline makes of a Cityscapes
            frame (1024x2048 for the shipped configs).
        dynamic (bool): Take any input size; the checks run at ``shape``
            and at 3/4 of it.
    """
    shape: Optional[Tuple[int, int]] = field(
        default=None,
        metadata=dict(
            metavar=('H', 'W'),
            help="input height and width (default: what the config's test "
            'pipeline makes of a 1024x2048 Cityscapes frame)'))
    dynamic: bool = field(
        default=False,
        metadata=dict(help='take any input size (checked at the shape and '
                      'at 3/4 of it)'))

    def input_size(self, cfg):
        """The checked export size for ``cfg``.

        Raises:
            UsageError: A size the exporter cannot take, or larger than
                :data:`~mmrepvgg.deploy.images.MAX_INPUT_PIXELS`.
        """
        size = tuple(self.shape) if self.shape else TestPipeline(
            cfg).output_size(CITYSCAPES_FRAME)
        check_input_size(size, minimum=_MIN_DYNAMIC if self.dynamic else 1)
        if self.dynamic and max(size) > _MAX_DYNAMIC:
            raise UsageError(f'a free height or width is at most '
                             f'{_MAX_DYNAMIC}, got {size[0]}x{size[1]}')
        return size


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how closely it matches PyTorch.

    Attributes:
        out (str): The ONNX file.
        input_size (tuple[int]): The size it was exported and checked at.
        dynamic (bool): Whether it takes any input size.
        check (Fp32Comparison): The engines' logits against PyTorch's exact
            ones, for the output nearest to its limit.
        tied_flips (int): Pixels whose label differs where the exact
            logits' two best classes tie within the limit (labels
            elsewhere are identical, or nothing is written).
        num_inputs (int): Inputs checked: random ones and the images.
        backends (list[str]): The engines it was checked on.
        conversion (ConversionComparison, optional): The check of the
            conversion to deploy form, for a trained checkpoint.
        info (ExportedModelInfo): The model's metadata (for an int8 model,
            its calibration and its agreement with the fp32 model).
    """
    out: str
    input_size: Tuple[int, int]
    dynamic: bool
    check: Fp32Comparison
    tied_flips: int
    num_inputs: int
    backends: List[str]
    conversion: Optional[ConversionComparison]
    info: ExportedModelInfo


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
        module (ImageSegmentor): The model, with its adaptive pools sliced
            (:func:`exportable`).
        size (tuple[int]): ``(height, width)`` of the example input.
        dynamic (bool): Let height and width vary. The batch size always
            may.
        info (ExportedModelInfo, optional): Metadata to store.

    Returns:
        bytes: The model, with no trace of the exporting machine in it.
    """
    shapes = {0: torch.export.Dim('batch', min=1, max=1024)}
    if dynamic:
        shapes.update({
            2: torch.export.Dim('height', min=8, max=_MAX_DYNAMIC),
            3: torch.export.Dim('width', min=8, max=_MAX_DYNAMIC)
        })
    # Two images: a batch of one would be specialized to one.
    example = torch.zeros(2, 3, *size)
    with _quiet_exporter(), torch.no_grad():
        program = torch.onnx.export(
            module, (example, ),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={INPUT: shapes},
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


def _check_inputs(size, imgs, dynamic):
    """Random images at the size (and 3/4 of it, if dynamic), then the
    image files: at the size, or within its pixels if dynamic."""
    generator = torch.Generator().manual_seed(0)
    sizes = [size]
    if dynamic:
        sizes.append((size[0] * 3 // 4, size[1] * 3 // 4))
    inputs = [torch.rand(1, 3, *s, generator=generator) * 255 for s in sizes]
    pixels = size[0] * size[1]
    return inputs + [
        as_batch(
            read_image(img),
            fit_within(image_size(img), pixels) if dynamic else size)
        for img in imgs
    ]


@dataclass
class _EngineCheck:
    check: Optional[Fp32Comparison] = None
    labels: LabelComparison = LabelComparison(0, 0)

    def add(self, check, labels):
        if self.check is None or check.margin > self.check.margin:
            self.check = check
        self.labels = LabelComparison(self.labels.differ + labels.differ,
                                      self.labels.untied + labels.untied)


def _run_once(model, backend, images):
    engine = SegmentationEngine(
        model, EngineSettings(backend), keep_memory=False)
    return tuple(torch.from_numpy(o) for o in engine(images))


def check_on_engines(model,
                     reference,
                     inputs,
                     tolerance=Fp32Tolerance(),
                     backends=BACKENDS):
    """Run an exported model on the engines and compare it with its
    PyTorch form's exact (float64) logits.

    Args:
        model (bytes): The exported model.
        reference (ImageSegmentor): Its PyTorch form.
        inputs (Sequence[Tensor]): Image batches.
        tolerance (Fp32Tolerance): How close the logits must be.
        backends (Sequence[str]): The engines.

    Returns:
        tuple[Fp32Comparison, LabelComparison]: Of the worst output, and
        the label flips over all engines and inputs.

    Raises:
        VerificationError: Logits outside the limit, or labels that differ
            outside near-ties.
    """
    model = read_model(model)
    result = _EngineCheck()
    for images in inputs:
        _check_input(model, reference, images, tolerance, backends, result)
    return result.check, result.labels


def _check_input(model, reference, images, tolerance, backends, result):
    """Check one input, adding to ``result``; what it computed is gone when
    it returns."""
    # PyTorch first, keeping only the exact logits (320 MB in float64 at
    # 1024x2048), then an engine at a time, created for the input and gone
    # before the next: an engine takes a GB or more while it runs.
    (own, ), (exact, ) = fp32_and_exact(
        reference, [images], run=lambda m, x: m(x)[0])
    own_error = relative_error(own, exact)
    del own
    for backend in backends:
        logits, labels = _run_once(model, backend, images)
        check = Fp32Comparison.of(logits, exact, own_error, tolerance)
        flips = compare_labels(labels, exact, check.limit)
        if not check.passed or flips.untied:
            raise VerificationError(
                f'{backend} differs from PyTorch ({check.describe()}; '
                f'{flips.untied} label(s) differ outside near-ties); '
                'nothing written')
        result.add(check, flips)
        del logits, labels  # before the next engine runs


def _segmentor(cfg, checkpoint, config):
    loaded = deploy_model(cfg, checkpoint, config)
    if not isinstance(loaded.model, EncoderDecoder):
        raise ConfigError(f'{config}: exports mmseg EncoderDecoder '
                          f'segmentors, not a {type(loaded.model).__name__}')
    return loaded


def _info(cfg, loaded, config, size):
    dataset = dataset_meta(cfg, loaded.checkpoint)
    if dataset is None:
        raise ConfigError(f'{config}: names no classes (neither the '
                          "checkpoint's meta nor the config's test dataset)")
    return ExportedModelInfo(
        classes=list(dataset.classes),
        palette=[list(c) for c in dataset.palette],
        input_size=list(size) if size else None,
        align_corners=bool(loaded.model.align_corners),
        source=osp.basename(loaded.checkpoint.path),
        source_sha256=loaded.checkpoint.sha256,
        config=osp.basename(config))


def export_onnx(config,
                checkpoint,
                out,
                settings=ExportSettings(),
                imgs=(),
                force=False,
                tolerance=Fp32Tolerance(),
                int8=None):
    """Export a segmentor to a verified, self-contained ONNX model.

    Args:
        config (str): An mmseg ``EncoderDecoder`` config (RepVGG or not).
        checkpoint (str): A trained checkpoint (converted to deploy form
            and checked, as :func:`reparameterize` does) or a deploy
            checkpoint.
        out (str): The ONNX file to write.
        settings (ExportSettings): Its input size.
        imgs (Sequence[str]): Images to check on too (resized to the size,
            or within its pixels if dynamic).
        force (bool): Overwrite ``out``. Defaults to False.
        tolerance (Fp32Tolerance): How close the engines' logits must be
            to the exact ones.
        int8 (Int8Settings, optional): Write an int8 model, calibrated
            and checked as these settings say, instead of the fp32 one
            (which is checked first all the same). Defaults to None.

    Returns:
        ExportResult: What was written.

    Raises:
        MMRepVGGError: Bad input, or a model that an engine does not
            compute as PyTorch does; nothing is written.
    """
    if int8 is not None:
        int8.check()
    files = []
    cfg = read_config(config, files)
    check_output_path(out, [config, checkpoint, *imgs, *files], force)
    size = settings.input_size(cfg)
    for img in imgs:
        image_size(img)
    loaded = _segmentor(cfg, checkpoint, config)
    info = _info(cfg, loaded, config, None if settings.dynamic else size)
    data = to_onnx(exportable(loaded.model), size, settings.dynamic, info)
    inputs = _check_inputs(size, imgs, settings.dynamic)
    check, labels = check_on_engines(data, ImageSegmentor(loaded.model),
                                     inputs, tolerance)
    if int8 is not None:
        from .quantize import int8_model
        data = int8_model(cfg, data, info, size, int8)
    write_files({out: data}, force)
    return ExportResult(out, size, settings.dynamic, check, labels.differ,
                        len(inputs), list(BACKENDS), loaded.conversion, info)
