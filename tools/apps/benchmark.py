"""Inference speed of segmentors and their backbones, side by side.

Every model runs in one process on the same input: after a warm-up, the
models take turns in several rounds (the order reversed every other round),
so a slow spell of a shared machine hits all of them alike. In its turn a
model runs twice and only the second run is timed, so that it never pays
for the memory state the previous model left. Speed-ups are the median of
the per-round ratios, which is steadier than a ratio of medians measured at
different times.

Besides the train and deploy forms of a config and any reference configs,
the deploy form can also run on a faster exact fp32 path (``fast_path``),
and every segmentor can run exported to ONNX on ONNX Runtime and OpenVINO,
in fp32, bf16 (OpenVINO) and calibrated int8; the outputs of each of these
are compared with the PyTorch model's before it is timed.
"""
import copy
import os.path as osp
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import Any, Callable, List, Optional, Tuple

import torch
from mmengine.model import revert_sync_batchnorm

from mmrepvgg.config import build_model, read_config
from mmrepvgg.deploy.compare import compare_fp32, compare_labels, tensors_of
from mmrepvgg.deploy.convert import switch_to_deploy
from mmrepvgg.deploy.engines import BACKENDS
from mmrepvgg.deploy.exact import exact_outputs
from mmrepvgg.deploy.images import as_batch, read_image
from mmrepvgg.deploy.loading import load_model
from mmrepvgg.deploy.logits import ImageSegmentor
from mmrepvgg.errors import UsageError
from mmrepvgg.quantization.ptq import Int8Settings
from .engines import (CONV_SHAPE, FORM_PRECISIONS, check_engines, conv_models,
                      conv_runner, engine_forms, engine_runner,
                      exported_models, model_precision)
from .fast_path import FAST_STEPS, check_fast_path, fast_steps_for, optimize
from .mmpretrain import build_mmpretrain_backbone

PARTS = ('segmentor', 'backbone')


def _option(default, help, **metadata):
    return field(default=default, metadata=dict(metadata, help=help))


@dataclass
class BenchmarkSettings:
    """What :func:`run_benchmark` times, and how; each field but ``seed``
    and ``name`` is an argument of ``tools/benchmark.py``.

    Attributes:
        config (str): Config of a RepVGG segmentor (path or
            ``package::path``); its deploy form is derived in memory.
        references (Sequence[str]): Other configs to time as they are.
        checkpoint (str, optional): Weights of ``config`` (either form);
            None times random weights (speed does not depend on the values).
        size (tuple[int]): Input height and width.
        batch (int): Input batch size.
        parts (Sequence[str]): Any of ``'segmentor'`` (whole-image logits
            at input resolution) and ``'backbone'``.
        rounds (int): Timed rounds; each model runs once per round.
        warmup (int): Untimed runs of each model first (at least one runs,
            for the output checks).
        threads (int): ``torch.set_num_threads`` and the engines' threads;
            0 leaves torch as it is and lets the engines choose.
        channels_last (bool): Run every model in channels-last format.
        fast_path (Sequence[str]): Steps of
            :func:`apps.fast_path.optimize`; the deploy form also runs on
            that path (a backbone skips the head's steps), after a check of
            its outputs against plain deploy.
        mmpretrain (bool): Also time mmpretrain's deployed RepVGG backbone
            at the same settings.
        device (str): ``'cpu'`` or a CUDA device.
        backends (Sequence[str]): ``'torch'`` (always) and any of
            ``'onnxruntime'`` and ``'openvino'``, which run every segmentor
            exported to ONNX (CPU only).
        precisions (Sequence[str]): The engines' precisions: ``'fp32'``,
            ``'bf16'`` (OpenVINO) and ``'int8'`` (every model calibrated on
            images of ``config``'s training set).
        image (str, optional): An image to run on, resized to the input
            size; None runs on random pixels.
        calib_num (int): Calibration images for int8.
        seed (int): Seed of the random input.
        name (str, optional): Name of ``config``'s models in the results;
            None takes the start of the config's file name, such as
            ``pspnet_repvgg-a0-d8``.
    """
    config: str = field(
        metadata=dict(help='RepVGG segmentor config (path or mmseg::...)'))
    references: Tuple[str, ...] = _option(
        (), 'configs to compare with, e.g. mmseg::pspnet/'
        'pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py',
        flag='--reference')
    checkpoint: Optional[str] = _option(
        None, 'weights of the config (default: random init)')
    size: Tuple[int, int] = _option((512, 1024),
                                    'input height and width',
                                    metavar=('H', 'W'))
    batch: int = _option(1, 'batch size')
    parts: Tuple[str, ...] = _option(PARTS, 'what to time', choices=PARTS)
    rounds: int = _option(5, 'timed rounds')
    warmup: int = _option(2, 'untimed runs per model first')
    threads: int = _option(0, 'torch and engine threads; 0: unchanged')
    channels_last: bool = _option(
        False, 'run every model in channels-last memory format')
    fast_path: Tuple[str, ...] = _option(
        (), 'also time the deploy form on this fp32 path, after checking that '
        'it predicts the same (fold_psp: the PSP head with its pyramid '
        'pooling folded into its bottleneck conv; channels_last: memory '
        'format; mkldnn: the backbone on oneDNN tensors; jit: trace and '
        'freeze; compile: torch.compile with frozen weights)',
        choices=FAST_STEPS)
    mmpretrain: bool = _option(
        False, "also time mmpretrain's deployed RepVGG backbone")
    device: str = _option('cpu', 'cpu or cuda[:N]')
    backends: Tuple[str, ...] = _option(
        ('torch', ),
        'torch, and the engines that also run every segmentor exported to '
        'ONNX',
        choices=('torch', *BACKENDS))
    precisions: Tuple[str, ...] = _option(
        ('fp32', ),
        'of the engines: fp32, bf16 (OpenVINO), int8 (every model calibrated'
        " on images of the config's training set)",
        choices=FORM_PRECISIONS)
    image: Optional[str] = _option(
        None, 'an image to run on, resized to the size (default: random '
        'pixels)')
    calib_num: int = _option(Int8Settings.calib_num, 'int8 calibration images')
    seed: int = 0
    name: Optional[str] = None

    @property
    def shape(self):
        """The input's ``(N, C, H, W)``."""
        return (self.batch, 3, *self.size)

    def check(self):
        """Raise UsageError for settings that cannot run."""
        check_fast_path(self.fast_path)
        check_engines(self.backends, self.precisions)
        if self.device != 'cpu' and set(self.backends) != {'torch'}:
            raise UsageError('the inference engines run on the CPU: use '
                             '--backends torch with --device cuda')
        unknown = set(self.parts) - set(PARTS)
        if unknown or not self.parts:
            raise UsageError(
                f'parts must be among {PARTS}, got {list(self.parts)}')
        if self.rounds < 1 or self.warmup < 0 or self.threads < 0:
            raise UsageError('rounds must be >= 1, warmup >= 0 and threads '
                             '>= 0')
        if len(self.size) != 2 or min(*self.size, self.batch) < 1:
            raise UsageError(f'size and batch must be positive, got '
                             f'{list(self.size)} and {self.batch}')


@dataclass
class Entry:
    """A model being timed: ``run`` maps ``input`` to its outputs."""
    model: str
    part: str
    form: str
    run: Callable = field(repr=False)
    input: Any = field(repr=False)
    # A faster form of the same model's PyTorch deploy form, compared with
    # it: a fast path, or an engine.
    derived: bool = False
    # The PyTorch module that ``run`` calls, for exact reference outputs.
    module: Any = field(default=None, repr=False)
    times_s: List[float] = field(default_factory=list)
    output: Any = field(default=None, repr=False)
    exact: Any = field(default=None, repr=False)

    @property
    def name(self):
        return f'{self.model} ({self.form})'


@dataclass
class Timing:
    """Seconds per run of one model; ``spread`` is (max - min) / median."""
    name: str
    part: str
    form: str
    times_s: List[float]
    median_s: float
    min_s: float
    max_s: float
    spread: float

    @classmethod
    def of(cls, entry):
        samples = entry.times_s
        median = statistics.median(samples)
        return cls(entry.name, entry.part, entry.form, samples, median,
                   min(samples), max(samples),
                   (max(samples) - min(samples)) / median)


@dataclass
class Ratio:
    """Speed-up of ``candidate`` over ``baseline``: the median, smallest
    and largest of the per-round ratios of their times."""
    part: str
    candidate: str
    baseline: str
    speedup: float
    speedup_min: float
    speedup_max: float

    @classmethod
    def of(cls, candidate, baseline):
        per_round = [
            b / c for c, b in zip(candidate.times_s, baseline.times_s)
        ]
        return cls(candidate.part, candidate.name, baseline.name,
                   statistics.median(per_round), min(per_round),
                   max(per_round))


@dataclass
class Check:
    """How far a model's outputs are from a reference's (see
    :func:`compare_outputs`)."""
    part: str
    candidate: str
    reference: str
    max_rel_error: float
    limit: float
    label_mismatches: Optional[int]
    label_agreement: Optional[float]
    exact: bool


@dataclass
class Int8Ceiling:
    """A segmentor's int8 speed-up on an engine against the engine's own
    ceiling: one 3x3 conv's (see :data:`apps.engines.CONV_SHAPE`).

    Attributes:
        backend (str): The engine.
        model_speedup (float): The segmentor's int8 over its fp32.
        conv_speedup (float): The conv's int8 over its fp32.
        share (float): ``model_speedup / conv_speedup``.
    """
    backend: str
    model_speedup: float
    conv_speedup: float
    share: float


@dataclass
class BenchmarkResult:
    """Settings, per-model timings, speed-ups, output checks and the int8
    speed-ups against the engines' ceilings."""
    settings: dict
    timings: List[Timing]
    ratios: List[Ratio]
    checks: List[Check]
    int8_ceilings: List[Int8Ceiling] = field(default_factory=list)

    def to_dict(self):
        return asdict(self)


def build_segmentor(config, checkpoint=None):
    """A config's segmentor, built offline, in eval mode, with plain BN:
    with a checkpoint's weights (of either form), or random ones."""
    cfg = read_config(config)
    if checkpoint is not None:
        return load_model(cfg, checkpoint, config).model
    return revert_sync_batchnorm(build_model(cfg)).eval()


def short_name(config):
    """A config's name up to its second ``_``, e.g. ``pspnet_r18-d8`` for
    ``mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py``."""
    name = osp.splitext(osp.basename(config.split('::')[-1]))[0]
    return '_'.join(name.split('_')[:2])


def compare_outputs(actual, own, exact, part):
    """How far a model's outputs (a tensor or a sequence of them) are from
    a reference model's exact ones, given the reference's own fp32 outputs
    (see :mod:`mmrepvgg.deploy.compare`); segmentor logits are compared as
    label maps too.

    Returns:
        dict: ``max_rel_error`` and ``limit`` (of the output nearest to its
        limit), ``label_mismatches`` and ``label_agreement`` (pixels whose
        argmax class differs from the exact one, and the share that does
        not; segmentors only, else None) and ``exact`` (within the limit,
        labels flipped at near-ties only).
    """
    check = compare_fp32(*(tensors_of(o) for o in (actual, own, exact)))
    mismatches = agreement = None
    untied = 0
    if part == 'segmentor':
        flips = compare_labels(actual.argmax(dim=1), exact, check.limit)
        mismatches, untied = flips.differ, flips.untied
        agreement = 1 - mismatches / actual[:, 0].numel()
    return dict(
        max_rel_error=check.error,
        limit=check.limit,
        label_mismatches=mismatches,
        label_agreement=agreement,
        exact=check.passed and not untied)


def _models(settings):
    """(name, form, segmentor) of the train and deploy forms and of the
    references."""
    name = settings.name or short_name(settings.config)
    train = build_segmentor(settings.config, settings.checkpoint)
    deploy = switch_to_deploy(copy.deepcopy(train))
    models = [(name, 'train', train), (name, 'deploy', deploy)]
    for reference in settings.references:
        models.append(
            (short_name(reference), 'reference', build_segmentor(reference)))
    return models


def _raw_images(settings):
    """The input as images: ``settings.image`` resized to the input size,
    or random pixels; BGR values 0-255."""
    batch, _, height, width = settings.shape
    if settings.image is None:
        generator = torch.Generator().manual_seed(settings.seed)
        return torch.rand(*settings.shape, generator=generator) * 255
    image = as_batch(read_image(settings.image), (height, width))
    return image.expand(batch, -1, -1, -1).contiguous()


def _torch_entries(settings, models, images, part):
    entries = []
    for name, form, segmentor in models:
        module = ImageSegmentor(segmentor).eval()
        inputs = module.normalize(images).to(
            settings.device, memory_format=_memory(settings))
        run = module.logits if part == 'segmentor' else segmentor.backbone
        # Not chained: some backbones' train() returns None.
        run.eval()
        run.to(settings.device, memory_format=_memory(settings))
        entries.append(Entry(name, part, form, run, inputs, module=run))
    steps = fast_steps_for(part, settings.fast_path)
    if steps:
        deploy = entries[1]
        entries.append(
            Entry(deploy.model, part, '+'.join(['deploy', *steps]),
                  optimize(deploy.run, deploy.input, steps), deploy.input,
                  True))
    if part == 'backbone' and settings.mmpretrain:
        backbone = build_mmpretrain_backbone(
            read_config(settings.config).model.backbone)
        entries.append(
            Entry('mmpretrain RepVGG', part, 'deploy',
                  backbone.to(settings.device), entries[1].input))
    return entries


def _engine_entries(settings, models, images, log):
    forms = engine_forms(settings.backends, settings.precisions)
    entries = []
    for name, form, segmentor in models:
        if form == 'train' or not forms:
            continue
        log(f'exporting {name} ({", ".join(settings.precisions)})')
        exported = exported_models(segmentor, settings.config,
                                   settings.shape[2:], settings.precisions,
                                   settings.calib_num)
        for backend, precision in forms:
            run = engine_runner(exported[model_precision(precision)], backend,
                                precision, settings.threads)
            entries.append(
                Entry(name, 'segmentor', f'{backend} {precision}', run, images,
                      True))
    return entries


def _conv_entries(settings, log):
    """One 3x3 conv in fp32 and int8 on each engine, when int8 is timed:
    the engines' own int8 ceiling."""
    backends = [b for b in BACKENDS if b in settings.backends]
    if 'int8' not in settings.precisions or not backends:
        return []
    log('quantizing one 3x3 conv of 256 channels')
    models = conv_models(settings.seed)
    inputs = torch.rand(*CONV_SHAPE)
    return [
        Entry('conv3x3-256', 'conv', f'{backend} {precision}',
              conv_runner(models[precision], backend, settings.threads),
              inputs) for backend in backends for precision in models
    ]


def _entries(settings, log):
    models = _models(settings)
    images = _raw_images(settings)
    entries = []
    for part in settings.parts:
        entries += _torch_entries(settings, models, images, part)
        if part == 'segmentor':
            entries += _engine_entries(settings, models, images, log)
    return entries + _conv_entries(settings, log)


def _memory(settings):
    return (torch.channels_last
            if settings.channels_last else torch.contiguous_format)


def _find(entries, part, form, model=None):
    return next((e for e in entries if e.part == part and e.form == form and (
        model is None or e.model == model)), None)


def _pytorch_form(entries, entry):
    """The PyTorch deploy form that a derived entry is compared with."""
    return next(
        e for e in entries
        if e.part == entry.part and e.model == entry.model and e.form in (
            'deploy', 'reference'))


def _warm_up_and_check(entries, settings, log):
    runs = max(settings.warmup, 1)
    log(f'warm-up: {runs} run(s) of {len(entries)} models')
    for entry in entries:
        for _ in range(runs):
            entry.output = entry.run(entry.input)
    checks = []
    ours = entries[0].model
    for part in settings.parts:
        pairs = [(_find(entries, part, 'deploy',
                        ours), _find(entries, part, 'train', ours))]
        pairs += [(e, _pytorch_form(entries, e)) for e in entries
                  if e.part == part and e.derived]
        for candidate, reference in pairs:
            # A PyTorch model is judged by what its weights compute
            # exactly: its fp32 arithmetic is no part of a conversion.
            actual = (
                _exact_output(candidate)
                if candidate.module is not None else candidate.output)
            checks.append(
                Check(
                    part, candidate.name, reference.name,
                    **compare_outputs(actual, reference.output,
                                      _exact_output(reference), part)))
    for entry in entries:
        entry.output = entry.exact = None
    return checks


def _exact_output(entry):
    """A PyTorch entry's output computed in float64, of the same shape."""
    if entry.exact is None:
        exact = exact_outputs(entry.module, [entry.input])
        entry.exact = (
            type(entry.output)(exact) if isinstance(entry.output,
                                                    (tuple,
                                                     list)) else exact[0])
    return entry.exact


def _time_rounds(entries, rounds, device, log):
    for index in range(rounds):
        order = entries if index % 2 == 0 else entries[::-1]
        for entry in order:
            # Untimed, so that every timed run follows a run of the same
            # model, as frame after frame in deployment: no model inherits
            # the caches or the freed memory of another.
            entry.run(entry.input)
            _synchronize(device)
            start = time.perf_counter()
            entry.run(entry.input)
            _synchronize(device)
            entry.times_s.append(time.perf_counter() - start)
        log(f'round {index + 1}/{rounds}: ' +
            ', '.join(f'{e.part} {e.name} {e.times_s[-1]:.3f}s'
                      for e in entries))


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def _ratios(entries, parts):
    """Our deploy form over every other PyTorch model of its part; each
    derived form (fast path, engine) over the PyTorch form it comes from;
    and our model in each engine form over the references in the same
    form."""
    ratios = []
    ours = entries[0].model
    for part in parts:
        deploy = _find(entries, part, 'deploy', ours)
        for entry in entries:
            if entry.part != part or entry is deploy:
                continue
            if entry.derived:
                ratios.append(Ratio.of(entry, _pytorch_form(entries, entry)))
            else:
                ratios.append(Ratio.of(deploy, entry))
        for entry in entries:
            if entry.part == part and entry.derived and entry.model != ours:
                candidate = _find(entries, part, entry.form, ours)
                if candidate is not None:
                    ratios.append(Ratio.of(candidate, entry))
    return ratios


def _int8_ceilings(entries):
    """Each engine's int8 speed-up of our segmentor and of one conv."""
    ours = entries[0].model
    ceilings = []
    for backend in BACKENDS:
        pairs = [(_find(entries, part, f'{backend} int8',
                        model), _find(entries, part, f'{backend} fp32', model))
                 for part, model in (('segmentor', ours), ('conv', None))]
        if all(a is not None and b is not None for a, b in pairs):
            model, conv = (Ratio.of(*pair) for pair in pairs)
            ceilings.append(
                Int8Ceiling(backend, model.speedup, conv.speedup,
                            model.speedup / conv.speedup))
    return ceilings


def _prepare_device(settings):
    if settings.threads:
        torch.set_num_threads(settings.threads)
    device = torch.device(settings.device)
    if device.type == 'cuda':
        # TF32 would trade fp32 accuracy for speed.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    return device


def run_benchmark(settings, log=print):
    """Time a config's train and deploy forms against reference configs.

    Args:
        settings (BenchmarkSettings): What to time, and how.
        log (callable): Receives progress lines. Defaults to ``print``.

    Returns:
        BenchmarkResult: Timings; speed-ups of the deploy form over every
        other model of the same part and of each faster form over plain
        deploy; output checks of deploy against train and of each faster
        form against deploy.
    """
    settings.check()
    device = _prepare_device(settings)
    log(f'building models for {list(settings.parts)}')
    entries = _entries(settings, log)
    with torch.inference_mode():
        checks = _warm_up_and_check(entries, settings, log)
        _time_rounds(entries, settings.rounds, device, log)
    described = dict(
        asdict(settings),
        references=list(settings.references),
        shape=list(settings.shape),
        parts=list(settings.parts),
        fast_path=list(settings.fast_path),
        backends=list(settings.backends),
        precisions=list(settings.precisions),
        threads=torch.get_num_threads(),
        device=str(device),
        torch=torch.__version__)
    return BenchmarkResult(described, [Timing.of(e) for e in entries],
                           _ratios(entries, settings.parts), checks,
                           _int8_ceilings(entries))
