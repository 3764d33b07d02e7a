"""The PSPNet-RepVGG-A0 config trains and tests with ``mim``, as users run
it: ``mim train mmsegmentation`` (the shared ``trained_pspnet`` fixture)
then ``mim test mmsegmentation``."""
import glob
import json
import os.path as osp

import pytest

from tests.helpers import mim, output

pytestmark = pytest.mark.integration


def _json_log(pattern):
    """The records of the one JSON log matching ``pattern``; mmengine's
    logger writes one JSON object a line."""
    logs = glob.glob(str(pattern))
    assert len(logs) == 1, logs
    with open(logs[0]) as f:
        return [json.loads(line) for line in f]


def _metrics(records):
    return [r for r in records if 'aAcc' in r][-1]


def _scalars(trained_pspnet):
    return _json_log(
        osp.join(trained_pspnet.work_dir, '*', 'vis_data', 'scalars.json'))


def test_mim_train_learns_and_writes_a_checkpoint(trained_pspnet):
    checkpoint = f'iter_{trained_pspnet.iters}.pth'
    assert osp.isfile(trained_pspnet.checkpoint)
    assert trained_pspnet.checkpoint.endswith(checkpoint)
    with open(osp.join(trained_pspnet.work_dir, 'last_checkpoint')) as f:
        assert f.read().endswith(checkpoint)
    losses = [r['loss'] for r in _scalars(trained_pspnet) if 'loss' in r]
    assert len(losses) == trained_pspnet.iters
    assert losses[-1] < losses[0], losses


@pytest.mark.slow
def test_mim_test_reports_the_trained_models_metrics(trained_pspnet, tmp_path):
    result = mim('test', 'mmsegmentation', trained_pspnet.config,
                 '--checkpoint', trained_pspnet.checkpoint, '--work-dir',
                 tmp_path)
    assert result.returncode == 0, output(result)
    metrics = _metrics(_json_log(tmp_path / '*' / '*.json'))
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert 0 <= metrics[key] <= 100, metrics
    # About half the toy pixels are road: 4 iterations already label them.
    assert metrics['aAcc'] > 30, metrics
    # The validation at the end of training saw the same weights and data:
    # a test that did not load the checkpoint would not match it.
    trained_metrics = _metrics(_scalars(trained_pspnet))
    for key in ('aAcc', 'mIoU', 'mAcc'):
        assert metrics[key] == trained_metrics[key], (metrics, trained_metrics)
