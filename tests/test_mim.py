"""The PSPNet-RepVGG-A0 config trains and tests with ``mim``, as users run
it: ``mim train mmsegmentation`` then ``mim test mmsegmentation``."""
import glob
import json
import os.path as osp
import subprocess
import sys

import pytest
from helpers import REPO_ROOT

from mmrepvgg.toy_data import make_toy_cityscapes, write_toy_config

PSPNET_A0 = osp.join(REPO_ROOT, 'configs', 'pspnet',
                     'pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
ITERS = 4


def _output(result):
    return result.stdout[-3000:] + result.stderr[-3000:]


def _mim(*args, timeout=900):
    return subprocess.run([sys.executable, '-m', 'mim', *map(str, args)],
                          capture_output=True,
                          text=True,
                          cwd=REPO_ROOT,
                          timeout=timeout)


@pytest.fixture(scope='module')
def trained(tmp_path_factory):
    root = tmp_path_factory.mktemp('mim')
    data_root = make_toy_cityscapes(str(root / 'cityscapes'))
    config = write_toy_config(
        PSPNET_A0, data_root, str(root / 'pspnet_toy.py'), iters=ITERS)
    work_dir = root / 'train'
    result = _mim('train', 'mmsegmentation', config, '--work-dir', work_dir)
    assert result.returncode == 0, _output(result)
    return config, work_dir


def _json_log(pattern):
    """The records of the one JSON log matching ``pattern``; mmengine's
    logger writes one JSON object a line."""
    logs = glob.glob(str(pattern))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return [json.loads(line) for line in f]


def _metrics(records):
    return [r for r in records if 'aAcc' in r][-1]


def test_mim_train_learns_and_writes_a_checkpoint(trained):
    _, work_dir = trained
    checkpoint = f'iter_{ITERS}.pth'
    assert (work_dir / checkpoint).is_file()
    assert (work_dir / 'last_checkpoint').read_text().endswith(checkpoint)
    records = _json_log(work_dir / '*' / 'vis_data' / 'scalars.json')
    losses = [r['loss'] for r in records if 'loss' in r]
    assert len(losses) == ITERS
    assert losses[-1] < losses[0], losses


def test_mim_test_reports_the_trained_models_metrics(trained, tmp_path):
    config, work_dir = trained
    result = _mim('test', 'mmsegmentation', config, '--checkpoint',
                  work_dir / f'iter_{ITERS}.pth', '--work-dir', tmp_path)
    assert result.returncode == 0, _output(result)
    metrics = _metrics(_json_log(tmp_path / '*' / '*.json'))
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert 0 <= metrics[key] <= 100, metrics
    # About half the toy pixels are road: 4 iterations already label them.
    assert metrics['aAcc'] > 30, metrics
    # The validation at the end of training saw the same weights and data:
    # a test that did not load the checkpoint would not match it.
    trained_metrics = _metrics(
        _json_log(work_dir / '*' / 'vis_data' / 'scalars.json'))
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert metrics[key] == trained_metrics[key], (metrics, trained_metrics)
