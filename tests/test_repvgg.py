import copy

import pytest
import torch
from mmdet.registry import MODELS as MMDET_MODELS
from mmseg.registry import MODELS as MMSEG_MODELS

from mmrepvgg import QARepVGGBlock, RepVGG, RepVGGBlock, switch_to_deploy
from mmrepvgg.deploy import relative_error
from tests.helpers import D2SE, assert_converts_exactly, randomize_batch_norms

ALL_ARCHS = sorted(RepVGG.arch_settings)
# Parameter counts (M) of the deployed nets with a 1000-class linear head,
# from the paper's Table 2 and the official release.
PAPER_PARAMS = {
    'A0': 8.30,
    'A1': 12.78,
    'A2': 25.49,
    'B0': 14.33,
    'B1': 51.82,
    'B1g2': 41.36,
    'B1g4': 36.12,
    'B2': 80.31,
    'B2g4': 55.77,
    'B3': 110.96,
    'B3g4': 75.62,
}

pytestmark = pytest.mark.numerics


def d8(arch):
    """Output stride 8: the last two body stages dilated by 2 and 4."""
    return dict(arch=arch, strides=(2, 2, 1, 1), dilations=(1, 1, 2, 4))


def fast_d8(arch):
    """The paper's "fast" setting: only the last 4 blocks of body stage 2
    are dilated."""
    blocks = RepVGG.arch_settings[arch]['num_blocks'][2]
    return dict(
        arch=arch,
        strides=(2, 2, 1, 1),
        dilations=(1, 1, [1] * (blocks - 4) + [2] * 4, 4))


def test_registered_in_mmseg_and_mmdet_as_one_class():
    seg = MMSEG_MODELS.build(dict(type='RepVGG', arch='A0'))
    det = MMDET_MODELS.build(dict(type='RepVGG', arch='A0'))
    assert type(seg) is RepVGG and type(det) is RepVGG


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_output_shapes_and_channels(arch):
    model = RepVGG(arch, deploy=True).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 96))
    widths = RepVGG.arch_settings[arch]['width_factor']
    expected = [int(64 * 2**i * w) for i, w in enumerate(widths)]
    assert [o.shape[1] for o in outs] == expected == list(model.out_channels)
    assert [tuple(o.shape[2:]) for o in outs] == [(16, 24), (8, 12), (4, 6),
                                                  (2, 3)]


def test_dilated_outputs_keep_stride_8_and_out_indices_select():
    model = RepVGG(**d8('A0'), out_indices=(1, 3)).eval()
    with torch.no_grad():
        outs = model(torch.rand(1, 3, 64, 128))
    assert [tuple(o.shape) for o in outs] == [(1, 96, 8, 16), (1, 1280, 8, 16)]
    assert model.out_channels == (96, 1280)


@pytest.mark.parametrize('arch', sorted(PAPER_PARAMS))
def test_parameter_counts_match_the_paper(arch):
    model = RepVGG(arch, deploy=True)
    head = torch.nn.Linear(model.stage_channels[-1], 1000)
    count = sum(p.numel() for m in (model, head) for p in m.parameters())
    assert count / 1e6 == pytest.approx(PAPER_PARAMS[arch], rel=5e-3)


def test_grouped_blocks_are_every_second_block_from_the_stem():
    model = RepVGG('B1g4')
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    grouped = [i for i, b in enumerate(blocks) if b.groups == 4]
    assert grouped == list(range(2, 27, 2))


def test_d2se_has_squeeze_excitation_on_every_block():
    model = RepVGG('D2se')
    blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
    assert len(blocks) == 1 + 8 + 14 + 24 + 1
    assert all(b.se_layer is not None for b in blocks)
    se = model.stage_1[0].se_layer
    assert se.conv1.conv.out_channels == 160 // 16


def assert_deploy_equivalent(model, inputs):
    model = randomize_batch_norms(model).eval()
    deployed = switch_to_deploy(copy.deepcopy(model))
    assert_converts_exactly(deployed, model, [inputs])
    blocks = [m for m in deployed.modules() if isinstance(m, RepVGGBlock)]
    assert blocks and all(b.deploy for b in blocks)
    assert not any(
        isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
        for m in deployed.modules())
    return deployed


@pytest.mark.parametrize('setting', [d8, fast_d8])
@pytest.mark.parametrize('arch', ['A0', 'B1g2', 'B2g4', D2SE])
def test_deploy_is_equivalent(arch, setting):
    torch.manual_seed(0)
    assert_deploy_equivalent(
        RepVGG(**setting(arch)), torch.rand(1, 3, 64, 128))


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_deploy_is_equivalent_for_every_arch(arch):
    torch.manual_seed(0)
    assert_deploy_equivalent(RepVGG(arch), torch.rand(1, 3, 64, 64))


@pytest.mark.parametrize('block', ['RepVGGBlock', 'QARepVGGBlock'])
@pytest.mark.parametrize('arch', ['A0', 'B1g4', D2SE])
def test_deploy_is_exact_in_float64_even_for_chaotic_nets(arch, block):
    # Gains near 1 make a random deep net amplify any perturbation; in
    # float64 the fused net must still agree to far below fp32 precision.
    torch.manual_seed(0)
    model = RepVGG(**fast_d8(arch), block_cfg=dict(type=block)).double()
    randomize_batch_norms(model, gain=(0.5, 1.5)).eval()
    x = torch.rand(1, 3, 64, 128, dtype=torch.float64)
    with torch.no_grad():
        train_out = model(x)
        deploy_out = switch_to_deploy(model)(x)
    for t, d in zip(train_out, deploy_out):
        assert relative_error(d, t) <= 1e-10


def test_deploy_is_equivalent_with_syncbn_on_cpu():
    torch.manual_seed(0)
    model = RepVGG(**fast_d8('A0'), norm_cfg=dict(type='SyncBN'))
    assert any(isinstance(m, torch.nn.SyncBatchNorm) for m in model.modules())
    assert_deploy_equivalent(model, torch.rand(1, 3, 64, 128))


def test_fusion_is_exact_in_float64():
    torch.manual_seed(0)
    block = RepVGGBlock(16, 16, dilation=2, groups=4).double()
    randomize_batch_norms(block).eval()
    x = torch.rand(2, 16, 9, 11, dtype=torch.float64)
    with torch.no_grad():
        expected = block(x)
        actual = block.switch_to_deploy()(x)
    assert relative_error(actual, expected) <= 1e-12


def test_switch_to_deploy_is_idempotent_and_returns_the_model():
    model = torch.nn.Sequential(RepVGG('A0'), RepVGGBlock(8, 8))
    assert switch_to_deploy(model) is model
    state = copy.deepcopy(model.state_dict())
    switch_to_deploy(model)
    assert model[0].deploy and model[1].deploy
    assert model.state_dict().keys() == state.keys()
    assert all(torch.equal(model.state_dict()[k], v) for k, v in state.items())
    block = model[1]
    assert hasattr(block, 'branch_reparam')
    assert block.branch_reparam.bias is not None
    for branch in ('branch_3x3', 'branch_1x1', 'branch_norm'):
        assert not hasattr(block, branch)


def test_deploy_keeps_dtype_and_device_of_the_weights():
    block = RepVGGBlock(8, 8).half().switch_to_deploy()
    assert block.branch_reparam.weight.dtype == torch.float16


def test_frozen_stages_stop_gradients_and_stay_in_eval():
    model = RepVGG('A0', frozen_stages=1)
    model.train()
    for name in ('stem', 'stage_1'):
        module = getattr(model, name)
        assert not module.training
        assert not any(p.requires_grad for p in module.parameters())
    for name in ('stage_2', 'stage_3', 'stage_4'):
        module = getattr(model, name)
        assert module.training
        assert all(p.requires_grad for p in module.parameters())
    frozen = copy.deepcopy(model.stem.state_dict())
    model(torch.rand(2, 3, 32, 32)).__getitem__(-1).sum().backward()
    for key, value in model.stem.state_dict().items():
        assert torch.equal(value, frozen[key])  # running stats too


def test_frozen_stages_zero_is_the_stem_only():
    model = RepVGG('A0', frozen_stages=0).train()
    assert not model.stem.training and model.stage_1.training


def test_norm_eval_keeps_batch_norms_in_eval():
    model = RepVGG('A0', norm_eval=True)
    assert model.train() is model
    norms = [
        m for m in model.modules()
        if isinstance(m, torch.nn.modules.batchnorm._BatchNorm)
    ]
    assert norms and not any(m.training for m in norms)
    assert model.stage_1.training


def test_with_cp_gives_the_same_gradients():
    torch.manual_seed(0)
    plain = RepVGG('A0')
    checkpointed = copy.deepcopy(plain)
    for module in checkpointed.modules():
        if isinstance(module, RepVGGBlock):
            module.with_cp = True
    x = torch.rand(2, 3, 32, 32, requires_grad=True)
    grads = []
    for model in (plain, checkpointed):
        model.train()
        model.zero_grad()
        x.grad = None
        sum(o.square().mean() for o in model(x)).backward()
        grads.append([p.grad.clone()
                      for p in model.parameters()] + [x.grad.clone()])
    assert RepVGG('A0', with_cp=True).stem.with_cp
    for a, b in zip(*grads):
        assert torch.allclose(a, b, rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize('kwargs, argument', [
    (dict(arch='C9'), 'arch'),
    (dict(arch='A0', strides=(2, 2, 2)), 'strides'),
    (dict(arch='A0', dilations=(1, 1, 1)), 'dilations'),
    (dict(arch='A0', out_indices=(0, 4)), 'out_indices'),
    (dict(arch='A0', dilations=(1, 1, [1, 2], 1)), r'dilations\[2\]'),
    (dict(arch=dict(num_blocks=(1, 1, 1), width_factor=(1, 1, 1, 1))), 'arch'),
])
def test_bad_arguments_name_the_argument(kwargs, argument):
    with pytest.raises(ValueError, match=argument):
        RepVGG(**kwargs)


def test_custom_arch_dict():
    arch = dict(
        num_blocks=(1, 2, 2, 1),
        width_factor=(0.5, 0.5, 0.5, 1),
        group_layer_map={2: 2},
        se_cfg=dict(ratio=4))
    model = RepVGG(arch)
    assert model.stage_channels == (32, 64, 128, 512)
    assert model.stage_2[0].groups == 2 and model.stage_2[1].groups == 1
    torch.manual_seed(0)
    assert_deploy_equivalent(model, torch.rand(1, 3, 32, 32))


def test_pretrained_argument_becomes_init_cfg():
    model = RepVGG('A0', pretrained='some.pth')
    assert model.init_cfg == dict(type='Pretrained', checkpoint='some.pth')
    with pytest.raises(ValueError, match='pretrained'):
        RepVGG('A0', pretrained='a.pth', init_cfg=dict(type='Kaiming'))


QA = dict(block_cfg=dict(type='QARepVGGBlock'))


def test_block_cfg_picks_the_block_and_both_registries_know_it():
    assert all(
        type(m) is RepVGGBlock for m in RepVGG('A0').modules()
        if isinstance(m, RepVGGBlock))
    for registry in (MMSEG_MODELS, MMDET_MODELS):
        model = registry.build(dict(type='RepVGG', arch='A0', **QA))
        blocks = [m for m in model.modules() if isinstance(m, RepVGGBlock)]
        assert len(blocks) == 22
        assert all(type(b) is QARepVGGBlock for b in blocks)
        block = registry.build(
            dict(type='QARepVGGBlock', in_channels=8, out_channels=8))
        assert type(block) is QARepVGGBlock


class _UserBlock(torch.nn.Module):
    """A block of a user's: no RepVGGBlock, only the interface."""

    def __init__(self, in_channels, out_channels, stride=1, **kwargs):
        super().__init__()
        self.conv = torch.nn.Conv2d(in_channels, out_channels, 3, stride, 1)
        self.deploy = kwargs['deploy']

    def forward(self, x):
        return self.conv(x)

    def switch_to_deploy(self):
        self.deploy = True
        return self


def test_the_backbone_converts_any_block_that_block_cfg_names():
    # The default scope an earlier test left picks the registry.
    for registry in (MMSEG_MODELS, MMDET_MODELS):
        registry.register_module(module=_UserBlock, force=True)
    model = RepVGG('A0', block_cfg=dict(type='_UserBlock'))
    blocks = list(model.blocks())
    assert len(blocks) == 22 and not any(b.deploy for b in blocks)
    assert model.switch_to_deploy() is model
    assert model.deploy and all(b.deploy for b in blocks)


def test_qarepvgg_block_trains_as_the_paper_defines_it():
    block = QARepVGGBlock(8, 8).eval()
    randomize_batch_norms(block)
    # No BN after the 1x1 conv, none on the identity, one after the sum.
    assert not hasattr(block.branch_1x1, 'norm')
    assert block.branch_1x1.conv.bias is None
    x = torch.randn(2, 8, 5, 7)
    with torch.no_grad():
        expected = torch.relu(
            block.norm(block.branch_3x3(x) + block.branch_1x1.conv(x) + x))
        assert torch.equal(block(x), expected)
    strided = QARepVGGBlock(8, 8, stride=2)
    assert not strided.has_identity


@pytest.mark.parametrize('arch', ALL_ARCHS)
def test_qarepvgg_deploy_is_equivalent_for_every_arch(arch):
    torch.manual_seed(0)
    deployed = assert_deploy_equivalent(
        RepVGG(arch, **QA), torch.rand(1, 3, 64, 64))
    assert all(
        type(m) is QARepVGGBlock for m in deployed.modules()
        if isinstance(m, RepVGGBlock))


@pytest.mark.parametrize('setting', [d8, fast_d8])
@pytest.mark.parametrize('arch', ['A0', 'B1g2', D2SE])
def test_qarepvgg_deploy_is_equivalent_dilated(arch, setting):
    torch.manual_seed(0)
    assert_deploy_equivalent(
        RepVGG(**setting(arch), **QA), torch.rand(1, 3, 64, 128))


def test_block_cfg_settings_are_the_blocks():
    model = RepVGG(
        'A0',
        act_cfg=dict(type='ReLU'),
        block_cfg=dict(type='RepVGGBlock', act_cfg=dict(type='ReLU6')))
    assert all(isinstance(b.act, torch.nn.ReLU6) for b in model.blocks())


@pytest.mark.parametrize('key', ['stride', 'deploy', 'in_channels'])
def test_block_cfg_cannot_set_what_the_backbone_sets(key):
    with pytest.raises(ValueError, match=f"block_cfg sets \\['{key}'\\]"):
        RepVGG('A0', block_cfg=dict(type='RepVGGBlock', **{key: 1}))
