"""Expensive setup that the tests share: toy PSPNets trained once."""
import glob
import os
import os.path as osp
from dataclasses import dataclass
from typing import List

import pytest
import torch
from xdist.scheduler import LoadFileScheduling

from mmrepvgg.testing import make_toy_cityscapes, write_toy_config
from tests.helpers import (PSPNET_A0, PSPNET_QAREPVGG_A0, TESTS, TOY_SIZE, mim,
                           output, run_tool)

TRAIN_ITERS = 4
QAREPVGG_ITERS = 60
# Each worker trains the session's toy models again; the largest test
# process peaks at 5.7 GB.
MAX_WORKERS = 4
# Test files that run in the same worker, which then builds the session
# fixture they all use once (30 s and 18 s on 2 cores) instead of once each.
SAME_WORKER = {
    'test_qat.py': 'trained_qarepvgg',
    'test_quantize.py': 'trained_qarepvgg',
    'test_export.py': 'exported',
    'test_hostile_deploy.py': 'exported',
}


def pytest_xdist_auto_num_workers(config):
    """``-n auto``: a worker per core this process may run on, up to
    :data:`MAX_WORKERS`."""
    return min(len(os.sched_getaffinity(0)), MAX_WORKERS)


def pytest_configure(config):
    """Share the cores among the workers, in this process and in the tools
    its tests start, instead of each worker running a thread per core."""
    workers = int(os.environ.get('PYTEST_XDIST_WORKER_COUNT', 1))
    if workers > 1:
        threads = max(1, len(os.sched_getaffinity(0)) // workers)
        os.environ['OMP_NUM_THREADS'] = str(threads)
        torch.set_num_threads(threads)


class SharedFixtureScheduling(LoadFileScheduling):
    """``--dist loadfile``, with the files of :data:`SAME_WORKER` as one
    unit of work."""

    def _split_scope(self, nodeid):
        path = super()._split_scope(nodeid)
        return SAME_WORKER.get(osp.basename(path), path)


def pytest_xdist_make_scheduler(config, log):
    if config.getoption('dist') == 'loadfile':
        return SharedFixtureScheduling(config, log)


@pytest.fixture
def users_modules(monkeypatch):
    """``tests/`` on ``sys.path``, as a user's own modules are on theirs:
    configs import ``user_block`` and ``training_probe`` through
    ``custom_imports`` (the tools' processes get it in PYTHONPATH)."""
    monkeypatch.syspath_prepend(TESTS)


@dataclass
class TrainedPSPNet:
    """A toy PSPNet (a shipped SyncBN config) trained by ``mim train
    mmsegmentation``, as users run it."""
    config: str
    checkpoint: str
    work_dir: str
    data_root: str
    val_images: List[str]
    iters: int


def train_with_mim(root, base, iters, num_train=8, **options):
    """Train ``base`` on a toy dataset with ``mim train mmsegmentation``;
    ``options`` go to :func:`mmrepvgg.testing.write_toy_config`."""
    data_root = make_toy_cityscapes(
        str(root / 'data'), num_train=num_train, num_val=4)
    config = write_toy_config(
        base, data_root, str(root / 'toy.py'), iters=iters, **options)
    work_dir = root / 'train'
    result = mim('train', 'mmsegmentation', config, '--work-dir', work_dir)
    assert result.returncode == 0, output(result)
    images = sorted(
        glob.glob(osp.join(data_root, 'leftImg8bit', 'val', '*', '*.png')))
    return TrainedPSPNet(config, str(work_dir / f'iter_{iters}.pth'),
                         str(work_dir), data_root, images, iters)


@pytest.fixture(scope='session')
def trained_pspnet(tmp_path_factory):
    """PSPNet-RepVGG-A0 after a few iterations."""
    return train_with_mim(
        tmp_path_factory.mktemp('trained_pspnet'), PSPNET_A0, TRAIN_ITERS)


@pytest.fixture(scope='session')
def trained_qarepvgg(tmp_path_factory):
    """PSPNet-QARepVGG-A0, trained long enough that its labels mean
    something (its mIoU is far above the majority class's)."""
    return train_with_mim(
        tmp_path_factory.mktemp('trained_qarepvgg'),
        PSPNET_QAREPVGG_A0,
        QAREPVGG_ITERS,
        num_train=16,
        batch_size=4,
        log_interval=10)


@pytest.fixture(scope='session')
def exported(trained_pspnet, tmp_path_factory):
    """The shared toy PSPNet exported by the command line, and what the
    tool printed."""
    out = tmp_path_factory.mktemp('onnx') / 'pspnet.onnx'
    result = run_tool('export.py', trained_pspnet.config,
                      trained_pspnet.checkpoint, out, '--shape', *TOY_SIZE,
                      '--img', *trained_pspnet.val_images)
    assert result.returncode == 0, output(result)
    return out, result.stdout
