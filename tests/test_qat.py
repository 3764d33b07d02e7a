"""Quantization-aware training of the deploy form: ``tools/train.py --qat``
fine-tunes a trained toy PSPNet with fake quantization on mmengine, marks
its checkpoints, resumes as if never interrupted, and exports a QDQ model
whose ONNX Runtime labels are the QAT model's own and that OpenVINO runs in
int8."""
import os.path as osp
from collections import Counter

import onnx
import pytest
import torch

from helpers import (TOY_SIZE, assert_refused, logged_metrics, output,
                     run_tool_here, snapshot)
from mmrepvgg.checkpoint import load_checkpoint
from mmrepvgg.config import read_config
from mmrepvgg.deploy.loading import deploy_model
from mmrepvgg.qat import MIN_QAT_AGREEMENT, QAT_META_KEY

QAT_ITERS = 4
# Every conv of the toy PSPNet-RepVGG-A0 (22 in the backbone, 6 in the PSP
# head, 2 in the auxiliary head) has a weight and an input quantizer.
CONVS = 30

pytestmark = [pytest.mark.slow, pytest.mark.integration]


def qat_train(trained, work_dir, iters, *options):
    """``tools/train.py CONFIG --qat CHECKPOINT`` for ``iters`` iterations,
    a checkpoint every 2."""
    return run_tool_here('train.py', trained.config, '--qat',
                         trained.checkpoint, '--work-dir', work_dir, *options,
                         '--cfg-options', f'train_cfg.max_iters={iters}',
                         'default_hooks.checkpoint.interval=2')


@pytest.fixture(scope='module')
def qat_run(trained_qarepvgg, tmp_path_factory):
    """QAT of the toy model trained long enough for its labels to mean
    something."""
    work_dir = tmp_path_factory.mktemp('qat')
    result = qat_train(trained_qarepvgg, work_dir, QAT_ITERS)
    assert result.returncode == 0, output(result)
    return work_dir


def test_qat_checkpoints_are_marked_and_keep_the_deploy_names(
        trained_qarepvgg, qat_run):
    loaded = load_checkpoint(str(qat_run / f'iter_{QAT_ITERS}.pth'))
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
        scales = {k: v for k, v in weights.items() if k.endswith(
            f'.{quantizer}.scale')}
        assert len(scales) == CONVS
        assert all((v > 0).all() for v in scales.values())
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
    final = load_checkpoint(str(tmp_path / f'iter_{QAT_ITERS}.pth')).weights
    expected = load_checkpoint(str(qat_run /
                                   f'iter_{QAT_ITERS}.pth')).weights
    assert final.keys() == expected.keys()
    differ = [k for k in final if not torch.equal(final[k], expected[k])]
    assert not differ, differ[:5]


@pytest.fixture(scope='module')
def qat_export(trained_qarepvgg, qat_run, tmp_path_factory):
    out = tmp_path_factory.mktemp('qat_onnx') / 'qat.onnx'
    result = run_tool_here('export.py', trained_qarepvgg.config,
                           qat_run / f'iter_{QAT_ITERS}.pth', out, '--int8',
                           '--shape', *TOY_SIZE, '--eval-num', 4)
    assert result.returncode == 0, output(result)
    return out, result.stdout


@pytest.mark.numerics
def test_qat_export_is_qdq_with_the_trained_scales(qat_run, qat_export):
    out, stdout = qat_export
    assert 'int8 from QAT' in stdout
    model = onnx.load(str(out))
    props = {p.key: p.value for p in model.metadata_props}
    assert props['precision'] == '"int8"'
    nodes = {o: n for n in model.graph.node for o in n.output}
    constants = {i.name: onnx.numpy_helper.to_array(i)
                 for i in model.graph.initializer}
    convs = [n for n in model.graph.node if n.op_type == 'Conv']
    # The auxiliary head trains but is not part of the exported model.
    assert len(convs) == CONVS - 2
    weights = load_checkpoint(str(qat_run /
                                  f'iter_{QAT_ITERS}.pth')).weights
    for conv in convs:
        activation, weight = (nodes[name] for name in conv.input[:2])
        assert activation.op_type == weight.op_type == 'DequantizeLinear'
        assert _zero_point_type(activation, nodes, constants) == 'uint8'
        assert _zero_point_type(weight, nodes, constants) == 'int8'
    stem_scale = weights['backbone.stem.branch_reparam.input_fake_quant.scale']
    scales = [
        float(constants[n.input[1]]) for n in model.graph.node
        if n.op_type == 'DequantizeLinear' and n.input[1] in constants
        and constants[n.input[1]].size == 1
    ]
    assert min(abs(s - float(stem_scale)) for s in scales) < 1e-12


def _zero_point_type(node, nodes, constants):
    """The element type of a DequantizeLinear's zero point (an initializer,
    a Constant or a Cast of one)."""
    name = node.input[2]
    if name in constants:
        return str(constants[name].dtype)
    producer = nodes[name]
    if producer.op_type == 'Cast':
        to = next(a.i for a in producer.attribute if a.name == 'to')
        return onnx.helper.tensor_dtype_to_np_dtype(to).name
    value = next(a.t for a in producer.attribute if a.name == 'value')
    return str(onnx.numpy_helper.to_array(value).dtype)
