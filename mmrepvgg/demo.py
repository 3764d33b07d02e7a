"""The whole RepVGG workflow in one run, as a user would do it.

1. Data: a learnable toy dataset in Cityscapes' layout, or a real
   Cityscapes folder.
2. ``mim train mmsegmentation`` trains the segmentor (its log is shown).
3. ``mim test mmsegmentation`` evaluates it; ``tools/reparameterize.py``
   converts it; ``mim test`` evaluates the deploy checkpoint and config.
4. :func:`mmrepvgg.benchmark.run_benchmark` times train form against
   deploy form; a summary table and a PNG chart are written.

Every step runs the same command line a user would type, and prints it.
"""
import glob
import json
import os
import os.path as osp
import shlex
import subprocess
import sys
import time

import cv2
import numpy as np

from .benchmark import (check_fast_path, format_report, plot_chart,
                        run_benchmark, short_name, write_json)
from .fileio import write_atomic
from .reparameterize import deploy_config_path
from .toy_data import make_toy_cityscapes, write_toy_config

REPO_ROOT = osp.dirname(osp.dirname(osp.abspath(__file__)))
DEFAULT_CONFIG = osp.join(
    REPO_ROOT, 'configs', 'pspnet',
    'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
IGNORE_INDEX = 255

_REAL_DATA_CONFIG = '''\
# Derived from {base} to train on the Cityscapes folder {data_root}.
_base_ = {base!r}
train_dataloader = dict(dataset=dict(data_root={data_root!r}))
val_dataloader = dict(dataset=dict(data_root={data_root!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(checkpoint=dict(by_epoch=False, interval={iters}))
'''


class DemoError(RuntimeError):
    """A demo step that cannot run or failed."""


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
    write_atomic(out, lambda f: f.write(text.encode()))
    return out


def majority_class_miou(data_root, split='val'):
    """mIoU (%) of predicting the most frequent class everywhere.

    The reference for "above chance": that class scores its pixel share as
    IoU, every other class present scores 0.
    """
    counts = np.zeros(IGNORE_INDEX + 1, np.int64)
    for path in glob.glob(
            osp.join(data_root, 'gtFine', split, '*',
                     '*_gtFine_labelTrainIds.png')):
        labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        counts += np.bincount(labels.ravel(), minlength=counts.size)
    counts = counts[:IGNORE_INDEX]
    present = np.count_nonzero(counts)
    return 100 * counts.max() / counts.sum() / present


def _run(name, command, log, env=None, capture=False):
    """Run a step's command line, showing it and (unless ``capture``) its
    output; a failure raises :class:`DemoError` that names the step."""
    log('$ ' + shlex.join(command))
    result = subprocess.run(
        command, env=env, capture_output=capture, text=True, cwd=REPO_ROOT)
    if capture and result.stdout:
        log(result.stdout.rstrip())
    if result.returncode != 0:
        detail = (result.stderr
                  or '').strip().splitlines()[-1:] or ['its output is above']
        raise DemoError(f'{name} failed with exit code {result.returncode}: '
                        f'{detail[0]}')
    return result


def _mim_env():
    # mmseg's tools run in child processes: let them import this checkout.
    env = dict(os.environ)
    env['PYTHONPATH'] = os.pathsep.join(
        filter(None, [REPO_ROOT, env.get('PYTHONPATH')]))
    return env


def _mim_test(config, checkpoint, work_dir, log):
    """``mim test mmsegmentation``; returns its metrics (aAcc, mIoU, mAcc)."""
    _run('mim test', [
        sys.executable, '-m', 'mim', 'test', 'mmsegmentation', config,
        '--checkpoint', checkpoint, '--work-dir', work_dir
    ], log, _mim_env())
    # mmengine's logger writes the test metrics as one JSON line in
    # WORK_DIR/TIMESTAMP/TIMESTAMP.json; the newest run is last.
    logs = sorted(glob.glob(osp.join(work_dir, '*', '*.json')))
    if not logs:
        raise DemoError(f'mim test wrote no metrics under {work_dir}')
    with open(logs[-1]) as f:
        metrics = json.loads(f.read().splitlines()[-1])
    return {k: metrics[k] for k in ('aAcc', 'mIoU', 'mAcc')}


def _prepare_work_dir(work_dir, force):
    if osp.isfile(work_dir):
        raise DemoError(f'{work_dir}: is a file, not a folder')
    if osp.isdir(work_dir) and os.listdir(work_dir) and not force:
        raise DemoError(f'{work_dir}: exists and is not empty; choose a new '
                        '--work-dir or pass --force to overwrite its outputs')
    os.makedirs(work_dir, exist_ok=True)


def run_demo(work_dir,
             config=DEFAULT_CONFIG,
             data_root=None,
             iters=100,
             image_size=(64, 128),
             num_train=16,
             num_val=4,
             batch_size=4,
             lr=0.01,
             bench_size=(512, 1024),
             bench_rounds=3,
             fast_path=(),
             threads=None,
             force=False,
             log=print):
    """Generate data, train, evaluate, convert, evaluate, benchmark.

    Args:
        work_dir (str): Where every output goes; must be new or empty
            unless ``force``.
        config (str): Segmentor config with a RepVGG backbone.
            Defaults to :data:`DEFAULT_CONFIG` (PSPNet-RepVGG-A0).
        data_root (str, optional): A real Cityscapes folder (with
            ``*_labelTrainIds.png`` labels), trained on with the config's
            own pipelines. Defaults to None: a toy dataset is generated.
        iters (int): Training iterations. Defaults to 100.
        image_size (tuple[int]): ``(height, width)`` of toy images, also the
            training crop. Defaults to ``(64, 128)``.
        num_train (int): Toy training images. Defaults to 16.
        num_val (int): Toy validation images. Defaults to 4.
        batch_size (int): Training batch size on toy data. Defaults to 4.
        lr (float): Learning rate on toy data. Defaults to 0.01.
        bench_size (tuple[int]): ``(height, width)`` of the benchmark
            input. Defaults to ``(512, 1024)``.
        bench_rounds (int): Timed benchmark rounds. Defaults to 3.
        fast_path (Sequence[str]): Steps of a fast path to time too, see
            :func:`mmrepvgg.benchmark.optimize`. Defaults to () (none).
        threads (int, optional): Torch threads for the benchmark.
            Defaults to None (unchanged).
        force (bool): Reuse a non-empty ``work_dir``, overwriting outputs.
            Defaults to False.
        log (callable): Receives progress lines. Defaults to ``print``.

    Returns:
        dict: The summary (data, checkpoints, metrics of both forms,
        ``same_miou``, seconds per step and the benchmark result), also
        written to ``work_dir/summary.json``, with the printed table in
        ``work_dir/summary.txt`` and the speed chart in
        ``work_dir/speed.png``.

    Raises:
        DemoError: Bad arguments or a failed step.
    """
    if iters < 1:
        raise DemoError('--iters must be at least 1')
    if not osp.isfile(config):
        raise DemoError(f'{config}: no such config file')
    try:
        check_fast_path(fast_path, config)
    except ValueError as error:
        raise DemoError(str(error)) from None
    if data_root is not None:
        check_cityscapes(data_root)
    work_dir = osp.abspath(work_dir)
    _prepare_work_dir(work_dir, force)
    train_config = osp.join(work_dir, 'train_config.py')

    seconds, started = {}, time.perf_counter()

    def step_done(step):
        nonlocal started
        seconds[step] = round(time.perf_counter() - started, 1)
        started = time.perf_counter()

    log('== 1/4 data')
    if data_root is None:
        data_root = make_toy_cityscapes(
            osp.join(work_dir, 'data'),
            num_train=num_train,
            num_val=num_val,
            height=image_size[0],
            width=image_size[1])
        write_toy_config(
            config,
            data_root,
            train_config,
            iters=iters,
            crop=image_size,
            batch_size=batch_size,
            lr=lr,
            log_interval=max(1, iters // 20))
        data = (f'toy Cityscapes layout, {num_train} train / {num_val} val '
                f'images of {image_size[0]}x{image_size[1]}')
        chance = majority_class_miou(data_root)
        log(f'wrote {data} to {data_root}')
    else:
        write_cityscapes_config(config, data_root, train_config, iters)
        data, chance = f'Cityscapes at {data_root}', None
    step_done('data')

    log(f'== 2/4 training for {iters} iterations')
    train_dir = osp.join(work_dir, 'train')
    _run('mim train', [
        sys.executable, '-m', 'mim', 'train', 'mmsegmentation', train_config,
        '--work-dir', train_dir
    ], log, _mim_env())
    checkpoint = osp.join(train_dir, f'iter_{iters}.pth')
    if not osp.isfile(checkpoint):
        raise DemoError(f'training wrote no {checkpoint}')
    step_done('train')

    log('== 3/4 evaluation, re-parameterization, evaluation of the deploy '
        'pair')
    train_metrics = _mim_test(train_config, checkpoint,
                              osp.join(work_dir, 'test_train'), log)
    deploy_checkpoint = osp.join(work_dir, 'deploy', 'deploy.pth')
    _run(
        'tools/reparameterize.py',
        [
            sys.executable,
            osp.join(REPO_ROOT, 'tools', 'reparameterize.py'), train_config,
            checkpoint, deploy_checkpoint
        ] + (['--force'] if force else []),
        log,
        capture=True)
    deploy_metrics = _mim_test(
        deploy_config_path(deploy_checkpoint), deploy_checkpoint,
        osp.join(work_dir, 'test_deploy'), log)
    step_done('evaluate_and_convert')

    log('== 4/4 speed of train form against deploy form')
    bench = run_benchmark(
        train_config,
        checkpoint=checkpoint,
        shape=(1, 3, *bench_size),
        rounds=bench_rounds,
        warmup=1,
        threads=threads,
        fast_path=fast_path,
        name=short_name(config),
        log=log)
    chart = osp.join(work_dir, 'speed.png')
    plot_chart(bench, chart)
    step_done('benchmark')

    summary = dict(
        config=config,
        data=data,
        data_root=data_root,
        iters=iters,
        checkpoint=checkpoint,
        deploy_checkpoint=deploy_checkpoint,
        deploy_config=deploy_config_path(deploy_checkpoint),
        majority_class_miou=chance,
        metrics=dict(train=train_metrics, deploy=deploy_metrics),
        same_miou=train_metrics['mIoU'] == deploy_metrics['mIoU'],
        seconds=seconds,
        benchmark=bench,
        chart=chart)
    table = format_summary(summary)
    write_atomic(
        osp.join(work_dir, 'summary.txt'),
        lambda f: f.write(table.encode() + b'\n'))
    write_json(summary, osp.join(work_dir, 'summary.json'))
    log(table)
    return summary


def format_summary(summary):
    """The demo's one summary table: accuracy of both forms, then the
    benchmark report."""
    metrics = summary['metrics']
    chance = summary['majority_class_miou']
    lines = [
        '=' * 72,
        f'RepVGG demo: {osp.basename(summary["config"])}',
        f'data: {summary["data"]}',
        f'trained {summary["iters"]} iterations: {summary["checkpoint"]}',
        f'deploy pair: {summary["deploy_checkpoint"]} + .py',
        f'{"form":<14} {"mIoU":>8} {"mAcc":>8} {"aAcc":>8}',
    ]
    for form in ('train', 'deploy'):
        m = metrics[form]
        lines.append(f'{form:<14} {m["mIoU"]:>8.2f} {m["mAcc"]:>8.2f} '
                     f'{m["aAcc"]:>8.2f}')
    if chance is not None:
        lines.append(f'{"majority class":<14} {chance:>8.2f}')
    lines.append('same mIoU for both forms: ' +
                 ('yes' if summary['same_miou'] else 'NO'))
    lines.append(format_report(summary['benchmark']))
    lines.append(f'speed chart: {summary["chart"]}')
    lines.append('seconds per step: ' +
                 ', '.join(f'{step} {value:.0f}'
                           for step, value in summary['seconds'].items()))
    lines.append('=' * 72)
    return '\n'.join(lines)
