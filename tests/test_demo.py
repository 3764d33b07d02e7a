"""The demo, run as the README runs it, at its smallest settings."""
import json
import os.path as osp
import re

import cv2
import numpy as np
import pytest
from mmengine.config import Config

from mmrepvgg.errors import UsageError
from mmrepvgg.testing import (majority_class_miou, make_toy_cityscapes,
                              write_cityscapes_config)
from tests.helpers import REPO_ROOT, output, run_tool
from tools.apps.demo import DEFAULT_CONFIG, DemoError, DemoSettings, run_demo

ITERS = 2
PNG_SIGNATURE = b'\x89PNG\r\n\x1a\n'


@pytest.fixture(scope='module')
def demo(tmp_path_factory):
    work_dir = tmp_path_factory.mktemp('demo') / 'run'
    result = run_tool('demo.py', '--work-dir', work_dir, '--iters', ITERS,
                      '--image-size', 64, 128, '--num-train', 2, '--num-val',
                      2, '--bench-size', 64, 128, '--bench-rounds', 1,
                      '--threads', 2)
    assert result.returncode == 0, output(result)
    with open(work_dir / 'summary.json') as f:
        summary = json.load(f)
    return work_dir, result.stdout, summary


@pytest.mark.slow
@pytest.mark.integration
def test_demo_trains_converts_and_evaluates_both_forms(demo):
    work_dir, stdout, summary = demo
    # Each step runs the command a user would, shown with its output.
    assert '-m mim train mmsegmentation' in stdout
    assert f'Iter(train) [{ITERS}/{ITERS}]' in stdout
    assert stdout.count('-m mim test mmsegmentation') == 2
    for tool in ('reparameterize.py', 'export.py', 'test.py', 'benchmark.py'):
        assert f'tools/{tool} ' in stdout
    assert re.search(r'converted \d+ blocks', stdout)
    assert osp.isfile(summary['deploy_checkpoint'])
    assert osp.isfile(summary['deploy_config'])
    train, deploy = summary['metrics']['train'], summary['metrics']['deploy']
    assert 0 < train['mIoU'] <= 100
    assert deploy == train
    assert summary['same_miou'] is True
    assert 0 < summary['majority_class_miou'] < 100
    # The exported deploy pair, evaluated on ONNX Runtime.
    assert osp.isfile(work_dir / 'onnx' / 'model_fp32.onnx')
    engine = summary['engines']['onnxruntime fp32']
    assert {k: engine[k] for k in deploy} == deploy


@pytest.mark.slow
@pytest.mark.integration
def test_demo_benchmarks_train_against_deploy(demo):
    work_dir, stdout, summary = demo
    bench = summary['benchmark']
    assert bench['settings']['shape'] == [1, 3, 64, 128]
    assert bench['settings']['checkpoint'] == summary['checkpoint']
    times = {(t['part'], t['name']): t['times_s'] for t in bench['timings']}
    ratios = {
        (r['part'], r['candidate'], r['baseline']): r['speedup']
        for r in bench['ratios']
    }
    ours = 'pspnet_repvgg-a0-d8'
    for part, candidate, baseline in [('segmentor', 'deploy', 'train'),
                                      ('backbone', 'deploy', 'train'),
                                      ('segmentor', 'onnxruntime fp32',
                                       'deploy')]:
        names = (f'{ours} ({candidate})', f'{ours} ({baseline})')
        # One round: the speed-up is the ratio of its two times.
        (fast, ), (slow, ) = (times[part, name] for name in names)
        assert ratios[(part, *names)] == pytest.approx(slow / fast)
    # The trained weights give the same predictions in both forms.
    assert all(check['exact'] for check in bench['checks']), bench['checks']
    png = (work_dir / 'speed.png').read_bytes()
    assert png.startswith(PNG_SIGNATURE) and len(png) > 10_000


@pytest.mark.slow
@pytest.mark.integration
def test_demo_prints_and_keeps_one_summary_table(demo):
    work_dir, stdout, summary = demo
    table = (work_dir / 'summary.txt').read_text()
    assert table.strip() in stdout
    assert 'same mIoU for both torch forms: yes' in table
    assert 'onnxruntime fp32' in table
    assert f'{summary["metrics"]["train"]["mIoU"]:.2f}' in table
    assert 'pspnet_repvgg-a0-d8 (deploy) over pspnet_repvgg-a0-d8 (train)' \
        in table
    assert str(work_dir / 'speed.png') in table


@pytest.mark.slow
@pytest.mark.integration
def test_demo_keeps_a_used_work_dir(demo):
    work_dir, _, _ = demo
    before = (work_dir / 'summary.json').read_bytes()
    with pytest.raises(DemoError, match='not empty'):
        run_demo(DemoSettings(str(work_dir), iters=ITERS))
    assert (work_dir / 'summary.json').read_bytes() == before


def test_demo_refuses_a_folder_without_cityscapes(tmp_path):
    result = run_tool('demo.py', '--work-dir', tmp_path / 'run', '--data-root',
                      tmp_path)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: {tmp_path}: not a Cityscapes folder (no images in '
        'leftImg8bit/val/*/)'
    ]
    assert not (tmp_path / 'run').exists()


def test_demo_refuses_a_fold_that_does_not_fit_before_training(tmp_path):
    config = osp.join(
        REPO_ROOT, 'configs', 'deeplabv3',
        'deeplabv3_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')
    with pytest.raises(UsageError, match='is ASPPHead, not PSPHead'):
        run_demo(
            DemoSettings(str(tmp_path / 'run'), config=config, fold_psp=True))
    assert not (tmp_path / 'run').exists()


def test_cityscapes_config_points_every_split_at_the_folder(tmp_path):
    data_root = make_toy_cityscapes(str(tmp_path / 'data'), 1, 1)
    out = write_cityscapes_config(
        DEFAULT_CONFIG, data_root, str(tmp_path / 'config.py'), iters=7)
    cfg = Config.fromfile(out)
    for loader in ('train_dataloader', 'val_dataloader', 'test_dataloader'):
        assert cfg[loader].dataset.data_root == data_root
    assert cfg.train_cfg.max_iters == 7
    assert cfg.default_hooks.checkpoint.interval == 7
    # Everything else comes from the base config: the model and pipelines.
    assert cfg.model.backbone.type == 'RepVGG'
    assert cfg.train_dataloader.dataset.pipeline == Config.fromfile(
        DEFAULT_CONFIG).train_dataloader.dataset.pipeline


def test_majority_class_miou(tmp_path):
    label_dir = tmp_path / 'gtFine' / 'val' / 'city'
    label_dir.mkdir(parents=True)
    road = np.zeros((4, 8), np.uint8)
    half_sky = road.copy()
    half_sky[:2] = 10
    half_sky[0, 0] = 255  # ignored
    for index, labels in enumerate((road, half_sky)):
        cv2.imwrite(
            str(label_dir / f'city_{index}_gtFine_labelTrainIds.png'), labels)
    # Road everywhere: IoU 48/63 for road, 0 for sky, over 2 classes.
    assert majority_class_miou(str(tmp_path)) == pytest.approx(100 * 48 / 63 /
                                                               2)
