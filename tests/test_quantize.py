"""A QARepVGG PSPNet trains through mim, converts, exports to calibrated
INT8 that runs on ONNX Runtime and OpenVINO, and keeps its fp32 labels."""
import glob
import json
import os
import os.path as osp
from collections import Counter

import cv2
import numpy as np
import onnx
import pytest
import torch

import mmrepvgg.quantization.ptq as quantize
from mmrepvgg.deploy import export_onnx
from mmrepvgg.deploy.export import ExportJob, ExportSettings
from mmrepvgg.deploy.images import as_batch
from mmrepvgg.errors import UsageError, VerificationError
from mmrepvgg.quantization.ptq import Int8Settings, export_int8
from mmrepvgg.runtime import EngineSettings, Segmenter
from mmrepvgg.testing import majority_class_miou
from tests.helpers import logged_metrics, output, run_tool_here

SIZE = (64, 128)
# What a toy QARepVGG trained for 60 iterations keeps of its fp32 labels
# in int8 at the least (it measured 98.75% when this was written).
AGREEMENT_FLOOR = 0.97
INT8 = Int8Settings(calib_num=8, eval_num=4, min_agreement=AGREEMENT_FLOOR)

pytestmark = [pytest.mark.slow, pytest.mark.integration]


@pytest.fixture(scope='module')
def int8_export(trained_qarepvgg, tmp_path_factory):
    """The toy QARepVGG exported to int8, with the batches it was
    calibrated on."""
    out = tmp_path_factory.mktemp('int8') / 'int8.onnx'
    calibrated = []
    real_quantize = quantize.quantize_int8

    def recording(model, calibration, *args):
        calibrated.extend(calibration)
        return real_quantize(model, calibration, *args)

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(quantize, 'quantize_int8', recording)
        result = export_int8(
            ExportJob.checked(trained_qarepvgg.config,
                              trained_qarepvgg.checkpoint, str(out),
                              ExportSettings(SIZE)), INT8)
    return out, result, calibrated


def test_qarepvgg_learns(trained_qarepvgg):
    with open(
            glob.glob(
                osp.join(trained_qarepvgg.work_dir, '*', 'vis_data',
                         'scalars.json'))[0]) as f:
        metrics = [json.loads(line) for line in f if 'mIoU' in line][-1]
    assert metrics['mIoU'] > 2 * majority_class_miou(
        trained_qarepvgg.data_root)


@pytest.mark.numerics
def test_qarepvgg_checkpoint_converts(trained_qarepvgg, tmp_path):
    result = run_tool_here('reparameterize.py', trained_qarepvgg.config,
                           trained_qarepvgg.checkpoint,
                           tmp_path / 'deploy.pth', '--img',
                           *trained_qarepvgg.val_images)
    assert result.returncode == 0, output(result)
    assert 'converted 22 blocks' in result.stdout
    state = torch.load(tmp_path / 'deploy.pth')['state_dict']
    assert not any('.norm.' in k for k in state if k.startswith('backbone'))


def test_calibration_reads_the_training_images(trained_qarepvgg, int8_export):
    _, result, calibrated = int8_export
    train = sorted(
        glob.glob(
            osp.join(trained_qarepvgg.data_root, 'leftImg8bit', 'train', '*',
                     '*.png')))
    assert len(
        calibrated) == INT8.calib_num == result.info.calibration['images']
    # Every calibration batch is one of the training images as the test
    # pipeline reads it (the toy pipeline does not resize), in order.
    chosen = np.linspace(0, len(train) - 1, INT8.calib_num).round()
    for batch, index in zip(calibrated, chosen.astype(int)):
        expected = as_batch(cv2.imread(train[index]), SIZE)
        assert torch.equal(batch, expected)


def test_int8_where_full_int8_agrees_ranks_no_conv(int8_export):
    # Ranking the convs takes a run of a model with two of every conv:
    # measured to keep one in fp32 or for --int8-report, not for this model.
    _, result, _ = int8_export
    assert result.info.float_convs == []
    assert result.info.sensitivity == []


@pytest.mark.numerics
def test_int8_model_keeps_the_fp32_labels_on_both_engines(
        trained_qarepvgg, int8_export, tmp_path):
    out, result, _ = int8_export
    agreement = result.info.agreement
    assert result.info.precision == 'int8'
    assert agreement['split'] == 'val' and agreement['images'] == 4
    assert agreement['labels'] >= AGREEMENT_FLOOR
    # Full int8 agreed as asked: nothing was equalized for it.
    assert result.info.equalized_pairs == 0
    assert agreement['unequalized_labels'] is None
    model = onnx.load(str(out))
    ops = Counter(node.op_type for node in model.graph.node)
    assert ops['QuantizeLinear'] > 20 and ops['DequantizeLinear'] > 20
    fp32 = tmp_path / 'fp32.onnx'
    export_onnx(
        ExportJob.checked(trained_qarepvgg.config, trained_qarepvgg.checkpoint,
                          str(fp32), ExportSettings(SIZE)))
    reference = Segmenter(str(fp32))
    for backend in ('onnxruntime', 'openvino'):
        segmenter = Segmenter(str(out), EngineSettings(backend))
        same = total = 0
        for path in trained_qarepvgg.val_images:
            image = cv2.imread(path)
            labels = segmenter(image)
            same += int((labels == reference(image)).sum())
            total += labels.size
        assert same / total >= AGREEMENT_FLOOR, backend


def test_openvino_runs_the_convolutions_in_int8(int8_export):
    import openvino
    out, _, _ = int8_export
    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(str(out)), 'CPU', {'INFERENCE_PRECISION_HINT': 'f32'})
    precisions = Counter(
        op.get_rt_info()['runtimePrecision'].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()['layerType'].astype(str) == 'Convolution')
    assert precisions['u8'] + precisions['i8'] >= 22, precisions


def test_int8_model_evaluates_close_to_fp32(trained_qarepvgg, int8_export,
                                            tmp_path):
    out, _, _ = int8_export

    def miou(model, name):
        result = run_tool_here('test.py', trained_qarepvgg.config, model,
                               '--work-dir', tmp_path / name)
        assert result.returncode == 0, output(result)
        return logged_metrics(tmp_path / name)['mIoU']

    assert abs(miou(out, 'int8') -
               miou(trained_qarepvgg.checkpoint, 'fp32')) <= 2


def test_int8_below_the_asked_agreement_writes_nothing(trained_qarepvgg,
                                                       int8_export, tmp_path,
                                                       monkeypatch):
    _, result, _ = int8_export
    measured = result.info.agreement['labels']
    # int8 moves some labels of this model (98.75% stayed when measured).
    assert measured < 1
    ranked = []
    monkeypatch.setattr(quantize, 'sensitivities',
                        lambda *args: ranked.append(args) or [])
    with pytest.raises(VerificationError, match='below the'):
        export_int8(
            ExportJob.checked(trained_qarepvgg.config,
                              trained_qarepvgg.checkpoint,
                              str(tmp_path / 'int8.onnx'),
                              ExportSettings(SIZE)),
            Int8Settings(8, 4, measured + 1e-9, max_float=0, equalize='never'))
    assert os.listdir(tmp_path) == []
    assert ranked == []  # with no conv to keep in fp32, none is ranked


@pytest.mark.parametrize('arguments, message', [
    (['--calib-num', '0'], 'must be at least 1'),
    (['--min-agreement', '1.5'], 'a share of pixels, from 0 to 1'),
])
def test_int8_export_refuses_bad_arguments(trained_qarepvgg, tmp_path,
                                           arguments, message):
    result = run_tool_here('export.py', trained_qarepvgg.config,
                           trained_qarepvgg.checkpoint, tmp_path / 'out.onnx',
                           '--int8', *arguments)
    assert result.returncode == 1
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], lines
    assert os.listdir(tmp_path) == []


def test_int8_export_without_a_dataset_is_refused(trained_qarepvgg, tmp_path):
    config = tmp_path / 'no_data.py'
    config.write_text(f'_base_ = {trained_qarepvgg.config!r}\n'
                      'train_dataloader = dict(dataset=dict('
                      f'data_root={str(tmp_path / "nowhere")!r}))\n')
    with pytest.raises(UsageError, match='no train images to read'):
        export_int8(
            ExportJob.checked(
                str(config), trained_qarepvgg.checkpoint,
                str(tmp_path / 'out.onnx'), ExportSettings(SIZE)), INT8)
    assert sorted(os.listdir(tmp_path)) == ['no_data.py']
