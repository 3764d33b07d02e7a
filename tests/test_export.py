"""Exported ONNX models compute what PyTorch does, on ONNX Runtime and
OpenVINO, and evaluate like the checkpoint they came from."""
import glob
import hashlib
import json
import os
import os.path as osp

import cv2
import numpy as np
import onnx
import pytest
import torch

from mmrepvgg.config import read_config
from mmrepvgg.deploy import deploy_model, export_onnx
from mmrepvgg.deploy.compare import compare_labels
from mmrepvgg.deploy.engines import EngineSettings, SegmentationEngine
from mmrepvgg.deploy.exact import fp32_and_exact
from mmrepvgg.deploy.export import ExportJob, ExportSettings
from mmrepvgg.deploy.images import as_batch, read_image
from mmrepvgg.deploy.logits import ImageSegmentor
from mmrepvgg.deploy.model_info import read_model
from mmrepvgg.errors import (ConfigError, MetadataError, UsageError,
                             VerificationError)
from mmrepvgg.runtime import Segmenter
from mmrepvgg.runtime import segmenter as segmenter_module
from tests.helpers import (REPO_ROOT, assert_fp32_close, logged_metrics,
                           output, random_checkpoint, run_tool_here)

SEGMENTORS = sorted(
    osp.relpath(path, REPO_ROOT)
    for path in glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*.py'))
    if 'cityscapes' in path)
# DeepLabV3 and V3+ must take any size; PSPNet's pyramid pooling does too.
# Each head is exported at any size, with the A0 backbone.
DYNAMIC = [path for path in SEGMENTORS if '_repvgg-a0' in path]
# At the toy size, what else a segmentor's graph can differ in: the
# QARepVGG block, grouped convs with the folded PSP head, and a backbone
# other than RepVGG (PSPNET_R18). The other shipped configs only combine
# these with other widths and depths: test_configs builds and runs each,
# and test_repvgg converts every arch.
STATIC = [
    'configs/pspnet/pspnet_qarepvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py',
    'configs/pspnet/pspnet_repvgg-b1g2-fast-d8_4xb2-80k_cityscapes-512x1024.py'
]
PSPNET_R18 = 'mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py'
SIZE = (64, 128)


def reference(config, checkpoint):
    """The checkpoint's model in PyTorch, from images to logits."""
    loaded = deploy_model(read_config(config), checkpoint)
    return ImageSegmentor(loaded.model).eval()


def label_flips(engine, model, images):
    """Assert that the engine computes the model's logits as exactly as
    fp32 allows, and its labels but at near-ties; returns the flips."""
    own, exact = fp32_and_exact(model, [images], run=lambda m, x: m(x)[0])
    logits, labels = (torch.from_numpy(o) for o in engine(images.numpy()))
    check = assert_fp32_close(logits, own, exact)
    flips = compare_labels(labels, exact[0], check.limit)
    assert flips.untied == 0
    return flips.differ


def images(size, seed=0):
    generator = torch.Generator().manual_seed(seed)
    return torch.rand(1, 3, *size, generator=generator) * 255


def test_the_exported_configs_are_shipped_ones():
    assert set(STATIC) < set(SEGMENTORS) and len(DYNAMIC) == 3


@pytest.mark.slow
@pytest.mark.parametrize('config', STATIC + [PSPNET_R18])
def test_segmentors_export_and_run_on_both_engines(config, tmp_path):
    # In deploy form: conversion is checked elsewhere. export_onnx itself
    # runs the model on both engines against its exact outputs, and writes
    # nothing if they differ (see the test below). The A0 configs export
    # from a training-form checkpoint, at any size, in the test after it.
    config = config if '::' in config else osp.join(REPO_ROOT, config)
    checkpoint = random_checkpoint(config, tmp_path / 'model.pth', True)
    out = tmp_path / 'model.onnx'
    result = export_onnx(
        ExportJob.checked(config, checkpoint, str(out), ExportSettings(SIZE)))
    assert result.check.passed and result.conversion is None
    assert result.backends == ['onnxruntime', 'openvino']
    assert read_model(str(out)).info.input_size == list(SIZE)


@pytest.mark.slow
@pytest.mark.numerics
def test_export_refuses_an_engine_that_computes_otherwise(
        trained_pspnet, tmp_path, monkeypatch):
    run = SegmentationEngine.__call__

    def off_by_a_little(engine, images):
        logits, labels = run(engine, images)
        return logits * (1 + 1e-4), labels

    monkeypatch.setattr(SegmentationEngine, '__call__', off_by_a_little)
    with pytest.raises(
            VerificationError,
            match=r'onnxruntime differs from PyTorch \(max relative '
            r'difference (9\.9.e-05|1\.0.e-04) from the exact .* nothing '
            r'written'):
        export_onnx(
            ExportJob.checked(trained_pspnet.config, trained_pspnet.checkpoint,
                              str(tmp_path / 'out.onnx'),
                              ExportSettings(SIZE)))
    assert os.listdir(tmp_path) == []


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.parametrize('config', DYNAMIC)
def test_dynamic_export_runs_at_any_size(config, tmp_path, monkeypatch):
    config = osp.join(REPO_ROOT, config)
    checkpoint = random_checkpoint(config, tmp_path / 'model.pth')
    out = tmp_path / 'model.onnx'
    result = export_onnx(
        ExportJob.checked(config, checkpoint, str(out),
                          ExportSettings(SIZE, dynamic=True)))
    assert result.check.passed and result.conversion is not None
    assert result.backends == ['onnxruntime', 'openvino']
    assert result.dynamic and result.num_inputs == 2
    model = reference(config, checkpoint)
    for backend in ('onnxruntime', 'openvino'):
        engine = SegmentationEngine(str(out), EngineSettings(backend))
        assert engine.info.input_size is None
        for size in ((48, 96), (80, 200)):
            label_flips(engine, model, images(size))
    # Images larger than it runs at are brought down, and their labels
    # back up from the logits, as mmseg resizes them.
    monkeypatch.setattr(segmenter_module, 'RUN_PIXELS', 48 * 96)
    image = np.random.default_rng(0).integers(0, 256, (96, 192, 3), np.uint8)
    segmenter = Segmenter(engine)
    assert segmenter.model_size(image.shape[:2]) == (48, 96)
    logits, _ = engine(as_batch(image, (48, 96)).numpy())
    resized = torch.nn.functional.interpolate(
        torch.from_numpy(logits).double(), (96, 192),
        mode='bilinear',
        align_corners=engine.info.align_corners)
    # The sampling positions are float32: 192 * 2**-24 of a pixel off.
    flips = compare_labels(
        torch.from_numpy(segmenter(image))[None], resized, 1e-5)
    assert flips.untied == 0


def test_default_size_is_what_the_test_pipeline_makes_of_a_frame():
    from mmengine.registry import DefaultScope
    config = osp.join(REPO_ROOT, SEGMENTORS[0])
    # The pipeline reads its config's scope, not the one used last.
    with DefaultScope.overwrite_default_scope('mmdet'):
        size = ExportSettings().input_size(read_config(config))
    assert size == (1024, 2048)


@pytest.mark.integration
def test_export_tool_reports_and_writes_metadata(trained_pspnet, exported):
    out, stdout = exported
    assert 'exported at 64x128' in stdout
    assert f'on {1 + len(trained_pspnet.val_images)} input(s)' in stdout
    model = onnx.load(str(out))
    assert [i.name for i in model.graph.input] == ['images']
    assert [o.name for o in model.graph.output] == ['logits', 'labels']
    props = {p.key: json.loads(p.value) for p in model.metadata_props}
    assert len(props['classes']) == len(props['palette']) == 19
    assert props['classes'][0] == 'road'
    with open(trained_pspnet.checkpoint, 'rb') as f:
        assert props['source_sha256'] == hashlib.sha256(f.read()).hexdigest()
    assert props['input_size'] == list(SIZE)
    # Nothing of the exporting machine: no paths in the graph.
    assert b'/tmp/' not in out.read_bytes()


def _test_metrics(trained_pspnet, model, work_dir, *options):
    result = run_tool_here('test.py', trained_pspnet.config, model,
                           '--work-dir', work_dir, *options)
    assert result.returncode == 0, output(result)
    return logged_metrics(work_dir)


@pytest.mark.numerics
@pytest.mark.slow
@pytest.mark.integration
def test_onnx_model_evaluates_like_its_checkpoint(trained_pspnet, exported,
                                                  tmp_path):
    out, _ = exported
    expected = _test_metrics(trained_pspnet, trained_pspnet.checkpoint,
                             tmp_path / 'checkpoint')
    model = reference(trained_pspnet.config, trained_pspnet.checkpoint)
    for backend in ('onnxruntime', 'openvino'):
        metrics = _test_metrics(trained_pspnet, out, tmp_path / backend,
                                '--backend', backend)
        engine = SegmentationEngine(str(out), EngineSettings(backend))
        flips = sum(
            label_flips(engine, model, as_batch(read_image(path)))
            for path in trained_pspnet.val_images)
        if not flips:  # else near-ties moved a pixel's class, and metrics
            for key in ('aAcc', 'mIoU', 'mAcc'):
                assert metrics[key] == expected[key], (backend, key)


@pytest.mark.integration
def test_infer_writes_label_maps_and_overlays_in_the_palette(
        trained_pspnet, exported, tmp_path):
    out, _ = exported
    image = trained_pspnet.val_images[0]
    result = run_tool_here('infer.py', out, image, '--out-dir', tmp_path)
    assert result.returncode == 0, output(result)
    stem = osp.splitext(osp.basename(image))[0]
    assert sorted(os.listdir(tmp_path)) == ['pred', 'vis']
    assert os.listdir(tmp_path / 'pred') == [f'{stem}.png']
    assert os.listdir(tmp_path / 'vis') == [f'{stem}.png']
    labels = cv2.imread(
        str(tmp_path / 'pred' / f'{stem}.png'), cv2.IMREAD_UNCHANGED)
    segmenter = Segmenter(str(out))
    expected = segmenter(cv2.imread(image))
    assert np.array_equal(labels, expected)
    palette = np.asarray(segmenter.info.palette, np.uint8)[:, ::-1]
    overlay = cv2.imread(str(tmp_path / 'vis' / f'{stem}.png'))
    blend = (cv2.imread(image) * 0.5 + palette[expected] * 0.5 + 0.5)
    assert np.array_equal(overlay, blend.astype(np.uint8))

    again = run_tool_here('infer.py', out, image, '--out-dir', tmp_path)
    assert again.returncode == 1
    assert again.stderr.strip().endswith(
        f'pred/{stem}.png: already exists; pass --force to overwrite it')


def test_engine_refuses_what_it_cannot_run(exported, tmp_path):
    out, _ = exported
    with pytest.raises(
            UsageError, match='ONNX Runtime runs this model in '
            'fp32 only'):
        SegmentationEngine(str(out), EngineSettings('onnxruntime', 'bf16'))
    with pytest.raises(UsageError, match='backend must be one of'):
        SegmentationEngine(str(out), EngineSettings('tensorrt'))
    foreign = tmp_path / 'foreign.onnx'
    model = onnx.load(str(out))
    del model.metadata_props[:]
    onnx.save(model, str(foreign))
    with pytest.raises(MetadataError, match='not exported by mmrepvgg'):
        SegmentationEngine(str(foreign))
    garbage = tmp_path / 'garbage.onnx'
    garbage.write_bytes(b'not a model')
    with pytest.raises(UsageError, match='not a readable ONNX model'):
        SegmentationEngine(str(garbage))


def test_a_detector_is_refused(tmp_path):
    config = osp.join(REPO_ROOT, 'configs', 'retinanet',
                      'retinanet_repvgg-a0_fpn_1x_coco.py')
    checkpoint = random_checkpoint(config, tmp_path / 'retinanet.pth')
    with pytest.raises(
            ConfigError,
            match='exports mmseg EncoderDecoder segmentors, not '
            'a RetinaNet'):
        export_onnx(
            ExportJob.checked(config, checkpoint, str(tmp_path / 'out.onnx'),
                              ExportSettings(SIZE)))
    assert sorted(os.listdir(tmp_path)) == ['retinanet.pth']


@pytest.mark.integration
@pytest.mark.parametrize('arguments, message', [
    (['--shape', '0', '64'], 'an input size is two integers of at least 8'),
    (['--img', 'missing.png'], 'missing.png: no such file'),
])
def test_export_tool_refuses_bad_input(trained_pspnet, tmp_path, arguments,
                                       message):
    result = run_tool_here('export.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, tmp_path / 'out.onnx',
                           '--shape', *SIZE, *arguments)
    assert result.returncode == 1, output(result)
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert os.listdir(tmp_path) == []


@pytest.mark.integration
def test_export_tool_keeps_existing_files_and_inputs(trained_pspnet, exported,
                                                     tmp_path):
    out, _ = exported
    before = out.read_bytes()
    result = run_tool_here('export.py', trained_pspnet.config,
                           trained_pspnet.checkpoint, out, '--shape', *SIZE)
    assert result.returncode == 1
    assert 'already exists; pass --force' in result.stderr
    assert out.read_bytes() == before
    over_input = run_tool_here('export.py', trained_pspnet.config,
                               trained_pspnet.checkpoint,
                               trained_pspnet.checkpoint, '--force')
    assert over_input.returncode == 1
    assert 'is an input' in over_input.stderr
