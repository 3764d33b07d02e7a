"""The exact (float64) reference computes the model's own function, in
bounded memory: PSP heads folded, convolutions summed in chunks."""
import copy

import pytest
import torch
import torch.nn.functional as F
from mmseg.models.decode_heads import PSPHead

from mmrepvgg import switch_to_deploy
from mmrepvgg.config import build_model, read_config
from mmrepvgg.deploy import FoldedPSPHead
from mmrepvgg.deploy.compare import compare_outputs, relative_error
from mmrepvgg.deploy.exact import exact_outputs
from mmrepvgg.deploy.logits import SegmentorLogits
from mmrepvgg.deploy.modules import ChunkedFloat64Convs
from tests.helpers import PSPNET_A0, randomize_batch_norms

pytestmark = pytest.mark.numerics


@pytest.mark.parametrize('stride, padding, dilation', [(1, 1, 1), (2, 0, 1),
                                                       (1, 2, 2)])
def test_chunked_convs_sum_to_the_whole_conv(stride, padding, dilation):
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(2, 70, 17, 23, generator=generator).double()
    weight = torch.randn(9, 70, 3, 3, generator=generator).double()
    bias = torch.randn(9, generator=generator).double()
    expected = F.conv2d(inputs, weight, bias, stride, padding, dilation)
    # Columns of 8 input channels at a time, of the output's pixels.
    pixels = 2 * expected.shape[2] * expected.shape[3]
    chunks = ChunkedFloat64Convs(max_bytes=8 * 9 * pixels * 8)
    assert chunks._chunk_channels(inputs, weight, stride, padding,
                                  dilation) == 8
    with chunks:
        actual = torch.nn.Conv2d(70, 9, 3, stride, padding, dilation)
        with torch.no_grad():
            actual.weight.copy_(weight)
            actual.bias.copy_(bias)
        actual = actual.double()(inputs)
    assert relative_error(actual, expected) < 1e-14
    assert relative_error(actual, expected.float().double()) > 1e-9


def test_chunks_leave_fp32_and_grouped_convs_alone():
    inputs = torch.randn(1, 8, 9, 9)
    weight, grouped_weight = torch.randn(4, 8, 3, 3), torch.randn(4, 4, 3, 3)
    with ChunkedFloat64Convs(max_bytes=1):
        fp32 = F.conv2d(inputs, weight)
        grouped = F.conv2d(inputs.double(), grouped_weight.double(), groups=2)
    assert torch.equal(fp32, F.conv2d(inputs, weight))
    assert torch.equal(
        grouped, F.conv2d(inputs.double(), grouped_weight.double(), groups=2))


def test_a_psp_segmentor_is_computed_exactly_and_left_unchanged():
    segmentor = switch_to_deploy(
        randomize_batch_norms(build_model(read_config(PSPNET_A0)), seed=2))
    model = SegmentorLogits(segmentor).eval()
    state = copy.deepcopy(model.state_dict())
    inputs = torch.randn(
        1, 3, 64, 128, generator=torch.Generator().manual_seed(1))
    (exact, ) = exact_outputs(model, [inputs])
    with torch.no_grad():
        # mmseg's own head and whole convolutions, in float64.
        plain = copy.deepcopy(model).double()(inputs.double())
        own = model(inputs)
    assert type(model.segmentor.decode_head) is not FoldedPSPHead
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert exact.dtype == torch.float64
    assert relative_error(exact, plain) < 1e-12
    # fp32 is orders of magnitude further off.
    assert relative_error(own, plain) > 1e4 * relative_error(exact, plain)


def test_relative_error_sees_every_element():
    expected = torch.ones(3 << 20)
    actual = expected.clone()
    actual[-1] = 1.5
    assert relative_error(actual, expected) == 0.5
    actual[(1 << 20) + 1] = float('nan')
    assert relative_error(actual, expected) != relative_error(actual, expected)
    with pytest.raises(ValueError, match='cannot compare'):
        relative_error(torch.ones(2, 3), torch.ones(3))


def test_compare_outputs_flags_differences():
    exact = torch.randn(
        1,
        19,
        8,
        16,
        generator=torch.Generator().manual_seed(0),
        dtype=torch.float64)
    own = exact.float()  # fp32's own error: its rounding, 6e-8

    def compare(actual):
        return compare_outputs(actual.float(), own, exact)

    close = compare(exact * (1 + 1e-7))
    assert close.exact and close.label_mismatches == 0
    far = compare(exact * (1 + 1e-3))
    assert not far.exact and far.max_rel_error > far.limit
    swapped = exact.clone()
    swapped[0, :, 0, 0] = swapped[0, :, 0, 0].flip(0)
    flipped = compare(swapped)
    assert flipped.label_mismatches == 1 and not flipped.exact


def test_a_psp_head_that_does_not_fold_is_computed_as_it_is():
    head = PSPHead(
        in_channels=8,
        channels=4,
        num_classes=3,
        norm_cfg=dict(type='GN', num_groups=2)).eval()
    inputs = [torch.randn(1, 8, 12, 16)]
    (exact, ) = exact_outputs(head, [inputs])
    with torch.no_grad():
        plain = copy.deepcopy(head).double()([inputs[0].double()])
    assert relative_error(exact, plain) == 0
