"""ImageNet weights of every published layout load without conversion."""
import re

import pytest
import torch
from helpers import randomize_batch_norms, run_tool

from mmrepvgg import RepVGG, switch_to_deploy
from mmrepvgg.convert import convert_pretrained

# A custom net small enough to save quickly, with every kind of tensor:
# identity branches, grouped blocks and squeeze-excitation.
TINY = dict(
    num_blocks=(2, 2, 2, 1),
    width_factor=(0.5, 0.5, 0.5, 1),
    group_layer_map={
        2: 2,
        4: 2
    },
    se_cfg=dict(ratio=4))
# The official release's names for our sub-modules.
OFFICIAL_NAMES = [
    ('branch_3x3.conv.', 'rbr_dense.conv.'),
    ('branch_3x3.norm.', 'rbr_dense.bn.'),
    ('branch_1x1.conv.', 'rbr_1x1.conv.'),
    ('branch_1x1.norm.', 'rbr_1x1.bn.'),
    ('branch_norm.', 'rbr_identity.'),
    ('branch_reparam.', 'rbr_reparam.'),
    ('se_layer.conv1.conv.', 'se.down.'),
    ('se_layer.conv2.conv.', 'se.up.'),
]


def official_key(key):
    key = re.sub(r'^stem\.', 'stage0.', key)
    key = re.sub(r'^stage_(\d)\.', r'stage\1.', key)
    for ours, theirs in OFFICIAL_NAMES:
        key = key.replace(ours, theirs)
    return key


def official_layout(model, module_prefix=''):
    state = {
        module_prefix + official_key(k): v
        for k, v in model.state_dict().items()
        if not k.endswith('num_batches_tracked')
    }
    state[module_prefix + 'linear.weight'] = torch.rand(1000, 512)
    state[module_prefix + 'linear.bias'] = torch.rand(1000)
    return state


def zoo_layout(model):
    state = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    state['head.fc.weight'] = torch.rand(1000, 512)
    return dict(state_dict=state, meta=dict(epoch=120))


@pytest.fixture
def source():
    torch.manual_seed(0)
    return randomize_batch_norms(RepVGG(TINY)).eval()


def outputs(model, x):
    with torch.no_grad():
        return model.eval()(x)


def assert_same_outputs(model, source):
    x = torch.rand(1, 3, 32, 64)
    for a, b in zip(outputs(model, x), outputs(source, x)):
        assert torch.equal(a, b)


def load_pretrained(path, **kwargs):
    init_cfg = dict(type='Pretrained', checkpoint=str(path), **kwargs)
    model = RepVGG(TINY, init_cfg=init_cfg)
    model.init_weights()
    return model


def test_zoo_layout_loads_with_backbone_prefix(source, tmp_path):
    path = tmp_path / 'repvgg_zoo.pth'
    torch.save(zoo_layout(source), path)
    assert_same_outputs(load_pretrained(path, prefix='backbone.'), source)


@pytest.mark.parametrize('module_prefix', ['', 'module.'])
def test_official_layout_loads(source, tmp_path, module_prefix):
    path = tmp_path / 'RepVGG-official-train.pth'
    torch.save(official_layout(source, module_prefix), path)
    assert_same_outputs(load_pretrained(path), source)


def test_official_deploy_file_loads_into_a_deploy_backbone(source, tmp_path):
    deployed = switch_to_deploy(source)
    path = tmp_path / 'RepVGG-official-deploy.pth'
    torch.save(official_layout(deployed), path)
    model = RepVGG(
        TINY,
        deploy=True,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    model.init_weights()
    assert_same_outputs(model, deployed)


def test_deploy_weights_offered_to_a_train_backbone_say_deploy(
        source, tmp_path):
    path = tmp_path / 'deploy.pth'
    torch.save(official_layout(switch_to_deploy(source)), path)
    with pytest.raises(ValueError, match='deploy=True'):
        load_pretrained(path)
    with pytest.raises(ValueError, match='deploy=True'):
        RepVGG(TINY).load_state_dict(torch.load(path))


def test_train_weights_offered_to_a_deploy_backbone_say_switch(source):
    with pytest.raises(ValueError, match='switch_to_deploy'):
        RepVGG(TINY, deploy=True).load_state_dict(source.state_dict())


@pytest.mark.parametrize('layout', ['official', 'module', 'zoo'])
def test_convert_pretrained_writes_our_layout(source, tmp_path, layout):
    src = tmp_path / f'{layout}.pth'
    torch.save(
        zoo_layout(source) if layout == 'zoo' else official_layout(
            source, 'module.' if layout == 'module' else ''), src)
    dst = tmp_path / 'converted.pth'
    result = run_tool('convert_pretrained.py', src, dst)
    assert result.returncode == 0, result.stderr
    keys = torch.load(dst)['state_dict'].keys()
    assert all(
        k.startswith('backbone.stem.') or k.startswith('backbone.stage_')
        for k in keys)
    assert_same_outputs(load_pretrained(dst, prefix='backbone.'), source)


def test_convert_pretrained_refuses_to_overwrite(source, tmp_path):
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    torch.save(official_layout(source), src)
    dst.write_text('precious')
    result = run_tool('convert_pretrained.py', src, dst)
    assert result.returncode == 1
    assert result.stderr.strip().count('\n') == 0
    assert 'already exists' in result.stderr
    assert dst.read_text() == 'precious'
    convert_pretrained(str(src), str(dst), force=True)
    assert 'state_dict' in torch.load(dst)
