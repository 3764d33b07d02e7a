"""The folded PSP head computes what mmseg's PSPHead computes."""
import copy
import os.path as osp

import pytest
import torch
from mmseg.models.decode_heads import FCNHead, PSPHead

from mmrepvgg import FoldedPSPHead, fold_psp_heads, switch_to_deploy
from mmrepvgg.config import build_model, read_config
from mmrepvgg.deploy import relative_error
from mmrepvgg.deploy.compare import (Fp32Tolerance, compare_fp32,
                                     compare_labels, compare_outputs)
from mmrepvgg.deploy.exact import fp32_and_exact
from mmrepvgg.deploy.loading import load_model
from mmrepvgg.deploy.logits import SegmentorLogits
from mmrepvgg.errors import UsageError
from tests.helpers import PSPNET_A0, REPO_ROOT, randomize_batch_norms
from tools.apps.benchmark import BenchmarkSettings

DEEPLABV3_A0 = osp.join(
    REPO_ROOT, 'configs', 'deeplabv3',
    'deeplabv3_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py')

pytestmark = pytest.mark.numerics


def psp_head(dtype=torch.float64, **kwargs):
    settings = dict(
        in_channels=24,
        channels=6,
        num_classes=5,
        norm_cfg=dict(type='BN'),
        dropout_ratio=0.1)
    settings.update(kwargs)
    head = PSPHead(**settings).to(dtype)
    # Random norms and biases: the folding must carry every term.
    randomize_batch_norms(head, seed=3, gain=(0.5, 1.5))
    with torch.no_grad():
        for module in head.modules():
            if getattr(module, 'bias', None) is not None:
                module.bias.uniform_(-0.5, 0.5)
    return head.eval()


@pytest.mark.parametrize('align_corners', [False, True])
@pytest.mark.parametrize(
    'size',
    [
        (64, 128),
        (33, 47),  # windows of different sizes, overlapping
        (5, 7),  # more bins than rows
    ])
@pytest.mark.parametrize('norm_cfg', [dict(type='BN'), None])
def test_folding_is_exact_algebra(align_corners, size, norm_cfg):
    # In float64 only the summation order differs: any mistake in the
    # pooling, the upsampling, the padding or the folded norm would show.
    head = psp_head(align_corners=align_corners, norm_cfg=norm_cfg)
    inputs = [
        torch.randn(
            2,
            24,
            *size,
            dtype=torch.float64,
            generator=torch.Generator().manual_seed(0))
    ]
    with torch.no_grad():
        expected = head(inputs)
        folded = FoldedPSPHead(head)
        assert relative_error(folded(inputs), expected) < 1e-13
        # Its matrices are cached per feature size; a second size works.
        smaller = [inputs[0][..., :size[0] - 1, :size[1] - 2]]
        assert relative_error(folded(smaller), head(smaller)) < 1e-13
    assert len(folded._matrices) == 2


def test_non_square_pooling_and_dilated_bottleneck_fold():
    head = psp_head(pool_scales=((1, 2), (3, 2), 4))
    head.bottleneck.conv.dilation = (2, 2)
    head.bottleneck.conv.padding = (2, 2)
    inputs = [torch.randn(1, 24, 20, 30, dtype=torch.float64)]
    with torch.no_grad():
        assert relative_error(FoldedPSPHead(head)(inputs),
                              head(inputs)) < 1e-13


def test_folded_segmentor_predicts_the_same_labels():
    segmentor = switch_to_deploy(
        randomize_batch_norms(build_model(read_config(PSPNET_A0)), seed=1))
    original = copy.deepcopy(segmentor)
    assert fold_psp_heads(segmentor) == 1
    head = segmentor.decode_head
    assert isinstance(head, FoldedPSPHead)
    assert isinstance(head.head, PSPHead)
    assert isinstance(segmentor.auxiliary_head, FCNHead)
    assert head.align_corners is original.decode_head.align_corners
    inputs = torch.randn(
        2, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    metas = [dict(img_shape=(64, 128), ori_shape=(64, 128))] * 2

    def logits(model, inputs):
        # The tensor mode that deployment tools trace, and mmseg's own
        # inference, which goes through the head's predict().
        return (SegmentorLogits(model)(inputs),
                model.encode_decode(inputs, metas))

    with torch.no_grad():
        # mmseg's own head in float64 (small enough for whole convs).
        exact = logits(copy.deepcopy(original).double(), inputs.double())
        original_fp32 = logits(original, inputs)
    folded, folded_exact = fp32_and_exact(segmentor, [inputs], run=logits)
    for actual, own, expected, original_own in zip(folded, folded_exact, exact,
                                                   original_fp32):
        assert actual.shape == expected.shape == (2, 19, 64, 128)
        # Exact algebra on weights folded in fp32: as close as fp32 can be.
        check = compare_fp32([own], [original_own], [expected])
        assert check.passed, check.describe()
        # Labels flip only where classes tie within what fp32 moves.
        limit = max(check.limit,
                    Fp32Tolerance().limit(relative_error(actual, own)))
        flips = compare_labels(actual.argmax(1), expected, limit)
        assert flips.untied == 0


@pytest.mark.numerics
def test_folded_deploy_matches_with_trained_like_statistics():
    # Fresh batch norms are close to identities; random statistics make
    # the fold carry the folded norms' real work.
    model = randomize_batch_norms(
        load_model(read_config(PSPNET_A0)).model, seed=1)
    logits = SegmentorLogits(switch_to_deploy(model)).eval()
    inputs = torch.randn(
        1, 3, 64, 128, generator=torch.Generator().manual_seed(0))
    folded = copy.deepcopy(logits)
    assert fold_psp_heads(folded) == 1
    assert isinstance(folded.segmentor.decode_head, FoldedPSPHead)
    own, exact = fp32_and_exact(logits, [inputs])
    with torch.no_grad():
        check = compare_outputs(folded(inputs), own[0], exact[0])
    assert check.exact, check


def test_what_cannot_be_folded_is_refused():
    with pytest.raises(ValueError, match='eval-mode'):
        FoldedPSPHead(psp_head().train())
    grouped = psp_head()
    grouped.bottleneck.conv.groups = 2
    with pytest.raises(ValueError, match='ungrouped'):
        FoldedPSPHead(grouped)
    unpadded = psp_head()
    unpadded.bottleneck.conv.padding = (0, 0)
    with pytest.raises(ValueError, match="changes the features' size"):
        FoldedPSPHead(unpadded)
    group_norm = psp_head(norm_cfg=dict(type='GN', num_groups=2))
    with pytest.raises(ValueError, match='no running statistics'):
        FoldedPSPHead(group_norm)
    biased = psp_head()
    biased.bottleneck.conv.bias = torch.nn.Parameter(torch.zeros(6))
    with pytest.raises(ValueError, match='bias before its norm'):
        FoldedPSPHead(biased)

    class CustomHead(PSPHead):
        pass

    with pytest.raises(ValueError, match='not a CustomHead'):
        FoldedPSPHead(CustomHead(in_channels=24, channels=6, num_classes=5))
    with pytest.raises(RuntimeError, match='inference only'):
        FoldedPSPHead(psp_head()).train()
    with pytest.raises(ValueError, match='FoldedPSPHead'):
        fold_psp_heads(psp_head())


def test_segmentors_without_a_psp_head_are_left_alone():
    segmentor = build_model(read_config(DEEPLABV3_A0))
    state = copy.deepcopy(segmentor.state_dict())
    assert fold_psp_heads(segmentor) == 0
    assert segmentor.state_dict().keys() == state.keys()
    # The benchmark refuses to time them folded, before any work.
    with pytest.raises(UsageError, match='is ASPPHead, not PSPHead'):
        BenchmarkSettings(DEEPLABV3_A0, fold_psp=True).check()
