"""Exporting mmseg segmentors to ONNX, verified on the engines first.

The exported model is self-contained: it takes images as ``mmcv.imread``
gives them and returns logits and labels (see
:class:`mmrepvgg.deploy.logits.ImageSegmentor`); what a runtime needs to
know (classes, palette, input size) is in its metadata
(:class:`~mmrepvgg.deploy.model_info.ExportedModelInfo`).
"""
import copy
from dataclasses import dataclass, field, replace
from functools import partial
from typing import List, Optional, Tuple

import torch
from mmseg.models.segmentors import EncoderDecoder

from ..config import read_config
from ..errors import (CheckpointError, ConfigError, MMRepVGGError, UsageError,
                      VerificationError)
from ..fileio import check_output_path, write_files
from ..models.equalization import equalizable
from ..qat import QATExportSettings, is_qat_checkpoint, qat_onnx
from .compare import (Fp32Comparison, Fp32Tolerance, LabelComparison,
                      compare_labels, fp32_and_exact, relative_error)
from .convert import ConversionComparison, equalize_checked
from .engines import BACKENDS, EngineSettings, SegmentationEngine
from .graph import MAX_DYNAMIC, exportable, exported_model_info, to_onnx
from .images import (TestPipeline, as_batch, check_input_size, fit_within,
                     image_size, read_image, split_images)
from .loading import DEFAULT_CHECK_SIZE, deploy_model
from .logits import ImageSegmentor
from .model_info import ExportedModelInfo, read_model
from .test_settings import slide_crop_size

__all__ = ['ExportSettings', 'ExportResult', 'check_on_engines', 'export_onnx']

# The frame the default export size is derived from: Cityscapes'.
CITYSCAPES_FRAME = (1024, 2048)
# The smallest free height or width checked: its 3/4 must stay within the
# exporter's bounds too.
_MIN_DYNAMIC = 11


@dataclass(frozen=True)
class ExportSettings:
    """The input size of an exported model.

    Attributes:
        shape (tuple[int], optional): ``(height, width)`` of the input;
            None: a slide-mode config's crop size, else what the config's
            test pipeline makes of a Cityscapes frame (1024x2048 for the
            shipped configs).
        dynamic (bool): Take any input size; the checks run at ``shape``
            and at 3/4 of it.
    """
    shape: Optional[Tuple[int, int]] = field(
        default=None,
        metadata=dict(
            metavar=('H', 'W'),
            help="input height and width (default: a slide-mode config's "
            "crop size, else what the config's test pipeline makes of a "
            '1024x2048 Cityscapes frame)'))
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
        size = tuple(self.shape) if self.shape else (
            slide_crop_size(cfg)
            or TestPipeline(cfg).output_size(CITYSCAPES_FRAME))
        check_input_size(size, minimum=_MIN_DYNAMIC if self.dynamic else 1)
        if self.dynamic and max(size) > MAX_DYNAMIC:
            raise UsageError(f'a free height or width is at most '
                             f'{MAX_DYNAMIC}, got {size[0]}x{size[1]}')
        return size


@dataclass
class ExportResult:
    """What :func:`export_onnx` wrote and how closely it matches PyTorch.

    Attributes:
        out (str): The ONNX file.
        input_size (tuple[int]): The size it was exported and checked at.
        dynamic (bool): Whether it takes any input size.
        check (Fp32Comparison, optional): The engines' logits against
            PyTorch's exact ones, for the output nearest to its limit; None
            for a QAT checkpoint's int8 model, checked by its labels
            (``info.agreement``).
        tied_flips (int): Pixels whose label differs where the exact
            logits' two best classes tie within the limit (labels
            elsewhere are identical, or nothing is written).
        num_inputs (int): Inputs checked: random ones and the images.
        backends (list[str]): The engines it was checked on.
        conversion (ConversionComparison, optional): The check of the
            conversion to deploy form, for a trained checkpoint.
        info (ExportedModelInfo): The model's metadata (for an int8 model,
            its calibration and its agreement with the fp32 model, or with
            the QAT model).
    """
    out: str
    input_size: Tuple[int, int]
    dynamic: bool
    check: Optional[Fp32Comparison]
    tied_flips: int
    num_inputs: int
    backends: List[str]
    conversion: Optional[ConversionComparison]
    info: ExportedModelInfo


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


def export_onnx(config,
                checkpoint,
                out,
                settings=ExportSettings(),
                imgs=(),
                force=False,
                tolerance=Fp32Tolerance(),
                int8=None,
                qat=QATExportSettings()):
    """Export a segmentor to a verified, self-contained ONNX model.

    A QAT checkpoint (which ``tools/train.py --qat`` writes) is exported in
    int8 with the scales it trained, and checked against the QAT model as
    ``qat`` says (:func:`mmrepvgg.qat.qat_onnx`); it needs ``int8``, whose
    calibration it does not use, and takes no ``imgs``.

    Args:
        config (str): An mmseg ``EncoderDecoder`` config (RepVGG or not).
        checkpoint (str): A trained checkpoint (converted to deploy form
            and checked, as :func:`reparameterize` does), a deploy
            checkpoint or a QAT one.
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
        qat (QATExportSettings): How a QAT checkpoint's model is checked.

    Returns:
        ExportResult: What was written.

    Raises:
        MMRepVGGError: Bad input, or a model that an engine does not
            compute as PyTorch does; nothing is written.
    """
    if int8 is not None:
        int8.check()
    qat.check()
    files = []
    cfg = read_config(config, files)
    check_output_path(out, [config, checkpoint, *imgs, *files], force)
    size = settings.input_size(cfg)
    for img in imgs:
        image_size(img)
    job = _ExportJob(cfg, config, checkpoint, out, size, settings.dynamic,
                     tuple(imgs), tolerance, int8, qat)
    data, result = (_qat_model if _is_qat(checkpoint) else _model)(job)
    write_files({out: data}, force)
    return result


@dataclass(frozen=True)
class _ExportJob:
    """What :func:`export_onnx` was asked to do, its arguments checked."""
    cfg: object
    config: str
    checkpoint: str
    out: str
    size: Tuple[int, int]
    dynamic: bool
    imgs: Tuple[str, ...]
    tolerance: Fp32Tolerance
    int8: Optional[object]
    qat: QATExportSettings


def _is_qat(checkpoint):
    try:
        return is_qat_checkpoint(checkpoint)
    except CheckpointError:
        return False  # the model's loading reports it


def _model(job):
    """The fp32 model, checked on the engines; in int8 if asked."""
    loaded = _segmentor(job.cfg, job.checkpoint, job.config)
    info = exported_model_info(job.cfg, loaded, job.config,
                               None if job.dynamic else job.size)
    model = loaded.model
    equalize = job.int8.equalize if job.int8 is not None else 'never'
    if equalize == 'always':
        model, info.equalized_pairs = _equalized(
            model, job,
            partial(split_images, job.cfg, 'train', job.int8.calib_num,
                    job.size))
    inputs = _check_inputs(job.size, job.imgs, job.dynamic)
    data, check, labels = _checked_onnx(model, info, inputs, job)
    if job.int8 is not None:
        from .quantize import int8_model
        auto = (
            partial(_auto_equalized, model, info, inputs, job)
            if equalize == 'auto' and equalizable(model) else None)
        data = int8_model(job.cfg, data, info, job.size, job.int8, auto)
    return data, ExportResult(job.out, job.size,
                              job.dynamic, check, labels.differ, len(inputs),
                              list(BACKENDS), loaded.conversion, info)


def _checked_onnx(model, info, inputs, job):
    """The fp32 ONNX model of a segmentor, checked on the engines, and the
    check's :class:`Fp32Comparison` and :class:`LabelComparison`."""
    data = to_onnx(exportable(model), job.size, job.dynamic, info)
    check, labels = check_on_engines(data, ImageSegmentor(model), inputs,
                                     job.tolerance)
    return data, check, labels


def _equalized(model, job, read_images):
    """An equalized copy of a deploy-form segmentor, its activation ranges
    measured on the images ``read_images()`` gives, checked, and its number
    of equalized conv pairs."""
    equalized = copy.deepcopy(model)
    try:
        pairs = equalize_checked(equalized, read_images, DEFAULT_CHECK_SIZE)
    except MMRepVGGError as error:
        raise type(error)(f'{job.config}: --int8-equalize: {error}; nothing '
                          'written') from None
    return equalized, pairs


def _auto_equalized(model, info, inputs, job, calibration):
    """The fp32 ONNX model of the equalized segmentor, checked on the
    engines as the model was, and its number of equalized conv pairs."""
    equalized, pairs = _equalized(model, job, lambda: calibration)
    data, _, _ = _checked_onnx(equalized, replace(info, equalized_pairs=pairs),
                               inputs, job)
    return data, pairs


def _qat_model(job):
    """A QAT checkpoint's int8 model, checked against the QAT model."""
    if job.int8 is None:
        raise UsageError(f'{job.checkpoint}: is a QAT checkpoint; export it '
                         'with --int8')
    if job.imgs:
        raise UsageError(f'{job.checkpoint}: is a QAT checkpoint, checked '
                         "on the config's validation images, not on --img")
    exported = qat_onnx(job.config, job.checkpoint, job.size, job.dynamic,
                        job.qat)
    return exported.data, ExportResult(job.out, job.size, job.dynamic, None, 0,
                                       exported.agreement.images,
                                       ['onnxruntime'], None, exported.info)
