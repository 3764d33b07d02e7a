"""Exporting mmseg segmentors to self-contained ONNX models (from images
to logits and labels, :class:`~mmrepvgg.deploy.logits.ImageSegmentor`,
with their :class:`~mmrepvgg.deploy.model_info.ExportedModelInfo`),
verified on the engines first.
"""
import copy
from dataclasses import dataclass, replace
from typing import List, Optional, Tuple

import torch
from mmseg.models.segmentors import EncoderDecoder

from ..cli import option
from ..config import read_config
from ..errors import ConfigError, MMRepVGGError, UsageError, VerificationError
from ..fileio import check_output_path, write_files
from ..runtime.metadata import MAX_SIZE, MIN_SIZE
from .compare import (Fp32Comparison, Fp32Tolerance, LabelComparison,
                      compare_labels, relative_error)
from .convert import ConversionComparison, equalize_checked
from .engines import BACKENDS, EngineSettings, SegmentationEngine
from .exact import fp32_and_exact
from .graph import exportable, exported_model_info, to_onnx
from .images import (TestPipeline, as_batch, check_input_size, fit_within,
                     image_size, read_image)
from .loading import DEFAULT_CHECK_SIZE, LoadedModel, deploy_model
from .logits import ImageSegmentor
from .model_info import ExportedModelInfo, read_model
from .test_settings import slide_crop_size

__all__ = [
    'ExportSettings', 'ExportJob', 'ExportResult', 'Fp32Export',
    'check_on_engines', 'export_fp32', 'export_onnx'
]

# The frame the default export size is derived from: Cityscapes'.
CITYSCAPES_FRAME = (1024, 2048)
# The smallest free height or width checked: its 3/4 must stay within the
# exporter's bounds too.
_MIN_DYNAMIC = 11


@dataclass(frozen=True)
class ExportSettings:
    """The input size of an exported model (each field is an option of
    ``tools/export.py``, whose help says what it sets)."""
    shape: Optional[Tuple[int, int]] = option(
        None,
        "input height and width (default: a slide-mode config's crop size, "
        "else what the config's test pipeline makes of a 1024x2048 "
        'Cityscapes frame)',
        metavar=('H', 'W'))
    dynamic: bool = option(
        False, 'take any input size (checked at the shape and at 3/4 of it)')

    def check(self):
        """Raise UsageError for a shape the exported model cannot take."""
        if self.shape is not None:
            _check_size(tuple(self.shape), self.dynamic)

    def input_size(self, cfg):
        """The checked export size for ``cfg``.

        Raises:
            UsageError: A size the exporter cannot take, or larger than
                :data:`~mmrepvgg.deploy.images.MAX_INPUT_PIXELS`.
        """
        size = tuple(self.shape) if self.shape else (
            slide_crop_size(cfg)
            or TestPipeline(cfg).output_size(CITYSCAPES_FRAME))
        _check_size(size, self.dynamic)
        return size


def _check_size(size, dynamic):
    check_input_size(size, minimum=_MIN_DYNAMIC if dynamic else MIN_SIZE)
    if max(size) > MAX_SIZE:
        raise UsageError(f'an exported height or width is at most '
                         f'{MAX_SIZE}, got {size[0]}x{size[1]}')


@dataclass
class ExportResult:
    """What an export wrote and how closely it matches PyTorch.

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


def _check_inputs(job):
    """Random images at the job's size (and 3/4 of it, if dynamic), then its
    image files: at the size, or within its pixels if dynamic."""
    generator = torch.Generator().manual_seed(0)
    sizes = [job.size]
    if job.dynamic:
        sizes.append((job.size[0] * 3 // 4, job.size[1] * 3 // 4))
    inputs = [torch.rand(1, 3, *s, generator=generator) * 255 for s in sizes]
    pixels = job.size[0] * job.size[1]
    return inputs + [
        as_batch(
            read_image(img),
            fit_within(image_size(img), pixels) if job.dynamic else job.size)
        for img in job.imgs
    ]


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
    checks = []
    for images in inputs:
        checks += _check_input(model, reference, images, tolerance, backends)
    # Untied flips were refused: those counted are all at near-ties.
    return (max((check for check, _ in checks), key=lambda c: c.margin),
            LabelComparison(sum(flips.differ for _, flips in checks), 0))


def _check_input(model, reference, images, tolerance, backends):
    """Each engine's comparisons on one input; what it computed is gone
    when it returns."""
    # PyTorch first, keeping only the exact logits (320 MB in float64 at
    # 1024x2048), then an engine at a time, created for the input and gone
    # before the next: an engine takes a GB or more while it runs.
    (own, ), (exact, ) = fp32_and_exact(
        reference, [images], run=lambda m, x: m(x)[0])
    own_error = relative_error(own, exact)
    del own
    checks = []
    for backend in backends:
        logits, labels = _run_once(model, backend, images)
        check = Fp32Comparison.of(logits, exact, own_error, tolerance)
        flips = compare_labels(labels, exact, check.limit)
        if not check.passed or flips.untied:
            raise VerificationError(
                f'{backend} differs from PyTorch ({check.describe()}; '
                f'{flips.untied} label(s) differ outside near-ties); '
                'nothing written')
        checks.append((check, flips))
        del logits, labels  # before the next engine runs
    return checks


@dataclass(frozen=True)
class ExportJob:
    """A request to export, checked before any model is built.

    Attributes:
        cfg (Config): The config read.
        config (str): Its file: an mmseg ``EncoderDecoder`` config
            (RepVGG or not).
        checkpoint (str): A trained checkpoint (converted to deploy form
            and checked, as :func:`reparameterize` does), a deploy
            checkpoint or, for :mod:`mmrepvgg.quantization`, a QAT one.
        out (str): The ONNX file to write.
        size (tuple[int]): The size to export and check at.
        dynamic (bool): Whether the model takes any input size.
        imgs (tuple[str]): Images to check on too (resized to the size,
            or within its pixels if dynamic).
        force (bool): Overwrite ``out``.
    """
    cfg: object
    config: str
    checkpoint: str
    out: str
    size: Tuple[int, int]
    dynamic: bool
    imgs: Tuple[str, ...]
    force: bool

    @classmethod
    def checked(cls,
                config,
                checkpoint,
                out,
                settings=ExportSettings(),
                imgs=(),
                force=False):
        """The job, its config read and its arguments checked.

        Raises:
            MMRepVGGError: A config, size, image or output path that
                cannot be used.
        """
        settings.check()
        files = []
        cfg = read_config(config, files)
        check_output_path(out, [config, checkpoint, *imgs, *files], force)
        size = settings.input_size(cfg)
        for img in imgs:
            image_size(img)
        return cls(cfg, config, checkpoint, out, size, settings.dynamic,
                   tuple(imgs), force)

    def info(self, loaded):
        """The :class:`ExportedModelInfo` of a model loaded for it."""
        return exported_model_info(self.cfg, loaded, self.config,
                                   None if self.dynamic else self.size)

    def write(self, data):
        """Write the model ``data`` to ``out``."""
        write_files({self.out: data}, self.force)


@dataclass
class Fp32Export:
    """An fp32 ONNX model checked on the engines, not written yet.

    Attributes:
        job (ExportJob): What it was exported for.
        loaded (LoadedModel): The deploy-form segmentor of the checkpoint.
        tolerance (Fp32Tolerance): How close its logits had to be.
        model (nn.Module): The segmentor it was exported from: ``loaded``'s,
            or an equalized copy of it.
        data (bytes): The model, with its metadata.
        result (ExportResult): What it is and how closely it matches.
    """
    job: ExportJob
    loaded: LoadedModel
    tolerance: Fp32Tolerance
    model: torch.nn.Module
    data: bytes
    result: ExportResult

    def equalized(self, read_images):
        """The fp32 model with its RepVGG backbone equalized, its activation
        ranges measured on the images ``read_images()`` gives, checked on
        the engines as this one was.

        Raises:
            MMRepVGGError: A backbone that cannot be equalized, or an
                equalized model that computes otherwise.
        """
        return _checked(self.job, self.loaded, self.tolerance, read_images)


def export_fp32(job, tolerance=Fp32Tolerance(), equalize_on=None):
    """A segmentor's fp32 ONNX model, checked on ONNX Runtime and OpenVINO
    against its PyTorch form's exact logits; not written.

    Args:
        job (ExportJob): What to export.
        tolerance (Fp32Tolerance): How close the engines' logits must be
            to the exact ones.
        equalize_on (callable, optional): Equalize the RepVGG backbone
            first (see :meth:`Fp32Export.equalized`), on the images it
            returns.

    Returns:
        Fp32Export: The model, checked.

    Raises:
        MMRepVGGError: Bad input, or a model that an engine does not
            compute as PyTorch does.
    """
    loaded = deploy_model(job.cfg, job.checkpoint, job.config)
    if not isinstance(loaded.model, EncoderDecoder):
        raise ConfigError(f'{job.config}: exports mmseg EncoderDecoder '
                          f'segmentors, not a {type(loaded.model).__name__}')
    return _checked(job, loaded, tolerance, equalize_on)


def _checked(job, loaded, tolerance, equalize_on):
    """The loaded model exported and checked on the engines; equalized first
    (a copy, checked) if ``equalize_on`` gives images."""
    model, info = loaded.model, job.info(loaded)
    if equalize_on is not None:
        model = copy.deepcopy(model)
        try:
            pairs = equalize_checked(model, equalize_on, DEFAULT_CHECK_SIZE)
        except MMRepVGGError as error:
            raise type(error)(f'{job.config}: --int8-equalize: {error}; '
                              'nothing written') from None
        info = replace(info, equalized_pairs=pairs)
    inputs = _check_inputs(job)
    data = to_onnx(exportable(model), job.size, job.dynamic, info)
    check, labels = check_on_engines(data, ImageSegmentor(model), inputs,
                                     tolerance)
    return Fp32Export(
        job, loaded, tolerance, model, data,
        ExportResult(job.out, job.size, job.dynamic, check, labels.differ,
                     len(inputs), list(BACKENDS), loaded.conversion, info))


def export_onnx(job, tolerance=Fp32Tolerance()):
    """Write a segmentor's fp32 ONNX model, checked (:func:`export_fp32`);
    :mod:`mmrepvgg.quantization` exports int8 ones alike.

    Args:
        job (ExportJob): What to export: a trained or deploy checkpoint.
        tolerance (Fp32Tolerance): As for :func:`export_fp32`.

    Returns:
        ExportResult: What was written.

    Raises:
        MMRepVGGError: As :func:`export_fp32`; nothing is written.
    """
    fp32 = export_fp32(job, tolerance)
    job.write(fp32.data)
    return fp32.result
