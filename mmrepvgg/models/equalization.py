"""Cross-layer equalization of a deploy-form RepVGG, before int8.

Trained RepVGGs can have channels that their BN statistics made far wider
than the rest, so that one per-tensor int8 scale of a block's output leaves
the other channels a few levels (see
:func:`mmrepvgg.testing.make_quantization_hostile`). In deploy form a
block's fused conv feeds the next block's through a ReLU, and
``relu(x / s) = relu(x) / s`` for ``s > 0``: dividing output channel ``i``
of the first conv (its kernel and bias) by ``s_i`` and multiplying input
channel ``i`` of the second by ``s_i`` computes the same function. With
``s_i = sqrt(r1_i / r2_i)``, where ``r1_i`` and ``r2_i`` are the largest
magnitudes of channel ``i``'s weights in the two convs, both get the range
``sqrt(r1_i * r2_i)``; repeated along the chain of blocks until the scales
settle, as in Nagel et al., "Data-Free Quantization Through Weight
Equalization and Bias Correction" (ICCV 2019).
"""
import torch
from torch import nn

from .blocks import RepVGGBlock
from .repvgg import RepVGG

__all__ = ['equalization_pairs', 'equalize_pair', 'equalize_backbone']

# Rounds over the chain at most, and the largest change of a scale (in
# log) at which the scales count as settled.
MAX_ROUNDS = 100
SETTLED = 1e-3


def equalization_pairs(backbone):
    """``(conv, next_conv)`` of each two consecutive RepVGG (or QARepVGG)
    blocks of a deploy-form RepVGG in which the first block's output
    reaches only the second's conv, through a ReLU (no squeeze-excitation
    between, and not a stage output that the neck or head reads too).

    Raises:
        TypeError: ``backbone`` is not a RepVGG.
        ValueError: It is not in deploy form.
    """
    if not isinstance(backbone, RepVGG):
        raise TypeError('equalization needs a RepVGG backbone, not '
                        f'{type(backbone).__name__}')
    if not backbone.deploy:
        raise ValueError('equalization needs a deploy-form RepVGG')
    outputs = {
        id(getattr(backbone, backbone.stage_names[i])[-1])
        for i in backbone.out_indices
    }
    blocks = list(backbone.blocks())
    return [(first.branch_reparam, second.branch_reparam)
            for first, second in zip(blocks, blocks[1:])
            if isinstance(first, RepVGGBlock)
            and isinstance(second, RepVGGBlock) and first.se_layer is None
            and type(first.act) is nn.ReLU and id(first) not in outputs]


def _input_columns(conv):
    """The conv's kernel as ``(groups, outputs per group, inputs per group,
    taps)``: input channel ``g * inputs_per_group + c`` is ``[g, :, c]``."""
    weight = conv.weight
    return weight.view(conv.groups, weight.shape[0] // conv.groups,
                       weight.shape[1], -1)


@torch.no_grad()
def equalize_pair(first, second):
    """Equalize the ranges of the channels between two convs, in place.

    Returns:
        float: The largest change of a scale, in log.
    """
    first_range = first.weight.abs().flatten(1).amax(1).double()
    columns = _input_columns(second)
    second_range = columns.abs().amax(dim=(1, 3)).flatten().double()
    usable = (first_range > 0) & (second_range > 0)
    scale = torch.where(usable, (first_range / second_range).sqrt(),
                        torch.ones_like(first_range))
    first.weight.copy_(first.weight.double() / scale.view(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.copy_(first.bias.double() / scale)
    columns.copy_(columns.double() *
                  scale.view(second.groups, 1, columns.shape[2], 1))
    return float(scale.log().abs().max())


def equalize_backbone(model):
    """Equalize the deploy-form RepVGG backbone of ``model`` in place
    (see the module).

    Returns:
        int: The conv pairs equalized.

    Raises:
        TypeError: ``model`` has no RepVGG backbone.
        ValueError: It is not in deploy form.
    """
    pairs = equalization_pairs(getattr(model, 'backbone', None))
    for _ in range(MAX_ROUNDS):
        if max((equalize_pair(*pair) for pair in pairs), default=0) < SETTLED:
            break
    return len(pairs)
