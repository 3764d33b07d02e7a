"""Fake quantization of deploy-form segmentors, for QAT.

The norms of the conv modules that keep one (mmseg's heads) are folded into
their convs, and every ``nn.Conv2d`` becomes PyTorch's eager-mode QAT conv
(``torch.ao.nn.qat.Conv2d``, fake-quantized weights) whose input is
fake-quantized too. That is the cpu int8 scheme that export writes:
symmetric signed 8-bit weights per output channel, unsigned 8-bit
activations per tensor, with zero points (which OpenVINO needs). Module
names stay those of the deploy model; the fake quantizers' ranges and
scales are buffers beside each conv.
"""
from contextlib import contextmanager

import torch
from mmcv.cnn import ConvModule
from torch import nn
from torch.ao.nn import qat as nnqat
from torch.ao.quantization import (FakeQuantize, FakeQuantizeBase,
                                   MovingAverageMinMaxObserver, QConfig)
from torch.ao.quantization.fake_quantize import \
    default_per_channel_weight_fake_quant

from ..deploy.modules import replace_modules
from ..models.fusion import fuse_conv_bn, is_batch_norm

__all__ = [
    'qat_qconfig', 'QATConv2d', 'QuantizedOutput', 'fold_conv_norms',
    'prepare_qat', 'fake_quantizers', 'activation_quantizers', 'set_observers',
    'float_mode', 'set_qparams'
]


def qat_qconfig():
    """The fake quantization trained with: per-tensor unsigned 8-bit
    activations with a zero point, per-channel symmetric signed 8-bit
    weights (each with moving-average min/max observers, as PyTorch's
    default QAT qconfig has, but over the full 8 bits)."""
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine)
    return QConfig(
        activation=activation, weight=default_per_channel_weight_fake_quant)


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
    stage (its ``out_indices``), which the heads may read. An int8 engine
    stores such a tensor once, quantized, and runs the conv before it in
    int8 (ONNX Runtime fuses a conv into its int8 kernel only when a
    QuantizeLinear takes its output, not where pooling, resizing or
    concatenation read it).

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
    quantizes are the ones trained; the norm becomes an identity.

    Returns:
        int: How many norms were folded.
    """
    folded = 0
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
        folded += 1
    return folded


def prepare_qat(model):
    """Make a deploy-form model quantization-aware, in place: norms folded
    (:func:`fold_conv_norms`), every ``nn.Conv2d`` a :class:`QATConv2d`
    with :func:`qat_qconfig`, under the same name, and the activation of
    the last block of each backbone stage in ``out_indices`` a
    :class:`QuantizedOutput`.

    Returns:
        nn.Module: ``model``.
    """
    fold_conv_norms(model)
    qconfig = qat_qconfig()

    def swap(module):
        if type(module) is not nn.Conv2d:
            return None
        module.qconfig = qconfig
        conv = QATConv2d.from_float(module)
        # Observed once, so that its ranges have one entry per channel, as
        # in the checkpoints that load into it.
        conv.weight_fake_quant(conv.weight.detach())
        return conv

    replace_modules(model, swap)
    for block in model.backbone.output_blocks():
        block.act = QuantizedOutput(block.act, qconfig.activation())
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
def float_mode(model):
    """Run ``model`` in float, in eval mode: every fake quantizer off, and
    back as it was after."""
    quantizers = [q for _, q in fake_quantizers(model)]
    states = [(bool(q.fake_quant_enabled[0]), bool(q.observer_enabled[0]))
              for q in quantizers]
    training = model.training
    for quantizer in quantizers:
        quantizer.disable_fake_quant()
        quantizer.disable_observer()
    try:
        yield model.eval()
    finally:
        model.train(training)
        for quantizer, (fake_quant, observer) in zip(quantizers, states):
            quantizer.enable_fake_quant(fake_quant)
            quantizer.enable_observer(observer)


def set_qparams(quantizer):
    """Set a fake quantizer's scale and zero point from its observer's
    range."""
    scale, zero_point = quantizer.calculate_qparams()
    quantizer.scale.resize_(scale.shape).copy_(scale)
    quantizer.zero_point.resize_(zero_point.shape).copy_(zero_point)
