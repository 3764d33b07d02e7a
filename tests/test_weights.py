"""ImageNet weights load into our backbone with every tensor placed.

The weights come from the other side: mmpretrain 1.2.0's own ``RepVGG``
writes them (the OpenMMLab model-zoo layout), and a table typed from the
official release's module names renames them to its layout. The reference
outputs are mmpretrain's.
"""
import copy
import functools
import os.path as osp
import re

import pytest
import torch

from mmrepvgg import RepVGG, switch_to_deploy
from mmrepvgg.deploy.compare import relative_error
from mmrepvgg.deploy.exact import fp32_and_exact
from mmrepvgg.errors import CheckpointError
from mmrepvgg.pretrained import convert_pretrained
from tests.helpers import (D2SE, assert_computes_as, assert_fp32_close,
                           randomize_batch_norms, run_tool_here)
from tests.mmpretrain_repvgg import load_mmpretrain_repvgg

ARCHS = ['A0', 'B1g2', D2SE]
# mmpretrain's module names and the official release's (DingXiaoH/RepVGG,
# repvgg.py: ``stage0`` is the stem, ``conv_bn()`` names its norm ``bn``,
# the identity branch is ``rbr_identity``, ``SEBlock`` has ``down`` and
# ``up`` convs, deploy blocks hold ``rbr_reparam``).
OFFICIAL_NAMES = [
    (r'^stem\.', 'stage0.'),
    (r'^stage_(\d)\.', r'stage\1.'),
    (r'\.branch_3x3\.conv\.', '.rbr_dense.conv.'),
    (r'\.branch_3x3\.norm\.', '.rbr_dense.bn.'),
    (r'\.branch_1x1\.conv\.', '.rbr_1x1.conv.'),
    (r'\.branch_1x1\.norm\.', '.rbr_1x1.bn.'),
    (r'\.branch_norm\.', '.rbr_identity.'),
    (r'\.branch_reparam\.', '.rbr_reparam.'),
    (r'\.se_layer\.conv1\.conv\.', '.se.down.'),
    (r'\.se_layer\.conv2\.conv\.', '.se.up.'),
]
INPUT = torch.rand(1, 3, 64, 64, generator=torch.Generator().manual_seed(0))

pytestmark = pytest.mark.numerics


@functools.lru_cache(maxsize=None)
def mmpretrain_repvgg(arch, deploy=False, dtype=torch.float32):
    """mmpretrain's RepVGG with random weights and batch-norm statistics,
    converted to deploy form by mmpretrain itself when asked; built once
    for all tests (which copy it before changing it)."""
    torch.manual_seed(0)
    model = load_mmpretrain_repvgg()(arch, out_indices=(0, 1, 2, 3))
    model = randomize_batch_norms(model.to(dtype))
    if deploy:
        model.switch_to_deploy()
    model.eval()  # its train() returns None
    return model


def zoo_file(model, path):
    """Save as mmpretrain's ImageClassifier checkpoints are laid out."""
    state = {f'backbone.{k}': v for k, v in model.state_dict().items()}
    state['head.fc.weight'] = torch.rand(1000, 8)
    torch.save(dict(state_dict=state, meta=dict(epoch=120)), path)
    return path


def official_key(key):
    for pattern, name in OFFICIAL_NAMES:
        key = re.sub(pattern, name, key)
    return key


def official_file(model, path, wrapper=''):
    """Save as the official release's files are laid out."""
    state = {
        wrapper + official_key(k): v
        for k, v in model.state_dict().items()
    }
    state[wrapper + 'linear.weight'] = torch.rand(1000, 8)
    state[wrapper + 'linear.bias'] = torch.rand(1000)
    torch.save(state, path)
    return path


def pretrained_backbone(arch, path, dtype=torch.float32, **kwargs):
    init_cfg = dict(type='Pretrained', checkpoint=str(path), **kwargs)
    model = RepVGG(arch, out_indices=(0, 1, 2, 3), init_cfg=init_cfg)
    model = model.to(dtype)
    model.init_weights()
    return model.eval()


def outputs(model, dtype=torch.float32):
    with torch.no_grad():
        return model(INPUT.to(dtype))


def assert_same_outputs(ours, theirs):
    expected = outputs(theirs)
    actual = outputs(ours)
    assert len(actual) == len(expected) == 4
    for a, e in zip(actual, expected):
        assert a.shape == e.shape
    assert_computes_as(ours, theirs, [INPUT])


@pytest.mark.parametrize('arch', ARCHS)
def test_zoo_layout_written_by_mmpretrain_loads(arch, tmp_path):
    theirs = mmpretrain_repvgg(arch)
    path = zoo_file(theirs, tmp_path / 'zoo.pth')
    ours = pretrained_backbone(arch, path, prefix='backbone.')
    assert_same_outputs(ours, theirs)
    # The same names: our backbone weights load into mmpretrain unchanged.
    copy.deepcopy(theirs).load_state_dict(ours.state_dict(), strict=True)


@pytest.mark.parametrize('wrapper', ['', 'module.'])
@pytest.mark.parametrize('arch', ARCHS)
def test_official_layout_loads(arch, wrapper, tmp_path):
    theirs = mmpretrain_repvgg(arch)
    path = official_file(theirs, tmp_path / 'RepVGG-train.pth', wrapper)
    assert_same_outputs(pretrained_backbone(arch, path), theirs)


@pytest.mark.parametrize('arch', ['A0', 'B1g2'])
def test_official_deploy_file_loads_into_a_deploy_backbone(arch, tmp_path):
    theirs = mmpretrain_repvgg(arch, deploy=True)
    path = official_file(theirs, tmp_path / 'RepVGG-deploy.pth')
    ours = RepVGG(
        arch,
        out_indices=(0, 1, 2, 3),
        deploy=True,
        init_cfg=dict(type='Pretrained', checkpoint=str(path)))
    ours.init_weights()
    assert_same_outputs(ours.eval(), theirs)


@pytest.mark.slow
def test_official_d2se_deploy_file_keeps_its_squeeze_excitation(tmp_path):
    # mmpretrain's deploy forward skips the SE layer that the official
    # deploy model applies, so the reference is its training form; float64
    # makes the comparison far tighter than fp32 rounding of 48 fused
    # blocks would allow.
    train = mmpretrain_repvgg('D2se', dtype=torch.float64)
    deployed = copy.deepcopy(train)
    deployed.switch_to_deploy()
    path = official_file(deployed, tmp_path / 'RepVGG-D2se-deploy.pth')
    ours = RepVGG(
        'D2se',
        out_indices=(0, 1, 2, 3),
        deploy=True,
        init_cfg=dict(type='Pretrained', checkpoint=str(path))).double()
    ours.init_weights()
    for a, e in zip(
            outputs(ours.eval(), torch.float64), outputs(train,
                                                         torch.float64)):
        assert relative_error(a, e) <= 1e-10


@pytest.fixture(scope='module')
def a0_zoo_weights():
    return {
        f'backbone.{k}': v
        for k, v in mmpretrain_repvgg('A0').state_dict().items()
    }


@pytest.mark.parametrize('change, message', [
    (lambda s: s.pop('backbone.stage_2.3.branch_norm.running_var'),
     r'missing stage_2\.3\.branch_norm\.running_var$'),
    (lambda s: s.update({
        'backbone.stage_1.0.branch_3x3.scale':
        s['backbone.stage_1.0.branch_3x3.norm.weight']
    }), r'unexpected stage_1\.0\.branch_3x3\.scale$'),
    (lambda s: s.update(
        {'backbone.stem.branch_1x1.conv.weight': torch.ones(48, 3, 3, 3)}),
     r'shape of stem\.branch_1x1\.conv\.weight '
     r'\(48, 3, 3, 3\) for \(48, 3, 1, 1\)$'),
])
def test_weights_that_do_not_fit_fail_and_name_the_tensor(
        a0_zoo_weights, tmp_path, change, message):
    weights = dict(a0_zoo_weights)
    change(weights)
    path = tmp_path / 'bad.pth'
    torch.save(dict(state_dict=weights), path)
    with pytest.raises(
            CheckpointError,
            match=r'\(OpenMMLab model zoo layout\) do not fit the backbone: ' +
            message):
        pretrained_backbone('A0', path, prefix='backbone.')


def test_weights_of_another_arch_fail(a0_zoo_weights, tmp_path):
    path = tmp_path / 'a0.pth'
    torch.save(dict(state_dict=a0_zoo_weights), path)
    with pytest.raises(CheckpointError, match=r'shape of .* \(\+\d+ more\)'):
        pretrained_backbone('A1', path, prefix='backbone.')


def test_deploy_weights_offered_to_a_train_backbone_say_deploy(tmp_path):
    theirs = mmpretrain_repvgg('A0', deploy=True)
    path = official_file(theirs, tmp_path / 'deploy.pth')
    with pytest.raises(ValueError, match='deploy=True'):
        pretrained_backbone('A0', path)
    with pytest.raises(ValueError, match='switch_to_deploy'):
        RepVGG(
            'A0',
            deploy=True).load_state_dict(mmpretrain_repvgg('A0').state_dict())


@pytest.mark.parametrize('layout', ['official', 'module', 'zoo'])
def test_convert_pretrained_writes_our_layout(tmp_path, layout):
    theirs = mmpretrain_repvgg('A0')
    src = tmp_path / f'{layout}.pth'
    if layout == 'zoo':
        zoo_file(theirs, src)
    else:
        official_file(theirs, src, 'module.' if layout == 'module' else '')
    dst = tmp_path / 'converted.pth'
    result = run_tool_here('convert_pretrained.py', src, dst)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith('wrote ')
    assert 'of RepVGG-A0 (training form)' in result.stdout
    keys = torch.load(dst)['state_dict'].keys()
    assert all(
        k.startswith(('backbone.stem.', 'backbone.stage_')) for k in keys)
    ours = pretrained_backbone('A0', dst, prefix='backbone.')
    assert_same_outputs(ours, theirs)


def test_convert_pretrained_refuses_weights_that_fit_no_arch(
        a0_zoo_weights, tmp_path):
    weights = dict(a0_zoo_weights)
    del weights['backbone.stage_3.13.branch_1x1.norm.bias']
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    torch.save(dict(state_dict=weights), src)
    result = run_tool_here('convert_pretrained.py', src, dst)
    assert result.returncode == 1
    assert result.stderr.strip().splitlines() == [
        f'error: {src}: RepVGG weights (OpenMMLab model zoo layout) fit '
        'none of the archs A0, A1, A2, B0, B1, B1g2, B1g4, B2, B2g2, B2g4, '
        'B3, B3g2, B3g4, D2se; pass --arch to see what differs'
    ]
    named = run_tool_here('convert_pretrained.py', src, dst, '--arch', 'A0')
    assert named.returncode == 1
    assert 'missing stage_3.13.branch_1x1.norm.bias' in named.stderr
    assert not dst.exists()


def test_convert_pretrained_refuses_to_overwrite(tmp_path):
    src, dst = tmp_path / 'src.pth', tmp_path / 'dst.pth'
    official_file(mmpretrain_repvgg('A0'), src)
    dst.write_text('precious')
    result = run_tool_here('convert_pretrained.py', src, dst)
    assert result.returncode == 1
    assert result.stderr.strip().count('\n') == 0
    assert 'already exists' in result.stderr
    assert dst.read_text() == 'precious'
    convert_pretrained(str(src), str(dst), force=True)
    assert 'state_dict' in torch.load(dst)


DATA = osp.join(osp.dirname(__file__), 'data')
TINY_CONFIG = osp.join(DATA, 'pspnet_repvgg-tiny.py')
MMREPVGG_0_1 = osp.join(DATA, 'pspnet_repvgg-tiny_mmrepvgg-0.1.pth')


def test_checkpoint_written_by_mmrepvgg_0_1_predicts_the_same():
    from mmseg.apis import init_model
    model = init_model(TINY_CONFIG, MMREPVGG_0_1, device='cpu')
    image = torch.rand(
        1, 3, 64, 128, generator=torch.Generator().manual_seed(0)) * 255
    with torch.no_grad():
        inputs = model.data_preprocessor(dict(inputs=[image[0]]),
                                         False)['inputs']
        logits = model(inputs, mode='tensor')
    recorded = torch.load(
        osp.join(DATA, 'pspnet_repvgg-tiny_mmrepvgg-0.1_logits.pth'))
    # Recorded in fp32 on another CPU: as close to the exact logits as fp32
    # is allowed to be, judged by this CPU's own fp32 error.
    own, exact = fp32_and_exact(
        model, [inputs], run=lambda m, x: m(x, mode='tensor'))
    assert torch.equal(logits, own[0])
    assert_fp32_close(recorded, own, exact)


def test_checkpoint_written_by_mmrepvgg_0_1_converts(tmp_path):
    out = tmp_path / 'deploy.pth'
    result = run_tool_here('reparameterize.py', TINY_CONFIG, MMREPVGG_0_1, out)
    assert result.returncode == 0, result.stderr
    assert 'converted 7 blocks' in result.stdout
    assert out.is_file()


def test_mmpretrain_backbone_computes_what_ours_does():
    # As PSPNet-RepVGG-A0-d8 builds it: dilated, every stage out.
    settings = dict(
        arch='A0',
        out_indices=(0, 1, 2, 3),
        strides=(2, 2, 1, 1),
        dilations=(1, 1, 2, 4))
    ours = RepVGG(**settings).eval()
    switch_to_deploy(randomize_batch_norms(ours))
    theirs = load_mmpretrain_repvgg()(**settings, deploy=True)
    theirs.eval()  # its train() returns None
    # The same parameter names in deploy form: the same network.
    theirs.load_state_dict(ours.state_dict())
    inputs = torch.randn(1, 3, 64, 128)
    with torch.no_grad():
        for a, b in zip(theirs(inputs), ours(inputs)):
            assert torch.equal(a, b)
