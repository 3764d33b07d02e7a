"""Inference speed of segmentors and their backbones, side by side.

Every model runs in one process on the same input: after a warm-up, the
models take turns in several rounds (the order reversed every other round),
so a slow spell of a shared machine hits all of them alike. In its turn a
model runs twice and only the second run is timed, so that it never pays
for the memory state the previous model left. Speed-ups are
the median of the per-round ratios, which is steadier than a ratio of
medians measured at different times.

Besides the train and deploy forms of a config and any reference configs,
the deploy form can also run on a faster exact fp32 path (``fast_path``);
its outputs are checked against plain deploy before it is timed.
"""
import copy
import importlib.util
import json
import os.path as osp
import statistics
import sys
import time
import types

import torch
import torch.nn.functional as F
from mmengine.model import revert_sync_batchnorm
from mmengine.registry import Registry
from torch import nn
from torch.utils.mkldnn import to_mkldnn

from .deploy import switch_to_deploy
from .fileio import load_checkpoint_file, weights_of, write_atomic
from .folded_psp import fold_psp_heads
from .reparameterize import build_model, load_weights, relative_error
from .runner import read_config

PARTS = ('segmentor', 'backbone')
FAST_STEPS = ('fold_psp', 'channels_last', 'mkldnn', 'jit', 'compile')
# Steps that change only a segmentor's head: a backbone's fast path skips
# them.
HEAD_STEPS = ('fold_psp', )
# The largest relative output difference that still counts as the same
# fp32 predictions (with an identical argmax label map).
EXACT_RTOL = 1e-5


def build_segmentor(config, checkpoint=None):
    """Build a config's segmentor offline, in eval mode, with plain BN.

    Pretrained initializations are dropped, as in
    :func:`mmrepvgg.reparameterize.build_model`, so nothing is downloaded.

    Args:
        config (str): Config path or ``package::path``.
        checkpoint (str, optional): Weights to load (weights-only).
            Defaults to None (PyTorch's default initialization, which is
            enough to time a model).

    Returns:
        nn.Module: The segmentor.
    """
    model = revert_sync_batchnorm(build_model(read_config(config)))
    if checkpoint is not None:
        load_weights(model,
                     weights_of(load_checkpoint_file(checkpoint), checkpoint),
                     checkpoint, config)
    return model.eval()


class SegmentorLogits(nn.Module):
    """A segmentor as a tensor-to-tensor function: class logits at the
    input resolution, as mmseg's whole-image inference computes them.

    Args:
        segmentor (nn.Module): An mmseg ``EncoderDecoder``.
    """

    def __init__(self, segmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs):
        logits = self.segmentor(inputs, mode='tensor')
        return F.interpolate(
            logits,
            size=inputs.shape[2:],
            mode='bilinear',
            align_corners=self.segmentor.align_corners)


def load_mmpretrain_repvgg():
    """mmpretrain's ``RepVGG`` backbone class, for comparison.

    Importing mmpretrain imports all of it, torchvision included, which
    does not import beside every torch build. So only the backbone's module
    and the few modules it imports are loaded from the installed files,
    without running mmpretrain's package ``__init__`` files, and with a
    private stand-in for ``mmpretrain.registry``, so that nothing is
    registered in mmengine's registries. Afterwards they are taken out of
    ``sys.modules`` again: nothing else sees a partial mmpretrain.

    Returns:
        type: ``mmpretrain.models.backbones.repvgg.RepVGG``.

    Raises:
        ImportError: mmpretrain is not installed.
    """
    loaded = sys.modules.get('mmpretrain.models.backbones.repvgg')
    if loaded is not None:
        return loaded.RepVGG
    spec = importlib.util.find_spec('mmpretrain')
    if spec is None or not spec.submodule_search_locations:
        raise ImportError('mmpretrain is not installed (pip install '
                          '--no-deps mmpretrain==1.2.0 is enough)')
    root = spec.submodule_search_locations[0]
    saved = {
        name: module
        for name, module in sys.modules.items()
        if name.split('.')[0] == 'mmpretrain'
    }
    try:
        for package in ('mmpretrain', 'mmpretrain.models',
                        'mmpretrain.models.backbones',
                        'mmpretrain.models.utils'):
            stub = types.ModuleType(package)
            stub.__path__ = [osp.join(root, *package.split('.')[1:])]
            sys.modules[package] = stub
        registry = types.ModuleType('mmpretrain.registry')
        registry.MODELS = Registry('mmpretrain backbones for benchmarks')
        sys.modules[registry.__name__] = registry
        return importlib.import_module(
            'mmpretrain.models.backbones.repvgg').RepVGG
    finally:
        for name in list(sys.modules):
            if name.split('.')[0] == 'mmpretrain':
                del sys.modules[name]
        sys.modules.update(saved)


def build_mmpretrain_backbone(backbone_cfg):
    """mmpretrain's deployed RepVGG with the settings of our backbone
    config (arch, strides, dilations, out indices)."""
    RepVGG = load_mmpretrain_repvgg()
    keys = ('arch', 'strides', 'dilations', 'out_indices')
    backbone = RepVGG(
        **{k: backbone_cfg[k]
           for k in keys if k in backbone_cfg}, deploy=True)
    backbone.eval()  # its train() returns None
    return backbone


def check_fast_path(fast_path, config=None):
    """Raise ValueError unless ``fast_path`` is a valid list of steps (for
    ``config``'s segmentor, when given)."""
    unknown = set(fast_path) - set(FAST_STEPS)
    if unknown:
        raise ValueError(f'fast path steps must be among {FAST_STEPS}, got '
                         f'{sorted(unknown)}')
    if {'jit', 'compile'} <= set(fast_path):
        raise ValueError('fast path: choose one of jit and compile')
    if 'mkldnn' in fast_path and set(fast_path) - {'mkldnn', *HEAD_STEPS}:
        raise ValueError('fast path: mkldnn goes with fold_psp only (it '
                         'picks its own memory layout and cannot be traced '
                         'or compiled)')
    if 'fold_psp' in fast_path and config is not None:
        head = read_config(config).model.decode_head.type
        if head.split('.')[-1] != 'PSPHead':
            raise ValueError(f'fast path fold_psp: the decode head of '
                             f'{config} is {head}, not PSPHead')


def fast_steps_for(part, fast_path):
    """The steps of ``fast_path`` that apply to a ``part``, in order."""
    return [
        step for step in fast_path
        if part == 'segmentor' or step not in HEAD_STEPS
    ]


def _fast_form(part, fast_path):
    # None where no step applies to the part.
    steps = fast_steps_for(part, fast_path)
    return '+'.join(['deploy', *steps]) if steps else None


class ChannelsLast(nn.Module):
    """Run a module in channels-last memory format; its outputs return to
    the default (contiguous) format.

    Args:
        module (nn.Module): Converted in place.
    """

    def __init__(self, module):
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, inputs):
        outputs = self.module(
            inputs.contiguous(memory_format=torch.channels_last))
        return type(outputs)(o.contiguous() for o in outputs) if isinstance(
            outputs, (tuple, list)) else outputs.contiguous()


class OneDNNLayout(nn.Module):
    """Run a CPU module on oneDNN tensors, so that activations stay in
    oneDNN's blocked layout from one conv to the next; the outputs return
    to dense tensors.

    Args:
        module (nn.Module): Converted: its convs get prepacked weights.
    """

    def __init__(self, module):
        super().__init__()
        self.module = to_mkldnn(module)

    def forward(self, inputs):
        outputs = self.module(inputs.to_mkldnn())
        return type(outputs)(o.to_dense() for o in outputs) if isinstance(
            outputs, (tuple, list)) else outputs.to_dense()


def _wrap_backbone(model, wrapper):
    # A segmentor's head keeps the default layout: only the plain conv
    # stack of the backbone changes.
    if isinstance(model, SegmentorLogits):
        model.segmentor.backbone = wrapper(model.segmentor.backbone)
        return model.eval()
    return wrapper(model).eval()


def optimize(model, inputs, fast_path):
    """A copy of an eval-mode model on a faster fp32 inference path.

    Args:
        model (nn.Module): A :class:`SegmentorLogits` or a backbone, in eval
            mode; left unchanged.
        inputs (Tensor): An example input.
        fast_path (Sequence[str]): Steps among :data:`FAST_STEPS`:
            ``'channels_last'`` runs the backbone in channels-last memory
            format, oneDNN's native layout for its plain 3x3 convs on CPU,
            while a segmentor's head keeps the default layout (faster for
            the PSP head's wide concatenating conv); ``'mkldnn'`` runs the
            backbone on oneDNN tensors (CPU only); ``'jit'`` traces and freezes
            the model (weights become constants, BN folds into the convs
            before it); ``'compile'`` uses ``torch.compile`` with frozen
            weights; ``'fold_psp'`` folds a segmentor's pyramid pooling into
            its bottleneck conv (see
            :class:`mmrepvgg.folded_psp.FoldedPSPHead`).

    Returns:
        callable: The optimized model.
    """
    check_fast_path(fast_path)
    model = copy.deepcopy(model)
    if 'fold_psp' in fast_path and not fold_psp_heads(model):
        raise ValueError('fast path fold_psp: the model has no PSPHead')
    if 'channels_last' in fast_path:
        model = _wrap_backbone(model, ChannelsLast)
    if 'mkldnn' in fast_path:
        model = _wrap_backbone(model, OneDNNLayout)
    if 'jit' in fast_path:
        with torch.no_grad():
            model = torch.jit.freeze(
                torch.jit.trace(model, inputs, check_trace=False))
    if 'compile' in fast_path:
        model = torch.compile(model, options=dict(freezing=True))
    return model


def _as_tuple(outputs):
    return tuple(outputs) if isinstance(outputs,
                                        (tuple, list)) else (outputs, )


def compare_outputs(actual, expected, part):
    """How far two models' outputs are apart.

    Args:
        actual (Tensor | Sequence[Tensor]): Outputs of the model checked.
        expected (Tensor | Sequence[Tensor]): Outputs of the reference.
        part (str): ``'segmentor'`` (class logits, compared as label maps
            too) or ``'backbone'``.

    Returns:
        dict: ``max_rel_error`` (the largest ``max|a - e| / max|e|`` over
        the outputs), ``label_mismatches`` (pixels whose argmax class
        differs; segmentors only, else None) and ``exact`` (labels equal and
        error within :data:`EXACT_RTOL`).
    """
    errors = [
        relative_error(a, e)
        for a, e in zip(_as_tuple(actual), _as_tuple(expected))
    ]
    mismatches = None
    if part == 'segmentor':
        mismatches = int((actual.argmax(dim=1)
                          != expected.argmax(dim=1)).sum())
    error = max(errors)
    return dict(
        max_rel_error=error,
        label_mismatches=mismatches,
        exact=error <= EXACT_RTOL and not mismatches)


def _synchronize(device):
    if device.type == 'cuda':
        torch.cuda.synchronize(device)


def short_name(config):
    """A config's name up to its second ``_``, e.g. ``pspnet_r18-d8`` for
    ``mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py``."""
    name = osp.splitext(osp.basename(config.split('::')[-1]))[0]
    return '_'.join(name.split('_')[:2])


def _entries(config, name, references, checkpoint, parts, mmpretrain):
    """The models to time, as dicts of name, part, form and model."""
    train = build_segmentor(config, checkpoint)
    deploy = switch_to_deploy(copy.deepcopy(train))
    models = [(name, 'train', train), (name, 'deploy', deploy)]
    for reference in references:
        models.append(
            (short_name(reference), 'reference', build_segmentor(reference)))
    entries = []
    for part in parts:
        for model_name, form, model in models:
            module = (
                SegmentorLogits(model)
                if part == 'segmentor' else model.backbone)
            # Not chained: some backbones' train() returns None.
            module.eval()
            entries.append(
                dict(
                    name=f'{model_name} ({form})',
                    part=part,
                    form=form,
                    model=module))
        if part == 'backbone' and mmpretrain:
            entries.append(
                dict(
                    name='mmpretrain RepVGG (deploy)',
                    part=part,
                    form='mmpretrain',
                    model=build_mmpretrain_backbone(
                        read_config(config).model.backbone)))
    return entries


def _find(entries, part, form):
    return next(
        (e for e in entries if e['part'] == part and e['form'] == form), None)


def _ratio(candidate, baseline):
    # Takes models being timed and timings in results alike.
    per_round = [
        b / c for c, b in zip(candidate['times_s'], baseline['times_s'])
    ]
    return dict(
        part=candidate['part'],
        candidate=candidate['name'],
        baseline=baseline['name'],
        speedup=statistics.median(per_round),
        speedup_min=min(per_round),
        speedup_max=max(per_round))


def run_benchmark(config,
                  references=(),
                  checkpoint=None,
                  shape=(1, 3, 512, 1024),
                  parts=PARTS,
                  rounds=5,
                  warmup=2,
                  threads=None,
                  channels_last=False,
                  fast_path=(),
                  mmpretrain=False,
                  device='cpu',
                  seed=0,
                  name=None,
                  log=print):
    """Time a config's train and deploy forms against reference configs.

    Args:
        config (str): Config of a RepVGG segmentor (path or
            ``package::path``); its deploy form is derived in memory.
        references (Sequence[str]): Other configs to time as they are.
        checkpoint (str, optional): Train-form weights of ``config``.
            Defaults to None (random weights: speed does not depend on the
            values).
        shape (Sequence[int]): Input ``(N, C, H, W)``.
            Defaults to ``(1, 3, 512, 1024)``.
        parts (Sequence[str]): Any of ``'segmentor'`` (whole-image logits at
            input resolution) and ``'backbone'``. Defaults to both.
        rounds (int): Timed rounds; each model runs once per round.
            Defaults to 5.
        warmup (int): Untimed runs of each model first (at least one runs,
            for the output checks). Defaults to 2.
        threads (int, optional): ``torch.set_num_threads``. Defaults to
            None (unchanged).
        channels_last (bool): Run every model in channels-last memory
            format. Defaults to False.
        fast_path (Sequence[str]): Steps of :func:`optimize`; when given,
            the deploy form also runs on that path (a backbone skips the
            steps that change only a head, see :data:`HEAD_STEPS`), after a
            check of its outputs against plain deploy. Defaults to ()
            (none).
        mmpretrain (bool): Also time mmpretrain's deployed RepVGG backbone
            at the same settings. Defaults to False.
        device (str): ``'cpu'`` or a CUDA device. Defaults to ``'cpu'``.
        seed (int): Seed of the random input. Defaults to 0.
        name (str, optional): Name of ``config``'s models in the results.
            Defaults to the start of the config's file name, such as
            ``pspnet_repvgg-a0-d8``.
        log (callable): Receives progress lines. Defaults to ``print``.

    Returns:
        dict: ``settings``; ``timings`` (per model: name, part, form,
        ``times_s``, ``median_s``, ``min_s``, ``max_s``, ``spread`` =
        (max - min) / median); ``ratios`` (speed-ups of the deploy form
        over every other model of the same part, and of the fast path over
        plain deploy: median, min and max of the per-round ratios);
        ``checks`` (output agreement of deploy with train and of the fast
        path with deploy, see :func:`compare_outputs`).
    """
    check_fast_path(fast_path)
    unknown = set(parts) - set(PARTS)
    if unknown or not parts:
        raise ValueError(f'parts must be among {PARTS}, got {list(parts)}')
    if rounds < 1 or warmup < 0:
        raise ValueError('rounds must be >= 1 and warmup >= 0')
    if threads is not None:
        torch.set_num_threads(threads)
    device = torch.device(device)
    if device.type == 'cuda':
        # TF32 would trade fp32 accuracy for speed.
        torch.backends.cuda.matmul.allow_tf32 = False
        torch.backends.cudnn.allow_tf32 = False
        torch.backends.cudnn.benchmark = True
    memory_format = (
        torch.channels_last if channels_last else torch.contiguous_format)
    inputs = torch.randn(
        *shape, generator=torch.Generator().manual_seed(seed)).to(
            device, memory_format=memory_format)

    log(f'building models for {list(parts)}')
    entries = _entries(config, name or short_name(config), references,
                       checkpoint, parts, mmpretrain)
    for entry in entries:
        entry['model'].to(device, memory_format=memory_format)
    for part in parts:
        form = _fast_form(part, fast_path)
        if form:
            deploy = _find(entries, part, 'deploy')
            entries.insert(
                entries.index(deploy) + 1,
                dict(
                    name=deploy['name'].replace('(deploy)', f'({form})'),
                    part=part,
                    form=form,
                    model=optimize(deploy['model'], inputs,
                                   fast_steps_for(part, fast_path))))

    checks = []
    with torch.inference_mode():
        log(f'warm-up: {max(warmup, 1)} run(s) of {len(entries)} models')
        for entry in entries:
            for _ in range(max(warmup, 1)):
                entry['output'] = entry['model'](inputs)
        for part in parts:
            pairs = [('deploy', 'train')]
            fast = _fast_form(part, fast_path)
            if fast:
                pairs.append((fast, 'deploy'))
            for candidate, reference in pairs:
                candidate = _find(entries, part, candidate)
                reference = _find(entries, part, reference)
                checks.append(
                    dict(
                        part=part,
                        candidate=candidate['name'],
                        reference=reference['name'],
                        **compare_outputs(candidate['output'],
                                          reference['output'], part)))
        for entry in entries:
            del entry['output']
            entry['times_s'] = []
        for index in range(rounds):
            order = entries if index % 2 == 0 else entries[::-1]
            for entry in order:
                # Untimed, so that every timed run follows a run of the same
                # model, as frame after frame in deployment: no model
                # inherits the caches or the freed memory of another.
                entry['model'](inputs)
                _synchronize(device)
                start = time.perf_counter()
                entry['model'](inputs)
                _synchronize(device)
                entry['times_s'].append(time.perf_counter() - start)
            log(f'round {index + 1}/{rounds}: ' +
                ', '.join(f'{e["part"]} {e["name"]} {e["times_s"][-1]:.3f}s'
                          for e in entries))

    timings = []
    for entry in entries:
        samples = entry['times_s']
        median = statistics.median(samples)
        timings.append(
            dict(
                name=entry['name'],
                part=entry['part'],
                form=entry['form'],
                times_s=samples,
                median_s=median,
                min_s=min(samples),
                max_s=max(samples),
                spread=(max(samples) - min(samples)) / median))
    ratios = []
    for part in parts:
        deploy = _find(entries, part, 'deploy')
        for entry in entries:
            if entry['part'] != part or entry['form'] == 'deploy':
                continue
            if entry['form'].startswith('deploy+'):
                ratios.append(_ratio(entry, deploy))
            else:
                ratios.append(_ratio(deploy, entry))
    settings = dict(
        config=config,
        references=list(references),
        checkpoint=checkpoint,
        shape=list(shape),
        parts=list(parts),
        rounds=rounds,
        warmup=warmup,
        threads=torch.get_num_threads(),
        channels_last=channels_last,
        fast_path=list(fast_path),
        mmpretrain=mmpretrain,
        device=str(device),
        torch=torch.__version__)
    return dict(
        settings=settings, timings=timings, ratios=ratios, checks=checks)


def _describe(settings):
    shape = 'x'.join(map(str, settings['shape']))
    layout = ', channels-last' if settings['channels_last'] else ''
    return (f'{settings["device"]}, {settings["threads"]} thread(s), input '
            f'{shape}{layout}, {settings["rounds"]} round(s)')


def format_report(result):
    """The timings, speed-ups and output checks as a text table."""
    width = max(len(t['name']) for t in result['timings'])
    lines = [
        _describe(result['settings']),
        f'{"model":<{width}} {"part":<10} {"median s":>9} {"min s":>8} '
        f'{"max s":>8}'
    ]
    for t in result['timings']:
        lines.append(f'{t["name"]:<{width}} {t["part"]:<10} '
                     f'{t["median_s"]:>9.4f} {t["min_s"]:>8.4f} '
                     f'{t["max_s"]:>8.4f}')
    lines.append('speed-ups (median of per-round ratios, [min, max]):')
    for r in result['ratios']:
        lines.append(f'  {r["part"]}: {r["candidate"]} over {r["baseline"]}'
                     f': {r["speedup"]:.2f}x [{r["speedup_min"]:.2f}, '
                     f'{r["speedup_max"]:.2f}]')
    lines.append('output checks:')
    for c in result['checks']:
        labels = ('' if c['label_mismatches'] is None else
                  f', {c["label_mismatches"]} label(s) differ')
        if c['exact']:
            verdict = 'same fp32 predictions'
        elif c['max_rel_error'] <= EXACT_RTOL:
            # A label can only flip where two classes tie within the
            # difference of the outputs.
            verdict = 'outputs agree, labels flip at near-ties'
        else:
            verdict = 'DIFFERENT'
        lines.append(f'  {c["part"]}: {c["candidate"]} vs {c["reference"]}: '
                     f'max rel error {c["max_rel_error"]:.1e}{labels}: '
                     f'{verdict}')
    return '\n'.join(lines)


def write_json(result, path):
    """Write the result as JSON (atomically)."""
    text = json.dumps(result, indent=2).encode()
    write_atomic(path, lambda f: f.write(text))


def plot_chart(result, path):
    """Draw the median time of every model as a bar chart (PNG).

    One panel per part; whiskers span the fastest and slowest round, and
    each bar is labelled with its median and its speed relative to the
    first model of its panel (the train form).

    Args:
        result (dict): As returned by :func:`run_benchmark`.
        path (str): PNG to write (atomically).
    """
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    parts = result['settings']['parts']
    figure, axes = plt.subplots(
        len(parts),
        1,
        figsize=(9, 1.2 + 1.1 * len(result['timings'])),
        squeeze=False)
    for axis, part in zip(axes[:, 0], parts):
        timings = [t for t in result['timings'] if t['part'] == part]
        medians = [t['median_s'] for t in timings]
        errors = [[t['median_s'] - t['min_s'] for t in timings],
                  [t['max_s'] - t['median_s'] for t in timings]]
        rows = range(len(timings))
        axis.barh(rows, medians, xerr=errors, color='tab:blue', capsize=3)
        axis.set_yticks(list(rows), [t['name'] for t in timings])
        axis.invert_yaxis()
        axis.set_xlim(0, max(t['max_s'] for t in timings) * 1.45)
        for row, timing in zip(rows, timings):
            speedup = _ratio(timing, timings[0])['speedup']
            axis.text(
                timing['max_s'],
                row,
                f'  {timing["median_s"]:.3f} s  {speedup:.2f}x',
                va='center')
        axis.set_title(part)
        axis.set_xlabel('seconds per forward pass (median, whiskers: min '
                        'and max); speed-up over the first bar')
    figure.suptitle(_describe(result['settings']))
    figure.tight_layout()
    write_atomic(path, lambda f: figure.savefig(f, format='png', dpi=100))
    plt.close(figure)
