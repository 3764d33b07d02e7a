"""The benchmark's and the demo's results: typed records, a text table
(the benchmark's inside the demo's), JSON and a PNG chart."""
import dataclasses
import io
import json
import os.path as osp
import statistics
import time
from dataclasses import asdict, dataclass, field
from typing import List, Optional

from mmrepvgg.deploy.compare import OutputComparison
from mmrepvgg.deploy.engines import BACKENDS
from mmrepvgg.fileio import write_files


def timed(function, *args, **kwargs):
    """The seconds that ``function(*args, **kwargs)`` takes, and what it
    returns."""
    start = time.perf_counter()
    outcome = function(*args, **kwargs)
    return time.perf_counter() - start, outcome


@dataclass
class Timing:
    """Seconds per run of one model; ``spread`` is (max - min) / median."""
    name: str
    model: str
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
        return cls(entry.name, entry.model,
                   entry.part, entry.form, samples, median, min(samples),
                   max(samples), (max(samples) - min(samples)) / median)


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


@dataclass(frozen=True)
class Check(OutputComparison):
    """How far a model's (``candidate``) outputs are from a ``reference``
    model's."""
    part: str
    candidate: str
    reference: str


@dataclass
class Int8Ceiling:
    """An engine's int8 speed-up of our segmentor (``model_speedup``) and of
    one 3x3 conv (``conv_speedup``, see :data:`apps.engines.CONV_SHAPE`),
    each over its fp32; ``share`` is the first over the second."""
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

    @classmethod
    def from_dict(cls, data):
        """The result that :meth:`to_dict` gave ``data``."""
        return cls(
            data['settings'],
            *([record(**d) for d in data[f.name]]
              for record, f in zip((Timing, Ratio, Check, Int8Ceiling),
                                   dataclasses.fields(cls)[1:])))


def speedups(entries):
    """The speed-ups that the benchmark reports of its timed ``entries``
    (:class:`apps.benchmark.Entry`, ours first): our deploy form over each
    reference; each entry made from another over it, and ours in each
    engine form over each reference in it."""
    ours, pairs = entries[0].model, []
    index = {(e.model, e.part, e.form): e for e in reversed(entries)}
    for entry in entries:
        if entry.form == 'reference':
            pairs.append((index[ours, entry.part, 'deploy'], entry))
        elif entry.base is not None:
            pairs += [(entry, entry.base),
                      (index[ours, entry.part, entry.form], entry)]
    return [Ratio.of(a, b) for a, b in pairs if a is not b]


def int8_ceilings(entries):
    """Each engine's int8 speed-up of our segmentor (the first entry's
    model) and of one conv (the part ``conv``), as :func:`speedups` takes
    the entries."""
    ours = {
        (e.part, e.form): e
        for e in reversed(entries)
        if e.model == entries[0].model or e.part == 'conv'
    }
    ceilings = []
    for backend in BACKENDS:
        pairs = [[
            ours.get((part, f'{backend} {precision}'))
            for precision in ('int8', 'fp32')
        ] for part in ('segmentor', 'conv')]
        if None not in pairs[0] + pairs[1]:
            model, conv = (Ratio.of(*pair).speedup for pair in pairs)
            ceilings.append(Int8Ceiling(backend, model, conv, model / conv))
    return ceilings


@dataclass
class DemoSummary:
    """What the demo did and measured, as ``summary.json`` holds it:
    ``metrics`` of the ``train`` and ``deploy`` forms, and of each engine
    form in ``engines`` with its int8 ``agreement`` (labels equal to fp32's
    on the val set); ``seconds`` per step; the benchmark's result."""
    config: str
    iters: int
    data: str = ''
    data_root: str = ''
    majority_class_miou: Optional[float] = None
    checkpoint: str = ''
    deploy_checkpoint: str = ''
    deploy_config: str = ''
    metrics: dict = field(default_factory=dict)
    same_miou: bool = False
    engines: dict = field(default_factory=dict)
    seconds: dict = field(default_factory=dict)
    benchmark: dict = field(default_factory=dict)
    chart: str = ''


def _describe(settings):
    shape = 'x'.join(map(str, settings['shape']))
    return (f'{settings["device"]}, {settings["threads"]} thread(s), input '
            f'{shape}, {settings["rounds"]} round(s)')


def _verdict(check):
    if check.exact:
        # Labels may only flip where two classes tie within the limit.
        return 'same fp32 predictions'
    if check.candidate.endswith(('bf16)', 'int8)')):
        # bf16 and int8 engines trade exactness for speed by design.
        return f'{check.label_agreement:.2%} of labels agree'
    return 'DIFFERENT'


def format_report(result, summary=None):
    """The timings, speed-ups and output checks of a
    :class:`BenchmarkResult` as a text table; given the
    demo's :class:`DemoSummary`, inside the demo's table: the
    accuracy and speed of every form, the run's files and its steps."""
    width = max(len(t.name) for t in result.timings)
    lines = [
        _describe(result.settings),
        f'{"model":<{width}} {"part":<10} {"median s":>9} {"min s":>8} '
        f'{"max s":>8}'
    ]
    lines += [
        f'{t.name:<{width}} {t.part:<10} {t.median_s:>9.4f} '
        f'{t.min_s:>8.4f} {t.max_s:>8.4f}' for t in result.timings
    ]
    lines.append('speed-ups (median of per-round ratios, [min, max]):')
    lines += [
        f'  {r.part}: {r.candidate} over {r.baseline}: {r.speedup:.2f}x '
        f'[{r.speedup_min:.2f}, {r.speedup_max:.2f}]' for r in result.ratios
    ]
    lines += [
        f'  {c.backend}: the segmentor in int8 runs {c.model_speedup:.2f}x '
        f'its fp32, one 3x3 conv of 256 channels {c.conv_speedup:.2f}x: '
        f'{c.share:.0%} of the engine\'s int8 ceiling'
        for c in result.int8_ceilings
    ]
    lines.append('output checks:')
    for c in result.checks:
        labels = ('' if c.label_mismatches is None else
                  f', {c.label_mismatches} label(s) differ')
        lines.append(f'  {c.part}: {c.candidate} vs {c.reference}: max rel '
                     f'error {c.max_rel_error:.1e} (limit {c.limit:.1e})'
                     f'{labels}: {_verdict(c)}')
    if summary is not None:
        lines = _demo_head(summary, result) + lines + _demo_tail(summary)
    return '\n'.join(lines)


def _speeds(result):
    """Speed of each segmentor form of our model over its PyTorch deploy
    form (median of per-round ratios)."""
    ours = {
        t.form: t
        for t in result.timings
        if t.part == 'segmentor' and t.model == result.timings[0].model
    }
    return {
        form: Ratio.of(timing, ours['deploy']).speedup
        for form, timing in ours.items()
    }


def _row(form, metrics, speed, agreement=None):
    agreed = '' if agreement is None else f'{agreement:.2%}'
    shown = '' if speed is None else f'{speed:.2f}x'
    return (f'{form:<18} {metrics["mIoU"]:>7.2f} {metrics["mAcc"]:>7.2f} '
            f'{metrics["aAcc"]:>7.2f} {agreed:>10} {shown:>9}')


def _demo_head(summary, result):
    speeds = _speeds(result)
    lines = [
        '=' * 72,
        f'RepVGG demo: {osp.basename(summary.config)}',
        f'data: {summary.data}',
        f'trained {summary.iters} iterations: {summary.checkpoint}',
        f'deploy pair: {summary.deploy_checkpoint} + .py',
        f'{"form":<18} {"mIoU":>7} {"mAcc":>7} {"aAcc":>7} '
        f'{"=fp32 px":>10} {"speed":>9}',
    ]
    lines += [
        _row(f'torch {form}', summary.metrics[form], speeds.get(form))
        for form in ('train', 'deploy')
    ]
    lines += [
        _row(form, metrics, speeds.get(form), metrics['agreement'])
        for form, metrics in summary.engines.items()
    ]
    if summary.majority_class_miou is not None:
        lines.append(f'{"majority class":<18} '
                     f'{summary.majority_class_miou:>7.2f}')
    return lines + [
        'speed: of the segmentor, over PyTorch deploy; =fp32 px: int8 '
        'labels equal to fp32 ones, on the val set',
        'same mIoU for both torch forms: ' +
        ('yes' if summary.same_miou else 'NO')
    ]


def _demo_tail(summary):
    return [
        f'speed chart: {summary.chart}', 'seconds per step: ' +
        ', '.join(f'{step} {value:.0f}'
                  for step, value in summary.seconds.items()), '=' * 72
    ]


def write_json(data, path, force=True):
    """Write JSON-serializable ``data`` to ``path`` (atomically; an
    existing file only with ``force``)."""
    write_files({path: json.dumps(data, indent=2).encode()}, force)


def plot_chart(result, path, force=True):
    """Draw the median time of every model as a bar chart (PNG).

    One panel per part; whiskers span the fastest and slowest round, and
    each bar is labelled with its median and its speed relative to the
    first model of its panel (the train form).

    Args:
        result (BenchmarkResult): As returned by
            :func:`apps.benchmark.run_benchmark`.
        path (str): PNG to write (atomically).
        force (bool): Replace an existing file. Defaults to True.
    """
    import matplotlib
    matplotlib.use('Agg')
    from matplotlib import pyplot as plt

    parts = result.settings['parts']
    figure, axes = plt.subplots(
        len(parts),
        1,
        figsize=(9, 1.2 + 1.1 * len(result.timings)),
        squeeze=False)
    for axis, part in zip(axes[:, 0], parts):
        _plot_part(axis, [t for t in result.timings if t.part == part])
        axis.set_title(part)
    figure.suptitle(_describe(result.settings))
    figure.tight_layout()
    png = io.BytesIO()
    figure.savefig(png, format='png', dpi=100)
    plt.close(figure)
    write_files({path: png.getvalue()}, force)


def _plot_part(axis, timings):
    medians = [t.median_s for t in timings]
    errors = [[t.median_s - t.min_s for t in timings],
              [t.max_s - t.median_s for t in timings]]
    rows = range(len(timings))
    axis.barh(rows, medians, xerr=errors, color='tab:blue', capsize=3)
    axis.set_yticks(list(rows), [t.name for t in timings])
    axis.invert_yaxis()
    axis.set_xlim(0, max(t.max_s for t in timings) * 1.45)
    for row, timing in zip(rows, timings):
        speedup = Ratio.of(timing, timings[0]).speedup
        axis.text(
            timing.max_s,
            row,
            f'  {timing.median_s:.3f} s  {speedup:.2f}x',
            va='center')
    axis.set_xlabel('seconds per forward pass (median, whiskers: min and '
                    'max); speed-up over the first bar')
