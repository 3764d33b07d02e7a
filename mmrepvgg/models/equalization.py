"""Cross-layer equalization of a deploy-form RepVGG, before int8: between
two blocks' fused convs, joined by a ReLU, output channel ``i`` of the first
divided by ``s_i > 0`` and input channel ``i`` of the second multiplied by
it, so that the activation and the weights share their range
(``docs/deployment/int8.md`` gives ``s_i``, why and how well).
"""
import functools

import torch
from torch import nn

from .blocks import RepVGGBlock
from .repvgg import RepVGG

__all__ = [
    'equalizable', 'equalization_pairs', 'activation_ranges', 'equalize_pair',
    'equalize_backbone'
]

# Rounds over the chain at most, and the largest change of a scale (in
# log) at which the scales count as settled.
MAX_ROUNDS = 100
SETTLED = 1e-3


def equalizable(model):
    """Whether ``model`` has a deploy-form RepVGG (or QARepVGG)
    ``backbone`` to equalize."""
    backbone = getattr(model, 'backbone', None)
    return isinstance(backbone, RepVGG) and backbone.deploy


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
    outputs = {id(block) for block in backbone.output_blocks()}
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
def activation_ranges(pairs, run):
    """The largest activation of each channel between the convs of each
    pair, after the ReLU, while ``run()`` runs the model.

    Args:
        pairs (list[tuple[nn.Conv2d]]): :func:`equalization_pairs`.
        run (callable): Runs the model over calibration images.

    Returns:
        list[Tensor]: A float64 range per channel, for each pair.
    """
    ranges = [None] * len(pairs)

    def observe(index, conv, inputs, output):
        seen = output.detach().clamp(min=0).amax(dim=(0, 2, 3)).double()
        ranges[index] = seen if ranges[index] is None else torch.maximum(
            ranges[index], seen)

    hooks = [
        first.register_forward_hook(functools.partial(observe, index))
        for index, (first, _) in enumerate(pairs)
    ]
    try:
        run()
    finally:
        for hook in hooks:
            hook.remove()
    return ranges


@torch.no_grad()
def equalize_pair(first, second, activation_range):
    """Equalize the ranges of the channels between two convs, in place.

    Args:
        first (nn.Conv2d): The conv whose output channels are divided.
        second (nn.Conv2d): The conv whose input channels are multiplied.
        activation_range (Tensor): The largest activation of each channel
            between them (float64); divided by the scales. A channel that
            never activated is balanced by the first conv's kernel range
            instead, as in Nagel et al.

    Returns:
        float: The largest change of a scale, in log.
    """
    columns = _input_columns(second)
    weight_range = columns.abs().amax(dim=(1, 3)).flatten().double()
    first_range = torch.where(
        activation_range > 0, activation_range,
        first.weight.detach().abs().flatten(1).amax(1).double())
    usable = (first_range > 0) & (weight_range > 0)
    scale = torch.where(usable, (first_range / weight_range).sqrt(),
                        torch.ones_like(first_range))
    first.weight.copy_(first.weight.double() / scale.view(-1, 1, 1, 1))
    if first.bias is not None:
        first.bias.copy_(first.bias.double() / scale)
    columns.copy_(columns.double() *
                  scale.view(second.groups, 1, columns.shape[2], 1))
    activation_range /= scale
    return float(scale.log().abs().max())


def equalize_backbone(model, run):
    """Equalize the deploy-form RepVGG backbone of ``model`` in place
    (see the module).

    Args:
        model (nn.Module): A model with a deploy-form RepVGG ``backbone``.
        run (callable): Runs the model over calibration images (the
            activation ranges are measured as it does).

    Returns:
        int: The conv pairs equalized.

    Raises:
        TypeError: ``model`` has no RepVGG backbone.
        ValueError: It is not in deploy form.
    """
    pairs = equalization_pairs(getattr(model, 'backbone', None))
    ranges = activation_ranges(pairs, run)
    for _ in range(MAX_ROUNDS):
        changes = [equalize_pair(*pair, r) for pair, r in zip(pairs, ranges)]
        if max(changes, default=0) < SETTLED:
            break
    return len(pairs)
