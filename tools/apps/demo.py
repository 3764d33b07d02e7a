"""The whole RepVGG workflow in one run, as a user would do it.

On toy data in Cityscapes' layout (or a real Cityscapes folder), it runs
the user's own commands, each printed first: ``mim train``, ``mim test``,
``tools/reparameterize.py``, ``mim test`` of the deploy pair,
``tools/export.py``, ``tools/test.py`` on each engine and
``tools/benchmark.py --json``. The summary table
(:func:`apps.report.format_report`) comes from what they wrote: mmengine's
metric files, the int8 model's metadata and the benchmark's JSON.
"""
import glob
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
from dataclasses import asdict, dataclass, field
from typing import Optional, Tuple

from mmrepvgg.cli import option, settings_from
from mmrepvgg.config import short_config_name
from mmrepvgg.deploy.model_info import read_model
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.fileio import write_files
from mmrepvgg.runner import check_work_dir
from mmrepvgg.testing import (cityscapes_images, majority_class_miou,
                              make_toy_cityscapes, write_cityscapes_config,
                              write_toy_config)
from .benchmark import BenchmarkSettings
from .engines import engine_forms, engine_settings, model_precision
from .report import (BenchmarkResult, DemoSummary, format_report, timed,
                     write_json)

TOOLS = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join(
    osp.dirname(TOOLS), 'configs', 'pspnet',
    'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
METRICS = ('aAcc', 'mIoU', 'mAcc')


class DemoError(MMRepVGGError):
    """A demo step that cannot run or failed."""


def _benchmark_option(name, **changes):
    """The option ``name`` of :class:`BenchmarkSettings`, its default or
    metadata changed by ``changes``."""
    setting = BenchmarkSettings.__dataclass_fields__[name]
    default = changes.pop('default', setting.default)
    return field(default=default, metadata=dict(setting.metadata, **changes))


@dataclass
class DemoSettings:
    """What :func:`run_demo` does; each field is an option of
    ``tools/demo.py``. The fields that :class:`BenchmarkSettings` has too
    are the benchmark's options, as it has them."""
    work_dir: str = option(
        'work_dirs/demo', 'where every output goes; '
        'must be new or empty unless --force')
    config: str = option(DEFAULT_CONFIG,
                         'segmentor config with a RepVGG backbone')
    data_root: Optional[str] = option(
        None, 'a real Cityscapes folder (with *_labelTrainIds.png labels), '
        "trained on with the config's own pipelines; none: toy data")
    iters: int = option(100, 'training iterations')
    image_size: Tuple[int, int] = option(
        (64, 128),
        'toy image size, also the training crop',
        metavar=('H', 'W'))
    num_train: int = option(16, 'toy training images')
    num_val: int = option(4, 'toy validation images')
    batch_size: int = option(4, 'training batch size on toy data')
    lr: float = option(0.01, 'learning rate on toy data')
    size: Tuple[int, int] = _benchmark_option(
        'size', flag='--bench-size', help='benchmark input size')
    rounds: int = _benchmark_option('rounds', default=3, flag='--bench-rounds')
    fold_psp: bool = _benchmark_option('fold_psp')
    threads: int = _benchmark_option('threads')
    backends: Tuple[str, ...] = _benchmark_option(
        'backends',
        default=('torch', 'onnxruntime'),
        help='torch, and engines to evaluate and time the ONNX model on')
    precisions: Tuple[str, ...] = _benchmark_option('precisions')
    calib_num: int = _benchmark_option('calib_num')
    force: bool = option(False,
                         'reuse a non-empty work dir, overwriting outputs')


def _run(command, log, step=None):
    """Run a user's command, ``mim`` or a tool's file and the arguments,
    shown first with its output after it; a failure raises
    :class:`DemoError` that names the ``step`` (default: ``mim train``,
    ``tools/test.py``...). Returns the step."""
    tool, *args = map(str, command)
    step = step or (f'mim {args[0]}' if tool == 'mim' else f'tools/{tool}')
    runs = ['-m', 'mim'] if tool == 'mim' else [osp.join(TOOLS, tool)]
    log('$ ' + shlex.join([sys.executable, *runs, *args]))
    sys.stdout.flush()
    returncode = subprocess.run([sys.executable, *runs, *args]).returncode
    if returncode != 0:
        raise DemoError(f'{step} failed with exit code {returncode} (its '
                        'output is above)')
    return step


def _test(name, config, model, settings, log, *engine):
    """Evaluate in ``work_dir/test_{name}``, a checkpoint with ``mim test``
    or an ONNX model with ``tools/test.py`` and the ``engine`` options; the
    metrics, which mmengine's logger writes there as the last JSON line of
    ``TIMESTAMP/TIMESTAMP.json``."""
    work_dir = osp.join(settings.work_dir, f'test_{name}')
    mim = ['mim', 'test', 'mmsegmentation', config, '--checkpoint', model]
    command = ['test.py', config, model, *engine] if engine else mim
    step = _run(command + ['--work-dir', work_dir], log)
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    if not logs:
        raise DemoError(f'{step} wrote no metrics under {work_dir}')
    with open(logs[-1]) as f:
        metrics = json.loads(f.read().splitlines()[-1])
    return {k: metrics[k] for k in METRICS}


def _check(settings):
    if settings.iters < 1:
        raise DemoError('--iters must be at least 1')
    if not osp.isfile(settings.config):
        raise DemoError(f'{settings.config}: no such config file')
    settings_from(settings, BenchmarkSettings).check()
    if settings.data_root is not None:
        cityscapes_images(settings.data_root)
    check_work_dir(settings.work_dir)
    if (osp.isdir(settings.work_dir) and os.listdir(settings.work_dir)
            and not settings.force):
        raise DemoError(f'{settings.work_dir}: exists and is not empty; '
                        'choose a new --work-dir or pass --force to '
                        'overwrite its outputs')


def _prepare_data(settings, config, summary, log):
    """Write the training config (and toy data)."""
    if settings.data_root is not None:
        write_cityscapes_config(settings.config, summary.data_root, config,
                                settings.iters)
        summary.data = f'Cityscapes at {settings.data_root}'
        return
    height, width = settings.image_size
    make_toy_cityscapes(summary.data_root, settings.num_train,
                        settings.num_val, height, width)
    write_toy_config(
        settings.config,
        summary.data_root,
        config,
        settings.iters,
        settings.image_size,
        settings.batch_size,
        settings.lr,
        log_interval=max(1, settings.iters // 20))
    summary.data = (f'toy Cityscapes layout, {settings.num_train} train / '
                    f'{settings.num_val} val images of {height}x{width}')
    summary.majority_class_miou = majority_class_miou(summary.data_root)
    log(f'wrote {summary.data} to {summary.data_root}')


def _train(settings, config, summary, log):
    train_dir = osp.dirname(summary.checkpoint)
    _run(['mim', 'train', 'mmsegmentation', config, '--work-dir', train_dir],
         log)
    if not osp.isfile(summary.checkpoint):
        raise DemoError(f'training wrote no {summary.checkpoint}')


def _evaluate_and_convert(settings, config, summary, log):
    metrics, force = summary.metrics, ['--force'] * settings.force
    deploy = summary.deploy_checkpoint
    metrics['train'] = _test('train', config, summary.checkpoint, settings,
                             log)
    _run(['reparameterize.py', config, summary.checkpoint, deploy, *force],
         log)
    metrics['deploy'] = _test('deploy', summary.deploy_config, deploy,
                              settings, log)
    summary.same_miou = metrics['train']['mIoU'] == metrics['deploy']['mIoU']


def _export(settings, config, summary, precision, log):
    """Export the deploy pair; the model, and for int8 its agreement."""
    out = osp.join(settings.work_dir, 'onnx', f'model_{precision}.onnx')
    options = ['--force'] * settings.force
    if settings.data_root is None:
        options += ['--shape', *settings.image_size]
    if precision == 'int8':
        # The demo reports the int8 agreement rather than refusing a model.
        options += [
            '--int8', '--calib-num', settings.calib_num, '--eval-num',
            settings.num_val, '--min-agreement', 0
        ]
    _run(['export.py', config, summary.deploy_checkpoint, out, *options], log,
         f'tools/export.py ({precision})')
    return out, read_model(out).info.agreement.get('labels')


def _export_and_evaluate(settings, config, summary, log):
    forms = engine_forms(settings.backends, settings.precisions)
    models = {
        precision: _export(settings, config, summary, precision, log)
        for precision in sorted({model_precision(p)
                                 for _, p in forms})
    }
    for backend, precision in forms:
        model, agreement = models[model_precision(precision)]
        engine = engine_settings(backend, precision, settings.threads)
        metrics = _test(f'{backend}_{precision}', config, model, settings, log,
                        '--backend', backend, '--precision', engine.precision,
                        '--threads', engine.threads)
        summary.engines[f'{backend} {precision}'] = dict(
            metrics, agreement=agreement)


def _benchmark(settings, config, summary, log):
    out = osp.join(settings.work_dir, 'benchmark.json')
    options = [
        '--checkpoint', summary.checkpoint, '--size', *settings.size,
        '--rounds', settings.rounds, '--warmup', 1, '--threads',
        settings.threads, '--name',
        short_config_name(settings.config), '--backends', *settings.backends,
        '--precisions', *settings.precisions, '--image',
        cityscapes_images(summary.data_root)[0], '--calib-num',
        settings.calib_num, '--json', out, '--chart', summary.chart
    ] + ['--fold-psp'] * settings.fold_psp + ['--force'] * settings.force
    _run(['benchmark.py', config, *options], log)
    with open(out) as f:
        summary.benchmark = json.load(f)


def run_demo(settings, log=print):
    """Generate data, train, evaluate, convert, evaluate, export, evaluate
    on the engines, benchmark.

    Args:
        settings (DemoSettings): What to do.
        log (callable): Receives progress lines. Defaults to ``print``.

    Returns:
        DemoSummary: Also written to ``work_dir/summary.json``, with the
        printed table in ``work_dir/summary.txt`` and the speed chart in
        ``work_dir/speed.png``.

    Raises:
        MMRepVGGError: Bad settings or a failed step.
    """
    _check(settings)
    work_dir = settings.work_dir = osp.abspath(settings.work_dir)
    os.makedirs(work_dir, exist_ok=True)
    config = osp.join(work_dir, 'train_config.py')
    summary = DemoSummary(
        settings.config,
        settings.iters,
        data_root=settings.data_root or osp.join(work_dir, 'data'),
        checkpoint=osp.join(work_dir, 'train', f'iter_{settings.iters}.pth'),
        deploy_checkpoint=osp.join(work_dir, 'deploy', 'deploy.pth'),
        deploy_config=osp.join(work_dir, 'deploy', 'deploy.py'),
        chart=osp.join(work_dir, 'speed.png'))
    steps = [
        ('data', 'data', _prepare_data),
        ('train', f'training for {settings.iters} iterations', _train),
        ('evaluate_and_convert', 'evaluation, re-parameterization, '
         'evaluation of the deploy pair', _evaluate_and_convert),
        ('export_and_evaluate', 'ONNX export, evaluation on the engines',
         _export_and_evaluate),
        ('benchmark', 'speed of the train form, the deploy form and the '
         'engines', _benchmark),
    ]
    for index, (step, title, function) in enumerate(steps, 1):
        log(f'== {index}/{len(steps)} {title}')
        seconds, _ = timed(function, settings, config, summary, log)
        summary.seconds[step] = round(seconds, 1)
    table = format_report(
        BenchmarkResult.from_dict(summary.benchmark), summary)
    write_files({osp.join(work_dir, 'summary.txt'): table.encode() + b'\n'},
                force=True)
    write_json(asdict(summary), osp.join(work_dir, 'summary.json'))
    log(table)
    return summary
