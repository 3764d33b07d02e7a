"""Inference speed of segmentors and their backbones, side by side: the
train and deploy forms of a config, reference configs, the deploy form with
its PSP head folded, the segmentors on the engines (fp32, bf16, int8) and
one 3x3 conv as the engines' int8 ceiling. Each model's outputs are checked
first; then they run in one process on the same input, in rounds of
alternating order (a slow spell of a shared machine hits all alike), twice
in each turn with the second run timed. Speed-ups are the median of the
per-round ratios."""
import copy
import time
from dataclasses import asdict, astuple, dataclass, field, replace
from typing import Any, Callable, List, Optional, Tuple

import torch

from mmrepvgg.cli import option
from mmrepvgg.config import read_config, short_config_name
from mmrepvgg.deploy.compare import compare_outputs
from mmrepvgg.deploy.convert import switch_to_deploy
from mmrepvgg.deploy.engines import BACKENDS
from mmrepvgg.deploy.exact import exact_outputs
from mmrepvgg.deploy.folded_psp import fold_psp_heads
from mmrepvgg.deploy.images import as_batch, read_image, split_images
from mmrepvgg.deploy.loading import load_model
from mmrepvgg.deploy.logits import ImageSegmentor
from mmrepvgg.errors import UsageError
from mmrepvgg.quantization.ptq import Int8Settings
from .engines import (CONV_SHAPE, FORM_PRECISIONS, check_engines, conv_models,
                      engine_forms, engine_runner, exported_models,
                      model_precision)
from .report import BenchmarkResult, Check, Timing, int8_ceilings, speedups

PARTS = ('segmentor', 'backbone')


@dataclass
class BenchmarkSettings:
    """What :func:`run_benchmark` times, and how; each field but ``seed``
    is an option of ``tools/benchmark.py``, whose help says what it does.
    ``checkpoint`` None times random weights (speed does not depend on the
    values); ``threads`` 0 leaves torch as it is and lets the engines
    choose."""
    config: str = field(
        metadata=dict(help='RepVGG segmentor config (path or mmseg::...)'))
    references: Tuple[str, ...] = option(
        (), 'configs to compare with, e.g. mmseg::pspnet/'
        'pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py',
        flag='--reference')
    checkpoint: Optional[str] = option(
        None, 'weights of the config (default: random init)')
    size: Tuple[int, int] = option((512, 1024),
                                   'input height and width',
                                   metavar=('H', 'W'))
    batch: int = option(1, 'batch size')
    parts: Tuple[str, ...] = option(PARTS, 'what to time', choices=PARTS)
    rounds: int = option(5, 'timed rounds')
    warmup: int = option(2, 'untimed runs per model first (at least one)')
    threads: int = option(0, 'torch and engine threads; 0: unchanged')
    fold_psp: bool = option(
        False, "also time the deploy form with its PSP head's pooling folded "
        'into its bottleneck conv')
    device: str = option('cpu', 'cpu or cuda[:N]')
    backends: Tuple[str, ...] = option(('torch', ),
                                       'torch, and engines to run the '
                                       'segmentors exported to ONNX on',
                                       choices=('torch', *BACKENDS))
    precisions: Tuple[str, ...] = option(
        ('fp32', ),
        'of the engines: fp32, bf16 (OpenVINO), int8 (every model calibrated'
        " on images of the config's training set)",
        choices=FORM_PRECISIONS)
    image: Optional[str] = option(None, 'an image to run on (default: noise)')
    calib_num: int = option(Int8Settings.calib_num, 'int8 calibration images')
    name: Optional[str] = option(
        None, "name of the config's models (default: its file name up to "
        'the second _)')
    seed: int = 0

    @property
    def shape(self):
        """The input's ``(N, C, H, W)``."""
        return (self.batch, 3, *self.size)

    def check(self):
        """Raise UsageError for settings that cannot run."""
        check_engines(self.backends, self.precisions)
        if self.device != 'cpu' and set(self.backends) != {'torch'}:
            raise UsageError('the inference engines run on the CPU: use '
                             '--backends torch with --device cuda')
        if not self.parts or set(self.parts) - set(PARTS):
            raise UsageError(
                f'parts must be among {PARTS}, got {list(self.parts)}')
        if self.rounds < 1 or self.warmup < 0 or self.threads < 0:
            raise UsageError('rounds must be >= 1, warmup >= 0 and threads '
                             '>= 0')
        if len(self.size) != 2 or min(*self.size, self.batch) < 1:
            raise UsageError(f'size and batch must be positive, got '
                             f'{list(self.size)} and {self.batch}')
        head = self.fold_psp and read_config(
            self.config).model.decode_head.type
        if head and head.split('.')[-1] != 'PSPHead':
            raise UsageError(f'--fold-psp: the decode head of {self.config} '
                             f'is {head}, not PSPHead')


@dataclass(eq=False)
class Entry:
    """A model being timed: ``run`` maps ``input`` to its outputs.
    ``base``: the entry it was made from (our deploy form from our train
    form, a folded or engine form from a PyTorch one), which it is checked
    against and compared with."""
    model: str
    part: str
    form: str
    run: Callable
    input: Any
    base: Optional['Entry'] = None
    times_s: List[float] = field(default_factory=list)

    @property
    def name(self):
        return f'{self.model} ({self.form})'


def _models(settings):
    """(name, form, config, cfg, loaded) of the train and deploy forms of
    ours, and of the references (random weights without a checkpoint)."""
    name = settings.name or short_config_name(settings.config)
    cfg = read_config(settings.config)
    train = load_model(cfg, settings.checkpoint, settings.config)
    deploy = replace(train, model=switch_to_deploy(copy.deepcopy(train.model)))
    references = [(r, read_config(r)) for r in settings.references]
    return [(name, 'train', settings.config, cfg, train),
            (name, 'deploy', settings.config, cfg, deploy)
            ] + [(short_config_name(r), 'reference', r, c, load_model(c))
                 for r, c in references]


def _raw_images(settings):
    """The input as images: ``settings.image`` resized to the input size,
    or random pixels; BGR values 0-255."""
    if settings.image is None:
        generator = torch.Generator().manual_seed(settings.seed)
        return torch.rand(*settings.shape, generator=generator) * 255
    image = as_batch(read_image(settings.image), settings.size)
    return image.expand(settings.batch, -1, -1, -1).contiguous()


def _pytorch_entries(settings, models, images, part):
    """Each model's segmentor (images to logits) or backbone in PyTorch;
    our deploy form made from our train form."""
    entries = []
    for name, form, _, _, loaded in models:
        module = ImageSegmentor(loaded.model).eval()
        run = module.logits if part == 'segmentor' else loaded.model.backbone
        # Not chained: some backbones' train() returns None.
        run.eval()
        run.to(settings.device)
        inputs = module.normalize(images).to(settings.device)
        base = entries[0] if form == 'deploy' else None
        entries.append(Entry(name, part, form, run, inputs, base))
    return entries


def _entries(settings, log):
    """Per part, the models in PyTorch, then for the segmentor ours folded
    and every model but our train form on the engines; last the engines'
    int8 ceiling."""
    models, images = _models(settings), _raw_images(settings)
    entries = []
    for part in settings.parts:
        pytorch = _pytorch_entries(settings, models, images, part)
        entries += pytorch
        if part == 'segmentor':
            entries += _folded(settings, pytorch[1]) + _engine_entries(
                settings, models, pytorch, images, log)
    return entries + _conv_entries(settings, log)


def _folded(settings, deploy):
    """Our deploy form's segmentor with its PSP head folded, if asked."""
    if not settings.fold_psp:
        return []
    folded = copy.deepcopy(deploy.run)
    if not fold_psp_heads(folded):
        raise UsageError(f'--fold-psp: {deploy.model} has no PSPHead')
    return [
        Entry(deploy.model, deploy.part, 'deploy+fold_psp', folded,
              deploy.input, deploy)
    ]


def _engine_entries(settings, models, pytorch, images, log):
    """Every segmentor but our train form exported to ONNX, on each engine
    form; ``pytorch``: their PyTorch entries."""
    forms = engine_forms(settings.backends, settings.precisions)
    if not forms:
        return []
    calibration = None
    if 'int8' in settings.precisions:
        calibration = split_images(models[0][3], 'train', settings.calib_num,
                                   settings.size)
    entries = []
    for (name, _, config, cfg, loaded), base in zip(models[1:], pytorch[1:]):
        log(f'exporting {name} ({", ".join(settings.precisions)})')
        exported = exported_models(cfg, loaded, config, settings.size,
                                   calibration)
        entries += [
            Entry(
                name, 'segmentor', f'{backend} {precision}',
                engine_runner(exported[model_precision(precision)], backend,
                              precision, settings.threads), images, base)
            for backend, precision in forms
        ]
    return entries


def _conv_entries(settings, log):
    """One 3x3 conv in fp32 and int8 on each engine, when int8 is timed:
    the engines' own int8 ceiling."""
    if 'int8' not in settings.precisions:
        return []
    log('quantizing one 3x3 conv of 256 channels')
    models, inputs = conv_models(settings.seed), torch.rand(*CONV_SHAPE)
    return [
        Entry('conv3x3-256', 'conv', f'{backend} {precision}',
              engine_runner(model, backend, 'fp32', settings.threads), inputs)
        for backend in BACKENDS if backend in settings.backends
        for precision, model in models.items()
    ]


def _warm_up_and_check(entries, settings, log):
    """Run each entry; check each entry made from another against it: our
    deploy form by what its weights compute exactly (its fp32 arithmetic
    is no part of a conversion), the others by their outputs."""
    runs = max(settings.warmup, 1)
    log(f'warm-up: {runs} run(s) of {len(entries)} models')
    outputs = {}
    for entry in entries:
        for _ in range(runs):
            outputs[entry] = entry.run(entry.input)
    made = [e for e in entries if e.base is not None]
    exact = {
        e: exact_outputs(e.run, [e.input])
        for e in dict.fromkeys([e.base for e in made] +
                               [e for e in made if e.form == 'deploy'])
    }
    checks = []
    for e in made:
        actual = exact[e] if e.form == 'deploy' else outputs[e]
        comparison = compare_outputs(actual, outputs[e.base], exact[e.base],
                                     e.part == 'segmentor')
        checks.append(Check(*astuple(comparison), e.part, e.name, e.base.name))
    return checks


def _time_rounds(entries, rounds, device, log):
    sync = torch.cuda.synchronize if device.type == 'cuda' else lambda _: None
    for index in range(rounds):
        order = entries if index % 2 == 0 else entries[::-1]
        for entry in order:
            # Untimed, so that every timed run follows a run of the same
            # model, as frame after frame in deployment: no model inherits
            # the caches or the freed memory of another.
            entry.run(entry.input)
            sync(device)
            start = time.perf_counter()
            entry.run(entry.input)
            sync(device)
            entry.times_s.append(time.perf_counter() - start)
        log(f'round {index + 1}/{rounds}: ' +
            ', '.join(f'{e.part} {e.name} {e.times_s[-1]:.3f}s'
                      for e in entries))


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
        BenchmarkResult: Timings, speed-ups (:func:`apps.report.speedups`),
        output checks and the int8 speed-ups against the engines' ceilings.
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
        shape=list(settings.shape),
        threads=torch.get_num_threads(),
        device=str(device),
        torch=torch.__version__)
    return BenchmarkResult(described, [Timing.of(e) for e in entries],
                           speedups(entries), checks, int8_ceilings(entries))
