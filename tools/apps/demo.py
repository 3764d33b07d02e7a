"""The whole RepVGG workflow in one run, as a user would do it.

1. Data: a learnable toy dataset in Cityscapes' layout, or a real
   Cityscapes folder.
2. ``mim train mmsegmentation`` trains the segmentor (its log is shown).
3. ``mim test mmsegmentation`` evaluates it; :func:`mmrepvgg.reparameterize`
   converts it; ``mim test`` evaluates the deploy checkpoint and config.
4. :func:`mmrepvgg.deploy.export_onnx` exports the deploy pair to ONNX
   (:func:`mmrepvgg.quantization.ptq.export_int8` in calibrated int8, if
   asked), and each engine evaluates it with mmseg's
   metrics.
5. :func:`apps.benchmark.run_benchmark` times train form, deploy form and
   the engines; a summary table and a PNG chart are written.

The mim steps run the command a user would type, and print it.
"""
import glob
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import time
from dataclasses import dataclass, field
from typing import Optional, Tuple

from mmrepvgg.deploy.engines import BACKENDS
from mmrepvgg.deploy.export import ExportJob, ExportSettings, export_onnx
from mmrepvgg.deploy.pair import deploy_config_path, reparameterize
from mmrepvgg.errors import MMRepVGGError
from mmrepvgg.fileio import write_files
from mmrepvgg.quantization.ptq import Int8Settings, export_int8
from mmrepvgg.runner import evaluate
from mmrepvgg.testing import (majority_class_miou, make_toy_cityscapes,
                              write_toy_config)
from .benchmark import BenchmarkSettings, run_benchmark, short_name
from .engines import (FORM_PRECISIONS, check_engines, engine_forms,
                      engine_settings, model_precision)
from .fast_path import FAST_STEPS, check_fast_path
from .report import format_report, plot_chart, write_json

REPO_ROOT = osp.dirname(osp.dirname(osp.dirname(osp.abspath(__file__))))
DEFAULT_CONFIG = osp.join(
    REPO_ROOT, 'configs', 'pspnet',
    'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')

_REAL_DATA_CONFIG = '''\
# Derived from {base} to train on the Cityscapes folder {data_root}.
_base_ = {base!r}
train_dataloader = dict(dataset=dict(data_root={data_root!r}))
val_dataloader = dict(dataset=dict(data_root={data_root!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(checkpoint=dict(by_epoch=False, interval={iters}))
'''


class DemoError(MMRepVGGError):
    """A demo step that cannot run or failed."""


def _setting(default, help, metavar=None, choices=None):
    metadata = dict(help=help)
    if metavar:
        metadata['metavar'] = metavar
    if choices:
        metadata['choices'] = choices
    return field(default=default, metadata=metadata)


@dataclass
class DemoSettings:
    """What :func:`run_demo` does; each field is an option of
    ``tools/demo.py``."""
    work_dir: str = _setting(
        'work_dirs/demo', 'where every output goes; '
        'must be new or empty unless --force')
    config: str = _setting(DEFAULT_CONFIG,
                           'segmentor config with a RepVGG backbone')
    data_root: Optional[str] = _setting(
        None, 'a real Cityscapes folder (with *_labelTrainIds.png labels), '
        "trained on with the config's own pipelines; none: toy data")
    iters: int = _setting(100, 'training iterations')
    image_size: Tuple[int, int] = _setting(
        (64, 128), 'toy image size, also the training crop', ('H', 'W'))
    num_train: int = _setting(16, 'toy training images')
    num_val: int = _setting(4, 'toy validation images')
    batch_size: int = _setting(4, 'training batch size on toy data')
    lr: float = _setting(0.01, 'learning rate on toy data')
    bench_size: Tuple[int, int] = _setting((512, 1024), 'benchmark input size',
                                           ('H', 'W'))
    bench_rounds: int = _setting(3, 'timed benchmark rounds')
    fast_path: Tuple[str, ...] = _setting(
        (), 'steps of an exact fast path to time too', choices=FAST_STEPS)
    threads: int = _setting(
        0, "torch and engine threads for the benchmark; 0: their own choice")
    backends: Tuple[str, ...] = _setting(
        ('torch', 'onnxruntime'),
        'torch and the engines that evaluate and time the ONNX model',
        choices=('torch', *BACKENDS))
    precisions: Tuple[str, ...] = _setting(('fp32', ),
                                           'precisions of the engines',
                                           choices=FORM_PRECISIONS)
    calib_num: int = _setting(Int8Settings.calib_num,
                              'training images that int8 is calibrated on')
    force: bool = _setting(False,
                           'reuse a non-empty work dir, overwriting outputs')


def check_cityscapes(data_root):
    """Refuse a folder that mmseg's Cityscapes dataset cannot read.

    Raises:
        DemoError: No ``leftImg8bit/val`` images or no
            ``*_gtFine_labelTrainIds.png`` labels in ``gtFine/val``.
    """
    images = glob.glob(osp.join(data_root, 'leftImg8bit', 'val', '*', '*.png'))
    labels = glob.glob(
        osp.join(data_root, 'gtFine', 'val', '*',
                 '*_gtFine_labelTrainIds.png'))
    if not images:
        raise DemoError(f'{data_root}: not a Cityscapes folder (no images in '
                        'leftImg8bit/val/*/)')
    if not labels:
        raise DemoError(
            f'{data_root}: gtFine/val holds no *_labelTrainIds.png; create '
            "them with mmseg's tools/dataset_converters/cityscapes.py")


def write_cityscapes_config(base, data_root, out, iters):
    """Write a config that trains ``base`` on the Cityscapes folder
    ``data_root`` for ``iters`` iterations, with ``base``'s own pipelines
    and initialization.

    Returns:
        str: ``out``.
    """
    text = _REAL_DATA_CONFIG.format(
        base=osp.abspath(base), data_root=osp.abspath(data_root), iters=iters)
    write_files({out: text.encode()}, force=True)
    return out


def _run_mim(name, args, log):
    """Run ``mim`` as a user would, showing the command and its output; a
    failure raises :class:`DemoError` that names the step."""
    command = [sys.executable, '-m', 'mim', *args]
    log('$ ' + shlex.join(command))
    returncode = subprocess.run(command).returncode
    if returncode != 0:
        raise DemoError(f'{name} failed with exit code {returncode} (its '
                        'output is above)')


def _mim_test(config, checkpoint, work_dir, log):
    """``mim test mmsegmentation``; returns its metrics (aAcc, mIoU, mAcc)."""
    _run_mim('mim test', [
        'test', 'mmsegmentation', config, '--checkpoint', checkpoint,
        '--work-dir', work_dir
    ], log)
    # mmengine's logger writes the test metrics as one JSON line in
    # WORK_DIR/TIMESTAMP/TIMESTAMP.json; the newest run is last.
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    if not logs:
        raise DemoError(f'mim test wrote no metrics under {work_dir}')
    with open(logs[-1]) as f:
        metrics = json.loads(f.read().splitlines()[-1])
    return {k: metrics[k] for k in ('aAcc', 'mIoU', 'mAcc')}


def _check(settings):
    if settings.iters < 1:
        raise DemoError('--iters must be at least 1')
    if not osp.isfile(settings.config):
        raise DemoError(f'{settings.config}: no such config file')
    check_fast_path(settings.fast_path, settings.config)
    check_engines(settings.backends, settings.precisions)
    if settings.data_root is not None:
        check_cityscapes(settings.data_root)
    if osp.isfile(settings.work_dir):
        raise DemoError(f'{settings.work_dir}: is a file, not a folder')
    if (osp.isdir(settings.work_dir) and os.listdir(settings.work_dir)
            and not settings.force):
        raise DemoError(f'{settings.work_dir}: exists and is not empty; '
                        'choose a new --work-dir or pass --force to '
                        'overwrite its outputs')


def _prepare_data(settings, train_config, log):
    """Write the training config (and toy data); returns a description of
    the data, its root and the majority-class mIoU (None for real data)."""
    if settings.data_root is not None:
        write_cityscapes_config(settings.config, settings.data_root,
                                train_config, settings.iters)
        return f'Cityscapes at {settings.data_root}', settings.data_root, None
    height, width = settings.image_size
    data_root = make_toy_cityscapes(
        osp.join(settings.work_dir, 'data'),
        num_train=settings.num_train,
        num_val=settings.num_val,
        height=height,
        width=width)
    write_toy_config(
        settings.config,
        data_root,
        train_config,
        iters=settings.iters,
        crop=settings.image_size,
        batch_size=settings.batch_size,
        lr=settings.lr,
        log_interval=max(1, settings.iters // 20))
    data = (f'toy Cityscapes layout, {settings.num_train} train / '
            f'{settings.num_val} val images of {height}x{width}')
    log(f'wrote {data} to {data_root}')
    return data, data_root, majority_class_miou(data_root)


def _train(settings, train_config, log):
    train_dir = osp.join(settings.work_dir, 'train')
    _run_mim(
        'mim train',
        ['train', 'mmsegmentation', train_config, '--work-dir', train_dir],
        log)
    checkpoint = osp.join(train_dir, f'iter_{settings.iters}.pth')
    if not osp.isfile(checkpoint):
        raise DemoError(f'training wrote no {checkpoint}')
    return checkpoint


def _convert(settings, train_config, checkpoint, log):
    out = osp.join(settings.work_dir, 'deploy', 'deploy.pth')
    log('converting with mmrepvgg.reparameterize, as tools/reparameterize.py '
        f'does: {checkpoint} -> {out}')
    result = reparameterize(
        train_config, checkpoint, out, force=settings.force)
    log(f'converted {result.converted} blocks, {result.check.describe()}; '
        f'wrote {out} and {result.out_config}')
    return out


def _export(settings, train_config, checkpoint, precision, log):
    out = osp.join(settings.work_dir, 'onnx', f'model_{precision}.onnx')
    log(f'exporting as tools/export.py does'
        f'{" with --int8" if precision == "int8" else ""}: {out}')
    # The demo reports the int8 agreement rather than refusing a model.
    int8 = Int8Settings(settings.calib_num, settings.num_val,
                        0) if precision == 'int8' else None
    job = ExportJob.checked(
        train_config,
        checkpoint,
        out,
        ExportSettings(None if settings.data_root else settings.image_size),
        force=settings.force)
    result = export_onnx(job) if int8 is None else export_int8(job, int8)
    log(f'the engines vs PyTorch: {result.check.describe()}')
    return out, result.info.agreement


def _export_and_evaluate(settings, train_config, checkpoint, log):
    """Metrics, and for int8 the label agreement with fp32, of the exported
    model on each engine form."""
    forms = engine_forms(settings.backends, settings.precisions)
    models = {
        precision: _export(settings, train_config, checkpoint, precision, log)
        for precision in {model_precision(p)
                          for _, p in forms}
    }
    engines = {}
    for backend, precision in forms:
        model, agreement = models[model_precision(precision)]
        log(f'evaluating {osp.basename(model)} on {backend} ({precision})')
        metrics = evaluate(
            train_config, model,
            osp.join(settings.work_dir, f'test_{backend}_{precision}'),
            engine_settings(backend, precision, settings.threads))
        engines[f'{backend} {precision}'] = dict(
            {k: metrics[k]
             for k in ('aAcc', 'mIoU', 'mAcc')},
            agreement=agreement.get('labels'))
    return engines


def _benchmark(settings, train_config, checkpoint, image, log):
    result = run_benchmark(
        BenchmarkSettings(
            train_config,
            checkpoint=checkpoint,
            size=settings.bench_size,
            rounds=settings.bench_rounds,
            warmup=1,
            threads=settings.threads,
            fast_path=settings.fast_path,
            name=short_name(settings.config),
            backends=settings.backends,
            precisions=settings.precisions,
            image=image,
            calib_num=settings.calib_num),
        log=log)
    plot_chart(result, osp.join(settings.work_dir, 'speed.png'))
    return result


def run_demo(settings, log=print):
    """Generate data, train, evaluate, convert, evaluate, benchmark.

    Args:
        settings (DemoSettings): What to do.
        log (callable): Receives progress lines. Defaults to ``print``.

    Returns:
        dict: The summary (data, checkpoints, metrics of both forms,
        ``same_miou``, seconds per step and the benchmark result), also
        written to ``work_dir/summary.json``, with the printed table in
        ``work_dir/summary.txt`` and the speed chart in
        ``work_dir/speed.png``.

    Raises:
        MMRepVGGError: Bad settings or a failed step.
    """
    _check(settings)
    settings.work_dir = osp.abspath(settings.work_dir)
    os.makedirs(settings.work_dir, exist_ok=True)
    train_config = osp.join(settings.work_dir, 'train_config.py')
    steps = _StepClock()
    summary = dict(config=settings.config, iters=settings.iters)
    log('== 1/5 data')
    summary.update(
        zip(('data', 'data_root', 'majority_class_miou'),
            _prepare_data(settings, train_config, log)))
    steps.done('data')
    log(f'== 2/5 training for {settings.iters} iterations')
    summary['checkpoint'] = checkpoint = _train(settings, train_config, log)
    steps.done('train')
    log('== 3/5 evaluation, re-parameterization, evaluation of the deploy '
        'pair')
    summary.update(
        _evaluate_and_convert(settings, train_config, checkpoint, log))
    steps.done('evaluate_and_convert')
    log('== 4/5 ONNX export, evaluation on the engines')
    summary['engines'] = _export_and_evaluate(settings, train_config,
                                              summary['deploy_checkpoint'],
                                              log)
    steps.done('export_and_evaluate')
    log('== 5/5 speed of the train form, the deploy form and the engines')
    bench = _benchmark(settings, train_config, checkpoint,
                       _first_val_image(summary['data_root']), log)
    steps.done('benchmark')
    summary.update(
        seconds=steps.seconds,
        benchmark=bench.to_dict(),
        chart=osp.join(settings.work_dir, 'speed.png'))
    _write_summary(summary, format_summary(summary, bench), settings, log)
    return summary


def _evaluate_and_convert(settings, train_config, checkpoint, log):
    metrics = dict(
        train=_mim_test(train_config, checkpoint,
                        osp.join(settings.work_dir, 'test_train'), log))
    deploy_checkpoint = _convert(settings, train_config, checkpoint, log)
    metrics['deploy'] = _mim_test(
        deploy_config_path(deploy_checkpoint), deploy_checkpoint,
        osp.join(settings.work_dir, 'test_deploy'), log)
    return dict(
        metrics=metrics,
        deploy_checkpoint=deploy_checkpoint,
        deploy_config=deploy_config_path(deploy_checkpoint),
        same_miou=metrics['train']['mIoU'] == metrics['deploy']['mIoU'])


def _first_val_image(data_root):
    return sorted(
        glob.glob(osp.join(data_root, 'leftImg8bit', 'val', '*', '*.png')))[0]


class _StepClock:
    """Seconds each step took."""

    def __init__(self):
        self.seconds = {}
        self.started = time.perf_counter()

    def done(self, step):
        now = time.perf_counter()
        self.seconds[step] = round(now - self.started, 1)
        self.started = now


def _write_summary(summary, table, settings, log):
    write_files(
        {osp.join(settings.work_dir, 'summary.txt'): table.encode() + b'\n'},
        force=True)
    write_json(summary, osp.join(settings.work_dir, 'summary.json'))
    log(table)


def _speeds(bench, name):
    """Speed of each segmentor form relative to PyTorch deploy (segmentor
    part, median of per-round ratios)."""
    speeds = {'deploy': 1.0}
    for ratio in bench.ratios:
        if ratio.part != 'segmentor':
            continue
        if ratio.candidate == f'{name} (deploy)':
            speeds[ratio.baseline[len(name) + 2:-1]] = 1 / ratio.speedup
        elif ratio.baseline == f'{name} (deploy)':
            speeds[ratio.candidate[len(name) + 2:-1]] = ratio.speedup
    return speeds


def _row(form, metrics, speed, agreement=None):
    agreed = '' if agreement is None else f'{agreement:.2%}'
    shown = '' if speed is None else f'{speed:.2f}x'
    return (f'{form:<18} {metrics["mIoU"]:>7.2f} {metrics["mAcc"]:>7.2f} '
            f'{metrics["aAcc"]:>7.2f} {agreed:>10} {shown:>9}')


def format_summary(summary, bench):
    """The demo's one summary table: accuracy and speed of every form,
    then the benchmark report."""
    chance = summary['majority_class_miou']
    speeds = _speeds(bench, short_name(summary['config']))
    lines = [
        '=' * 72,
        f'RepVGG demo: {osp.basename(summary["config"])}',
        f'data: {summary["data"]}',
        f'trained {summary["iters"]} iterations: {summary["checkpoint"]}',
        f'deploy pair: {summary["deploy_checkpoint"]} + .py',
        f'{"form":<18} {"mIoU":>7} {"mAcc":>7} {"aAcc":>7} '
        f'{"=fp32 px":>10} {"speed":>9}',
    ]
    for form in ('train', 'deploy'):
        lines.append(
            _row(f'torch {form}', summary['metrics'][form], speeds.get(form)))
    for form, metrics in summary['engines'].items():
        lines.append(
            _row(form, metrics, speeds.get(form), metrics['agreement']))
    if chance is not None:
        lines.append(f'{"majority class":<18} {chance:>7.2f}')
    lines.append('speed: of the segmentor, over PyTorch deploy; =fp32 px: '
                 'int8 labels equal to fp32 ones, on the val set')
    lines.append('same mIoU for both torch forms: ' +
                 ('yes' if summary['same_miou'] else 'NO'))
    lines.append(format_report(bench))
    lines.append(f'speed chart: {summary["chart"]}')
    lines.append('seconds per step: ' +
                 ', '.join(f'{step} {value:.0f}'
                           for step, value in summary['seconds'].items()))
    lines.append('=' * 72)
    return '\n'.join(lines)
