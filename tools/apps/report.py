"""The benchmark's results as a text table, JSON and a PNG chart."""
import io
import json

from mmrepvgg.fileio import write_files
from .benchmark import Ratio


def _describe(settings):
    shape = 'x'.join(map(str, settings['shape']))
    layout = ', channels-last' if settings['channels_last'] else ''
    return (f'{settings["device"]}, {settings["threads"]} thread(s), input '
            f'{shape}{layout}, {settings["rounds"]} round(s)')


def _verdict(check):
    if check.exact:
        # Labels may only flip where two classes tie within the limit.
        return 'same fp32 predictions'
    if _approximate(check.candidate):
        return f'{check.label_agreement:.2%} of labels agree'
    return 'DIFFERENT'


def _approximate(name):
    # bf16 and int8 engines trade exactness for speed by design.
    return name.endswith(('bf16)', 'int8)'))


def format_report(result):
    """The timings, speed-ups and output checks of a
    :class:`apps.benchmark.BenchmarkResult` as a text table."""
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
    return '\n'.join(lines)


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
