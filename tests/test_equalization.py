"""Cross-layer equalization keeps what a deployed RepVGG computes and
evens out the channels that its BN statistics made wide."""
import copy
import os

import pytest
import torch
from mmengine.registry import DefaultScope
from torch import nn

from mmrepvgg.deploy.export import ExportJob, ExportSettings
from mmrepvgg.errors import UsageError, VerificationError
from mmrepvgg.models import RepVGG, equalization
from mmrepvgg.models.equalization import (SETTLED, activation_ranges,
                                          equalization_pairs,
                                          equalize_backbone, equalize_pair)
from mmrepvgg.quantization.ptq import Int8Settings, export_int8
from mmrepvgg.testing import make_toy_cityscapes, write_toy_config
from tests.helpers import (PSPNET_A0, assert_computes_as, random_checkpoint,
                           randomize_batch_norms)

# Small, with grouped convs (blocks 2 and 4, counted from the stem) and
# every stage's output read by the head.
PSPNET_R18 = 'mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py'
TINY = dict(
    num_blocks=(1, 2, 2, 1),
    width_factor=(0.25, 0.25, 0.5, 0.5),
    group_layer_map={
        2: 2,
        4: 4
    })


class Model(nn.Module):
    """What equalization takes: a model with a ``backbone``."""

    def __init__(self, backbone):
        super().__init__()
        self.backbone = backbone

    def forward(self, x):
        return self.backbone(x)


def deployed(seed=0, **kwargs):
    torch.manual_seed(seed)
    backbone = RepVGG(dict(TINY, **kwargs.pop('arch', {})), **kwargs)
    randomize_batch_norms(backbone, seed=seed)
    return Model(backbone.switch_to_deploy()).eval()


def make_wide(model, block, channels, factor):
    """Make the first ``channels`` outputs of a block ``factor`` times wider
    and let the next block take them back, as
    :func:`mmrepvgg.testing.make_quantization_hostile` does in a trained
    checkpoint; returns the pair of convs."""
    first, second = equalization_pairs(model.backbone)[block]
    with torch.no_grad():
        first.weight[:channels] *= factor
        first.bias[:channels] *= factor
        columns = second.weight.view(second.groups, -1,
                                     *second.weight.shape[1:])
        per_group = second.weight.shape[1]
        for channel in range(channels):
            group, column = divmod(channel, per_group)
            columns[group, :, column] /= factor
    return first, second


def calibration(model, count=2, seed=0):
    """Runs ``model`` over a few random images."""
    generator = torch.Generator().manual_seed(seed)
    images = [
        torch.rand(1, 3, 32, 64, generator=generator) for _ in range(count)
    ]

    @torch.no_grad()
    def run():
        for image in images:
            model(image)

    return run


def channel_spread(conv):
    """Largest over smallest range of the conv's output channels."""
    ranges = conv.weight.detach().abs().flatten(1).amax(1)
    return float(ranges.max() / ranges.min())


@pytest.mark.numerics
def test_equalization_keeps_what_the_model_computes():
    model = deployed(out_indices=(3, ))
    equalized = copy.deepcopy(model)
    assert equalize_backbone(equalized, calibration(equalized)) == 6
    assert not torch.equal(equalized.backbone.stem.branch_reparam.weight,
                           model.backbone.stem.branch_reparam.weight)
    inputs = [torch.rand(1, 3, 32, 64) for _ in range(2)]
    assert_computes_as(equalized, model, inputs)


@pytest.mark.numerics
def test_equalization_undoes_channels_made_wide():
    model = deployed(out_indices=(3, ))
    wide = copy.deepcopy(model)
    # Into a conv of two groups, on channels of both.
    first, second = make_wide(wide, 1, 12, 256.0)
    assert second.groups == 2
    assert channel_spread(first) > 100 * channel_spread(
        equalization_pairs(model.backbone)[1][0])
    for each in (model, wide):
        equalize_backbone(each, calibration(each))
    # Equalization is blind to how the channels were scaled: both reach
    # the same weights, to the settling threshold's precision.
    for (conv, *_), (other, *_) in zip(
            equalization_pairs(wide.backbone),
            equalization_pairs(model.backbone)):
        ratio = conv.weight.detach() / other.weight.detach()
        assert float(ratio.log().abs().max()) < 10 * SETTLED
    inputs = [torch.rand(1, 3, 32, 64)]
    assert_computes_as(wide, deployed(out_indices=(3, )), inputs)


@pytest.mark.numerics
def test_each_channel_shares_its_range_between_activation_and_weights():
    model = deployed(out_indices=(3, ))
    make_wide(model, 1, 12, 256.0)
    pairs = equalization_pairs(model.backbone)

    def imbalance():
        """The largest ratio, over the channels between each pair, of the
        activation's range to the second conv's weights' range."""
        ranges = activation_ranges(pairs, calibration(model))
        ratios = [
            r[r > 0] / equalization._input_columns(second).abs().amax(
                dim=(1, 3)).flatten().double()[r > 0]
            for r, (_, second) in zip(ranges, pairs)
        ]
        return max(float(r.log().abs().max()) for r in ratios)

    assert imbalance() > 5  # e**5: 148x
    equalize_backbone(model, calibration(model))
    assert imbalance() < 10 * SETTLED


def test_pairs_skip_stage_outputs_and_squeeze_excitation():
    # 7 blocks: 6 consecutive pairs, less the 3 whose first block gives a
    # stage output that the head reads too.
    assert len(equalization_pairs(deployed().backbone)) == 3
    assert len(equalization_pairs(deployed(out_indices=(3, )).backbone)) == 6
    with_se = deployed(
        out_indices=(3, ), arch=dict(se_cfg=dict(ratio=4))).backbone
    assert equalization_pairs(with_se) == []


def test_equalization_needs_a_deploy_form_repvgg():
    with pytest.raises(ValueError, match='deploy-form'):
        equalization_pairs(RepVGG(TINY))
    with pytest.raises(TypeError, match='RepVGG backbone, not Conv2d'):
        equalize_backbone(Model(nn.Conv2d(3, 3, 3)), lambda: None)


def test_pairs_leave_a_users_blocks_alone(users_modules):
    import user_block  # noqa: F401  (registers UserRepBlock in mmseg's)

    # Whatever scope an earlier test in this process left.
    with DefaultScope.overwrite_default_scope('mmseg'):
        backbone = RepVGG(
            TINY, out_indices=(3, ), block_cfg=dict(type='UserRepBlock'))
    assert equalization_pairs(backbone.switch_to_deploy()) == []


def export_equalized(config, checkpoint, folder, **int8):
    """``export_int8`` of a checkpoint, equalized first unless ``int8`` says
    otherwise."""
    return export_int8(
        ExportJob.checked(config, checkpoint, str(folder / 'out.onnx'),
                          ExportSettings((64, 128))),
        Int8Settings(**dict(dict(equalize='always'), **int8)))


def test_export_refuses_to_equalize_another_backbone(tmp_path):
    checkpoint = random_checkpoint(PSPNET_R18, tmp_path / 'r18.pth')
    with pytest.raises(
            UsageError,
            match='--int8-equalize: equalization needs a RepVGG '
            'backbone, not ResNetV1c; nothing written'):
        export_equalized(PSPNET_R18, checkpoint, tmp_path)
    assert os.listdir(tmp_path) == ['r18.pth']


@pytest.mark.slow
@pytest.mark.integration
def test_auto_equalization_passes_over_another_backbone(tmp_path):
    base = tmp_path / 'r18.py'
    base.write_text(f'_base_ = {PSPNET_R18!r}\n')
    data = make_toy_cityscapes(str(tmp_path / 'data'), num_train=1)
    config = write_toy_config(str(base), data, str(tmp_path / 'toy.py'))
    checkpoint = random_checkpoint(config, tmp_path / 'r18.pth')
    # Asking for every label makes full int8 (almost surely) miss, which
    # would equalize a RepVGG; a ResNet goes on to the fp32 convs.
    try:
        result = export_equalized(
            config,
            checkpoint,
            tmp_path,
            equalize='auto',
            calib_num=1,
            eval_num=1,
            min_agreement=1,
            max_float=0)
    except VerificationError as error:
        assert 'below the 100.00% asked; nothing written' in str(error)
    else:
        assert result.info.equalized_pairs == 0


@pytest.mark.slow
@pytest.mark.numerics
def test_export_refuses_a_wrong_equalization(tmp_path, monkeypatch):
    data = make_toy_cityscapes(str(tmp_path / 'data'), num_train=2)
    config = write_toy_config(PSPNET_A0, data, str(tmp_path / 'toy.py'))
    checkpoint = random_checkpoint(config, tmp_path / 'a0.pth')

    def forgets_a_bias(first, second, activation_range):
        change = equalize_pair(first, second, activation_range)
        with torch.no_grad():
            first.bias.mul_(1.001)
        return change

    monkeypatch.setattr(equalization, 'equalize_pair', forgets_a_bias)
    with pytest.raises(
            VerificationError,
            match='the equalized model differs from the model'):
        export_equalized(config, checkpoint, tmp_path)
    assert sorted(os.listdir(tmp_path)) == ['a0.pth', 'data', 'toy.py']
