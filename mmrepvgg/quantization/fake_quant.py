"""Fake quantization of deploy-form segmentors, for QAT: the cpu int8
scheme that export writes (symmetric signed 8-bit weights per output
channel, unsigned 8-bit activations per tensor with zero points, which
OpenVINO needs), under the deploy model's module names; and the activation
ranges that QAT starts from, and keeps alike across the processes of a
distributed run.
"""
from collections import defaultdict
from contextlib import contextmanager
from functools import partial

import torch
from mmcv.cnn import ConvModule
from mmengine.dist import all_reduce
from torch import nn
from torch.ao.nn import qat as nnqat
from torch.ao.quantization import FakeQuantizeBase, MinMaxObserver, QConfig
from torch.ao.quantization.fake_quantize import (
    default_fake_quant, default_per_channel_weight_fake_quant)

from ..deploy.logits import run_on_images
from ..deploy.modules import replace_modules
from ..models.fusion import fuse_conv_bn, is_batch_norm

__all__ = [
    'QAT_QCONFIG', 'QATConv2d', 'QuantizedOutput', 'fold_conv_norms',
    'prepare_qat', 'fake_quantizers', 'activation_quantizers', 'set_observers',
    'calibrate_activation_ranges', 'average_activation_ranges'
]

# PyTorch's default QAT qconfig (moving-average min/max), over full 8 bits.
QAT_QCONFIG = QConfig(
    activation=default_fake_quant.with_args(reduce_range=False),
    weight=default_per_channel_weight_fake_quant)


class QATConv2d(nnqat.Conv2d):
    """PyTorch's QAT conv (fake-quantized weights) whose input is
    fake-quantized too, as an int8 engine reads it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_fake_quant = self.qconfig.activation()

    def forward(self, input):
        return super().forward(self.input_fake_quant(input))


class QuantizedOutput(nn.Module):
    """An activation whose output is fake-quantized: that of a backbone
    stage (its ``out_indices``), which the heads read (ONNX Runtime runs a
    conv in int8 only if a QuantizeLinear takes its output).

    Args:
        act (nn.Module): The activation.
        quantizer (FakeQuantizeBase): The fake quantizer of its output.
    """

    def __init__(self, act, quantizer):
        super().__init__()
        self.act = act
        self.output_fake_quant = quantizer

    def forward(self, x):
        return self.output_fake_quant(self.act(x))


def fold_conv_norms(model):
    """Fold the batch norm of every conv-norm ``ConvModule`` inside
    ``model`` into its conv, in place, so that the weights an int8 engine
    quantizes are the ones trained; the norm becomes an identity."""
    for module in model.modules():
        if not (isinstance(module, ConvModule) and module.with_norm
                and is_batch_norm(module.norm)
                and module.order.index('conv') < module.order.index('norm')):
            continue
        conv = module.conv
        kernel, bias = fuse_conv_bn(conv.weight, module.norm, conv.bias)
        conv.weight = nn.Parameter(kernel.to(conv.weight.dtype))
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        setattr(module, module.norm_name, nn.Identity())


def prepare_qat(model):
    """Make a deploy-form model quantization-aware, in place: norms folded
    (:func:`fold_conv_norms`), every ``nn.Conv2d`` a :class:`QATConv2d`
    with :data:`QAT_QCONFIG`, under the same name, and the activation of
    the last block of each backbone stage in ``out_indices`` a
    :class:`QuantizedOutput`.

    Returns:
        nn.Module: ``model``.
    """
    fold_conv_norms(model)

    def swap(module):
        if type(module) is not nn.Conv2d:
            return None
        module.qconfig = QAT_QCONFIG
        conv = QATConv2d.from_float(module)
        # Observed once, so that its ranges have one entry per channel, as
        # in the checkpoints that load into it.
        conv.weight_fake_quant(conv.weight.detach())
        return conv

    replace_modules(model, swap)
    for block in model.backbone.output_blocks():
        block.act = QuantizedOutput(block.act, QAT_QCONFIG.activation())
    return model


def fake_quantizers(model):
    """``(name, module)`` of every fake quantizer inside ``model``."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, FakeQuantizeBase)]


def activation_quantizers(model):
    """``(name, module)`` of every fake quantizer of an activation (a
    conv's input or a :class:`QuantizedOutput`) inside ``model``."""
    return [(name, module) for name, module in fake_quantizers(model)
            if not name.endswith('weight_fake_quant')]


def set_observers(model, enabled):
    """Turn the observers of every fake quantizer of ``model`` on or off."""
    for _, quantizer in fake_quantizers(model):
        quantizer.enable_observer(enabled)


@contextmanager
def _float_mode(model):
    """``model`` in float (fake quantizers off) and eval mode, within."""
    switches = [
        switch for _, q in fake_quantizers(model)
        for switch in (q.fake_quant_enabled, q.observer_enabled)
    ]
    states = [switch.clone() for switch in switches]
    training = model.training
    for switch in switches:
        switch.zero_()
    try:
        yield model.eval()
    finally:
        model.train(training)
        for switch, state in zip(switches, states):
            switch.copy_(state)


def _set_qparams(quantizer):
    """Set a fake quantizer's scale and zero point from its observer."""
    scale, zero_point = quantizer.calculate_qparams()
    quantizer.scale.resize_(scale.shape).copy_(scale)
    quantizer.zero_point.resize_(zero_point.shape).copy_(zero_point)


def calibrate_activation_ranges(model, images):
    """Start every activation quantizer that inference reaches from the
    min/max its input takes over ``images`` in the float model, as
    ``tools/export.py --int8`` calibrates, rather than from the first
    training batch, which its moving average would take whole.

    Args:
        model (nn.Module): A segmentor made quantization-aware
            (:func:`prepare_qat`).
        images (Sequence[Tensor]): Image batches, as the exported model
            takes them.
    """
    ranges = defaultdict(
        partial(
            MinMaxObserver, dtype=torch.quint8, quant_min=0, quant_max=255))
    hooks = [
        quantizer.register_forward_pre_hook(
            lambda quantizer, args: ranges[quantizer](args[0]))
        for _, quantizer in activation_quantizers(model)
    ]
    try:
        with _float_mode(model):
            run_on_images(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    for quantizer, seen in ranges.items():
        quantizer.activation_post_process.load_state_dict(seen.state_dict())
        _set_qparams(quantizer)


@torch.no_grad()
def average_activation_ranges(model):
    """Average the ranges that the activation quantizers of ``model``
    observed over the processes of a distributed run, and set their scales
    and zero points from them: DDP keeps the weights alike, not buffers."""
    for _, quantizer in activation_quantizers(model):
        if not quantizer.observer_enabled[0]:
            continue
        observer = quantizer.activation_post_process
        for value in (observer.min_val, observer.max_val):
            all_reduce(value, op='mean')
        _set_qparams(quantizer)
