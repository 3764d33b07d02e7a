"""Quantization-aware training of the deploy form: ``tools/train.py --qat``
fine-tunes the trained toy PSPNet-QARepVGG-A0 with fake quantization on
mmengine, keeps its mIoU, marks its checkpoints, resumes as if never
interrupted, refuses what it cannot start from, and exports a QDQ model whose
ONNX Runtime labels are the QAT model's own and that OpenVINO runs in int8.

The deploy form QAT works on is a plain conv stack for RepVGG and QARepVGG
alike; the QARepVGG toy is the one trained long enough for its labels (and
so their agreement) to mean something."""
import copy
import glob
import os
import os.path as osp
import re
from collections import Counter
from functools import partial

import cv2
import numpy as np
import onnx
import pytest
import torch
from torch import nn

import mmrepvgg.deploy.convert as convert
from mmrepvgg.checkpoint import load_checkpoint
from mmrepvgg.config import read_config
from mmrepvgg.deploy.convert import equalize_checked
from mmrepvgg.deploy.engines import EngineSettings
from mmrepvgg.deploy.images import split_images
from mmrepvgg.deploy.loading import DEFAULT_CHECK_SIZE, deploy_model
from mmrepvgg.deploy.logits import run_on_images
from mmrepvgg.deploy.model_info import read_model
from mmrepvgg.errors import VerificationError
from mmrepvgg.quantization.agreement import Agreement, check_agreement
from mmrepvgg.quantization.fake_quant import (activation_quantizers,
                                              fold_conv_norms)
from mmrepvgg.quantization.qat_export import MIN_QAT_AGREEMENT
from mmrepvgg.quantization.training import (CALIBRATION_IMAGES, QAT_META_KEY,
                                            Distillation, use_qat)
from mmrepvgg.runner import build_runner
from mmrepvgg.runtime import Segmenter
from tests.helpers import (TOY_SIZE, assert_refused, logged_metrics, output,
                           run_tool_here, snapshot)

QAT_ITERS = 4
# QAT fine-tunes: at the toy config's training rate (1e-2) the fake-quantized
# model diverges within two iterations, to one class.
QAT_LR = 1e-4
# Every conv of the toy PSPNet-QARepVGG-A0 (22 in the backbone, 6 in the PSP
# head, 2 in the auxiliary head) has a weight and an input quantizer.
CONVS = 30
# What the QAT model's own labels keep on ONNX Runtime at the least (99.5%
# and 99.6% measured in two runs: where a float rounding difference before a
# quantizer moves a value one step, labels at near ties flip).
AGREEMENT_FLOOR = 0.98

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def qat_train(trained, work_dir, iters, *options, checkpoint=None):
    """``tools/train.py CONFIG --qat CHECKPOINT`` for ``iters`` iterations,
    a checkpoint every 2."""
    return run_tool_here('train.py', trained.config, '--qat', checkpoint
                         or trained.checkpoint, '--work-dir', work_dir,
                         *options, '--cfg-options',
                         f'train_cfg.max_iters={iters}',
                         f'optim_wrapper.optimizer.lr={QAT_LR}',
                         'default_hooks.checkpoint.interval=2')


@pytest.fixture(scope='module')
def qat_run(trained_qarepvgg, tmp_path_factory):
    """QAT of the shared toy PSPNet-QARepVGG-A0; its work dir."""
    work_dir = tmp_path_factory.mktemp('qat')
    result = qat_train(trained_qarepvgg, work_dir, QAT_ITERS)
    assert result.returncode == 0, output(result)
    return work_dir


def final_checkpoint(work_dir):
    return str(work_dir / f'iter_{QAT_ITERS}.pth')


def test_qat_checkpoints_are_marked_and_keep_the_deploy_names(
        trained_qarepvgg, qat_run):
    loaded = load_checkpoint(final_checkpoint(qat_run))
    assert loaded.meta[QAT_META_KEY] == dict(
        scheme='cpu', source=osp.basename(trained_qarepvgg.checkpoint))
    weights = loaded.weights
    deploy = deploy_model(
        read_config(trained_qarepvgg.config),
        trained_qarepvgg.checkpoint).model.state_dict()
    # The deploy model's names, less the heads' norms folded into convs.
    assert {k for k in deploy if '.bn.' not in k} <= set(weights)
    assert not any('.bn.' in k for k in weights)
    for quantizer in ('weight_fake_quant', 'input_fake_quant'):
        scales = [
            v for k, v in weights.items() if k.endswith(f'.{quantizer}.scale')
        ]
        assert len(scales) == CONVS and all((v > 0).all() for v in scales)
    stem = 'backbone.stem.branch_reparam'
    assert weights[f'{stem}.weight_fake_quant.scale'].shape == (
        weights[f'{stem}.weight'].shape[0], )
    assert not weights[f'{stem}.weight_fake_quant.zero_point'].any()
    assert 0 <= int(weights[f'{stem}.input_fake_quant.zero_point']) <= 255


@pytest.mark.numerics
def test_resumed_qat_ends_as_the_uninterrupted_run(trained_qarepvgg, qat_run,
                                                   tmp_path):
    interrupted = qat_train(trained_qarepvgg, tmp_path, 2)
    assert interrupted.returncode == 0, output(interrupted)
    before = snapshot(tmp_path)
    resumed = qat_train(trained_qarepvgg, tmp_path, QAT_ITERS, '--resume')
    assert resumed.returncode == 0, output(resumed)
    # It went on from iteration 2: it did not write that checkpoint again.
    assert snapshot(tmp_path)['iter_2.pth'] == before['iter_2.pth']
    final = load_checkpoint(final_checkpoint(tmp_path)).weights
    expected = load_checkpoint(final_checkpoint(qat_run)).weights
    assert final.keys() == expected.keys()
    differ = [k for k in final if not torch.equal(final[k], expected[k])]
    assert not differ, differ[:5]


def test_the_qat_config_evaluates_its_checkpoint_as_well_as_fp32(
        trained_qarepvgg, qat_run, tmp_path):
    # The config written to the work dir builds the QAT model again.
    config = next(qat_run.glob('*.py'))
    result = run_tool_here('test.py', config, final_checkpoint(qat_run),
                           '--work-dir', tmp_path)
    assert result.returncode == 0, output(result)
    # The fp32 model's evaluation at the end of its training.
    trained = logged_metrics(trained_qarepvgg.work_dir)['mIoU']
    assert logged_metrics(tmp_path)['mIoU'] >= trained - 0.3


@pytest.fixture(scope='module')
def qat_export(trained_qarepvgg, qat_run, tmp_path_factory):
    """The QAT checkpoint exported by the command line, checked against the
    floor: the model as read, and what the tool printed."""
    out = tmp_path_factory.mktemp('qat_onnx') / 'qat.onnx'
    result = run_tool_here('export.py', trained_qarepvgg.config,
                           final_checkpoint(qat_run), out, '--shape',
                           *TOY_SIZE, '--int8', '--qat-eval-num', 4,
                           '--qat-min-agreement', AGREEMENT_FLOOR)
    assert result.returncode == 0, output(result)
    return read_model(str(out)), result.stdout


@pytest.mark.numerics
def test_qat_export_is_qdq_with_the_trained_scales(qat_run, qat_export):
    exported, stdout = qat_export
    assert exported.info.precision == 'int8'
    assert exported.info.int8_scheme == 'cpu'
    assert exported.info.agreement['labels'] >= AGREEMENT_FLOOR
    assert 'int8 (cpu scheme) from QAT: ONNX Runtime labels agree with the ' \
        'QAT model on ' in stdout
    model = exported.proto
    nodes = {o: n for n in model.graph.node for o in n.output}
    constants = {
        i.name: onnx.numpy_helper.to_array(i)
        for i in model.graph.initializer
    }
    convs = [n for n in model.graph.node if n.op_type == 'Conv']
    # The auxiliary head trains but is not part of the exported model.
    assert len(convs) == CONVS - 2
    for conv in convs:
        activation, weight = (nodes[name] for name in conv.input[:2])
        assert activation.op_type == weight.op_type == 'DequantizeLinear'
        # uint8 activations with a zero point, one scale per tensor.
        scale, zero_point = (constants[n] for n in activation.input[1:])
        assert scale.shape == () and zero_point.dtype == np.uint8
        # Symmetric int8 weights stored as such, a scale per output channel.
        values, scales, zero_points = (constants[n] for n in weight.input)
        assert values.dtype == zero_points.dtype == np.int8
        assert not zero_points.any()
        assert scales.shape == zero_points.shape == values.shape[:1]
    weights = load_checkpoint(final_checkpoint(qat_run)).weights
    trained = weights['backbone.stem.branch_reparam.input_fake_quant.scale']
    first = nodes[convs[0].input[0]]
    assert float(constants[first.input[1]]) == float(trained)


def test_onnx_runtime_runs_the_qat_models_backbone_in_int8(
        qat_export, tmp_path):
    import onnxruntime
    exported, _ = qat_export
    options = onnxruntime.SessionOptions()
    options.optimized_model_filepath = str(tmp_path / 'optimized.onnx')
    onnxruntime.InferenceSession(
        exported.proto.SerializeToString(),
        options,
        providers=['CPUExecutionProvider'])
    ops = Counter(
        n.op_type
        for n in onnx.load(options.optimized_model_filepath).graph.node)
    # Every backbone conv, the last one (read by the pyramid pooling and the
    # concatenation, through its quantized output) too, and the bottleneck;
    # the pyramid's 1x1 convs on pooled maps and the classifier stay float.
    assert ops['QLinearConv'] == CONVS - 2 - 5, ops


def test_openvino_runs_the_qat_model_in_int8(trained_qarepvgg, qat_export,
                                             tmp_path):
    import openvino
    exported, _ = qat_export
    core = openvino.Core()
    compiled = core.compile_model(
        core.read_model(exported.name), 'CPU',
        {'INFERENCE_PRECISION_HINT': 'f32'})
    precisions = Counter(
        op.get_rt_info()['runtimePrecision'].astype(str)
        for op in compiled.get_runtime_model().get_ordered_ops()
        if op.get_rt_info()['layerType'].astype(str) == 'Convolution')
    assert precisions['u8'] + precisions['i8'] >= 22, precisions
    segmenters = [
        Segmenter(exported, EngineSettings(backend))
        for backend in ('onnxruntime', 'openvino')
    ]
    for path in trained_qarepvgg.val_images:
        image = cv2.imread(path)
        labels = [segmenter(image) for segmenter in segmenters]
        assert (labels[0] == labels[1]).mean() >= AGREEMENT_FLOOR


def test_qat_export_below_the_agreement_is_refused():
    with pytest.raises(
            VerificationError,
            match='agree with the QAT model on 99.80% .* below the 99.90% '
            'asked'):
        check_agreement(
            Agreement(0.998, 0.01, 4, 'val'),
            MIN_QAT_AGREEMENT,
            reference='the QAT model')
    check_agreement(
        Agreement(MIN_QAT_AGREEMENT, 0.01, 4, 'val'), MIN_QAT_AGREEMENT)


@pytest.mark.parametrize(
    'arguments, message',
    [
        (['--qat-eval-num', '0'], '--qat-eval-num must be at least 1'),
        (['--qat-min-agreement', '1.5'], 'a share of pixels, from 0 to 1'),
        ([], 'export it with --int8'),
        (['--img'], "checked on the config's validation images, not on --img"),
        # Its scales were trained for the cpu scheme: no other is written.
        (['--int8-scheme', 'tensorrt'],
         '--int8-scheme: not for a QAT checkpoint, exported in the cpu scheme'
         ),
        (['--min-agreement', '0.5'
          ], '--min-agreement: not for a QAT checkpoint'),
    ])
def test_qat_export_refuses_bad_arguments(trained_qarepvgg, qat_run, tmp_path,
                                          arguments, message):
    int8 = ['--int8'] if arguments else []
    if arguments == ['--img']:
        arguments = ['--img', trained_qarepvgg.val_images[0]]
    result = run_tool_here('export.py', trained_qarepvgg.config,
                           final_checkpoint(qat_run), tmp_path / 'qat.onnx',
                           *int8, *arguments)
    assert_refused(result, message)
    assert os.listdir(tmp_path) == []


@pytest.fixture(scope='module')
def refused_inputs(trained_qarepvgg, qat_run, tmp_path_factory):
    """Name to ``(config, checkpoint)`` of what QAT cannot start from."""
    tmp_path = tmp_path_factory.mktemp('refused')
    cfg = read_config(trained_qarepvgg.config)
    deploy = tmp_path / 'deploy.pth'
    torch.save(
        dict(
            state_dict=deploy_model(
                cfg, trained_qarepvgg.checkpoint).model.state_dict()), deploy)
    foreign = tmp_path / 'resnet.py'
    foreign.write_text(f'_base_ = {trained_qarepvgg.config!r}\n'
                       'model = dict(backbone=dict(_delete_=True, '
                       "type='ResNetV1c', depth=18))\n")
    config = trained_qarepvgg.config
    return {
        'deploy': (config, deploy),
        'foreign': (foreign, trained_qarepvgg.checkpoint),
        'missing': (config, tmp_path / 'missing.pth'),
        'qat': (config, final_checkpoint(qat_run)),
    }


@pytest.mark.parametrize('name, message', [
    ('deploy', 'is a deploy checkpoint; QAT starts from a trained'),
    ('foreign', 'this config builds no RepVGG backbone'),
    ('missing', 'missing.pth: no such file'),
    ('qat', 'is a QAT checkpoint already; continue its training with'),
])
def test_qat_refuses_what_it_cannot_start_from(refused_inputs, tmp_path, name,
                                               message):
    config, checkpoint = refused_inputs[name]
    work_dir = tmp_path / 'work'
    before = snapshot(tmp_path)
    result = run_tool_here('train.py', config, '--qat', checkpoint,
                           '--work-dir', work_dir)
    assert_refused(result, message, tmp_path, before)
    assert not work_dir.exists()


def test_a_loaded_qat_checkpoint_is_not_equalized_again(
        trained_qarepvgg, qat_run, tmp_path, monkeypatch):
    cfg = read_config(trained_qarepvgg.config)
    use_qat(cfg, trained_qarepvgg.checkpoint, equalize=True)
    cfg.work_dir = str(tmp_path)
    cfg.load_from = final_checkpoint(qat_run)

    def refuse(*args):
        raise AssertionError('equalized, then overwritten by the checkpoint')

    monkeypatch.setattr(convert, 'equalize_checked', refuse)
    runner = build_runner(cfg)
    runner.load_or_resume()
    expected = load_checkpoint(cfg.load_from).weights
    state = runner.model.state_dict()
    assert all(torch.equal(state[k], v) for k, v in expected.items())


@pytest.mark.parametrize('flag', ['--qat-equalize', '--qat-distill'])
def test_qat_options_need_qat(trained_qarepvgg, tmp_path, flag):
    result = run_tool_here('train.py', trained_qarepvgg.config, flag,
                           '--work-dir', tmp_path / 'work')
    assert_refused(result, f'{flag} needs --qat')
    assert os.listdir(tmp_path) == []


def logged_losses(work_dir):
    """The names of the losses in a training run's log lines."""
    log, = glob.glob(str(work_dir / '*' / '*.log'))
    with open(log) as f:
        return {
            name
            for line in f if 'Iter(train)' in line
            for name in re.findall(r'(\S*loss\S*):', line)
        }


def test_distilled_qat_learns_the_trained_models_predictions(
        trained_qarepvgg, qat_run, tmp_path):
    result = qat_train(trained_qarepvgg, tmp_path, 2, '--qat-distill',
                       '--cfg-options', 'default_hooks.logger.interval=1')
    assert result.returncode == 0, output(result)
    # Not the labels' cross-entropy.
    assert logged_losses(tmp_path) == {
        'loss', 'decode.loss_distill', 'aux.loss_distill'
    }
    # The fp32 model it learns from is no part of the checkpoint.
    distilled = load_checkpoint(str(tmp_path / 'iter_2.pth')).weights
    assert distilled.keys() == load_checkpoint(
        final_checkpoint(qat_run)).weights.keys()


@pytest.mark.numerics
def test_distillation_from_the_model_itself_is_zero(trained_qarepvgg):
    model = deploy_model(
        read_config(trained_qarepvgg.config),
        trained_qarepvgg.checkpoint).model
    inputs = torch.rand(2, 3, *TOY_SIZE)
    # In training mode, as QAT's (its norms folded): the student's heads
    # lose their dropout.
    fold_conv_norms(model)
    losses = Distillation(model.train(), copy.deepcopy(model)).loss(inputs)
    assert set(losses) == {'decode.loss_distill', 'aux.loss_distill'}
    assert all(float(v) == 0 for v in losses.values())
    other = copy.deepcopy(model)
    with torch.no_grad():
        other.decode_head.conv_seg.bias.add_(
            1e-3 * torch.arange(other.decode_head.conv_seg.bias.numel()))
    losses = Distillation(other, model).loss(inputs)
    assert float(losses['decode.loss_distill']) > 0
    assert float(losses['aux.loss_distill']) == 0


def _activation_ranges(model, images):
    """``{name: (min, max)}`` over ``images`` of each conv's input and each
    output block's output in ``model`` (deploy form), under the name of the
    fake quantizer that QAT gives it."""
    seen = {}

    def recorder(name):

        def record(module, args, output=None):
            value = args[0] if output is None else output
            low, high = seen.get(name, (float('inf'), float('-inf')))
            seen[name] = (min(low,
                              float(value.min())), max(high,
                                                       float(value.max())))

        return record

    outputs = {id(b) for b in model.backbone.output_blocks()}
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            module.register_forward_pre_hook(
                recorder(f'{name}.input_fake_quant'))
        elif id(module) in outputs:
            module.register_forward_hook(
                recorder(f'{name}.act.output_fake_quant'))
    run_on_images(model.eval(), images)
    return seen


def test_qat_starts_from_the_activation_ranges_int8_export_calibrates(
        trained_qarepvgg, tmp_path):
    cfg = read_config(trained_qarepvgg.config)
    use_qat(cfg, trained_qarepvgg.checkpoint)
    cfg.work_dir = str(tmp_path)
    model = build_runner(cfg).model
    deploy = deploy_model(
        read_config(trained_qarepvgg.config),
        trained_qarepvgg.checkpoint).model
    expected = _activation_ranges(
        deploy, split_images(cfg, 'train', CALIBRATION_IMAGES, None))
    calibrated = 0
    for name, quantizer in activation_quantizers(model):
        observer = quantizer.activation_post_process
        seen = (float(observer.min_val), float(observer.max_val))
        if name not in expected:  # the auxiliary head: training only
            assert seen == (float('inf'), float('-inf')), name
            continue
        # The heads' norms are folded into their convs in the QAT model.
        assert seen == pytest.approx(expected[name], rel=1e-5), name
        scale, _ = quantizer.calculate_qparams()
        assert torch.equal(quantizer.scale, scale), name
        calibrated += 1
    # The 28 convs that inference reaches, and the 4 stage outputs.
    assert calibrated == CONVS - 2 + 4


def test_qat_equalize_starts_from_the_equalized_deploy_model(
        trained_qarepvgg, tmp_path):
    cfg = read_config(trained_qarepvgg.config)
    use_qat(cfg, trained_qarepvgg.checkpoint, equalize=True)
    cfg.work_dir = str(tmp_path)
    # As the config written to the work dir builds it.
    model = build_runner(cfg).model
    expected, plain = (
        deploy_model(
            read_config(trained_qarepvgg.config),
            trained_qarepvgg.checkpoint).model for _ in range(2))
    calibration = partial(split_images, cfg, 'train', CALIBRATION_IMAGES, None)
    assert equalize_checked(expected, calibration, DEFAULT_CHECK_SIZE) > 0
    # The heads' convs have their norms folded in as well.
    for name, conv in expected.backbone.named_modules():
        if isinstance(conv, nn.Conv2d):
            qat_conv = model.backbone.get_submodule(name)
            assert torch.equal(qat_conv.weight, conv.weight), name
    assert not torch.equal(model.backbone.stem.branch_reparam.weight,
                           plain.backbone.stem.branch_reparam.weight)
