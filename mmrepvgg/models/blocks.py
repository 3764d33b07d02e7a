"""Re-parameterizable blocks: RepVGG's (Ding et al., CVPR 2021,
https://arxiv.org/abs/2101.03697) and the quantization-aware QARepVGG's
(Chu et al., "Make RepVGG Greater Again: A Quantization-aware Approach",
AAAI 2024, https://arxiv.org/abs/2212.01593). Either folds into one 3x3
conv with bias; squeeze-excitation (RepVGG-D2se) and the activation follow
it.
"""
from collections import OrderedDict

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import (ConvModule, build_activation_layer, build_conv_layer,
                      build_norm_layer)
from mmengine.model import BaseModule, Sequential
from torch import nn

from .fusion import add_centered, fuse_conv_bn, identity_kernel

__all__ = ['SELayer', 'RepVGGBlock', 'QARepVGGBlock']


class SELayer(BaseModule):
    """Squeeze-and-excitation as in RepVGG-D2se.

    Args:
        channels (int): Input and output channels.
        ratio (int): Channel reduction ratio. Defaults to 16.
        conv_cfg (dict, optional): Config of the 1x1 convs. Defaults to None.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    def __init__(self, channels, ratio=16, conv_cfg=None, init_cfg=None):
        super().__init__(init_cfg)
        hidden = channels // ratio
        self.conv1 = ConvModule(
            channels, hidden, 1, conv_cfg=conv_cfg, act_cfg=dict(type='ReLU'))
        self.conv2 = ConvModule(
            hidden,
            channels,
            1,
            conv_cfg=conv_cfg,
            act_cfg=dict(type='Sigmoid'))

    def forward(self, x):
        return x * self.conv2(self.conv1(F.adaptive_avg_pool2d(x, 1)))


class RepVGGBlock(BaseModule):
    """A re-parameterizable RepVGG block: it trains as the sum of a 3x3
    conv+BN, a 1x1 conv+BN and (when shapes allow) an identity BN.

    Args:
        in_channels (int): Input channels.
        out_channels (int): Output channels.
        stride (int): Stride of the 3x3 and 1x1 convs. Defaults to 1.
        dilation (int): Dilation of the 3x3 conv. Defaults to 1.
        groups (int): Groups of the 3x3 and 1x1 convs. Defaults to 1.
        se_cfg (dict, optional): Kwargs of :class:`SELayer` (e.g.
            ``dict(ratio=16)``), applied before the activation. Defaults to
            None (no squeeze-excitation).
        with_cp (bool): Use gradient checkpointing. Defaults to False.
        conv_cfg (dict, optional): Conv layer config. Defaults to None.
        norm_cfg (dict): Norm layer config; any batch norm. Defaults to
            ``dict(type='BN')``.
        act_cfg (dict): Activation config. Defaults to
            ``dict(type='ReLU', inplace=True)`` (it acts on a fresh sum or
            conv output, so in place is safe and saves a copy).
        deploy (bool): Build the fused single-conv form. Defaults to False.
        init_cfg (dict, optional): Initialization config. Defaults to None.
    """

    # The training-form modules that switch_to_deploy folds and deletes.
    training_branches = ('branch_3x3', 'branch_1x1', 'branch_norm')

    def __init__(self,
                 in_channels,
                 out_channels,
                 stride=1,
                 dilation=1,
                 groups=1,
                 se_cfg=None,
                 with_cp=False,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 act_cfg=dict(type='ReLU', inplace=True),
                 deploy=False,
                 init_cfg=None):
        super().__init__(init_cfg)
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.stride = stride
        self.dilation = dilation
        self.groups = groups
        self.with_cp = with_cp
        self.conv_cfg = conv_cfg
        self.deploy = deploy
        if deploy:
            self.branch_reparam = self._conv_layer(3, bias=True)
        else:
            self._build_branches(norm_cfg)
        self.se_layer = (
            SELayer(out_channels, conv_cfg=conv_cfg, **se_cfg)
            if se_cfg is not None else None)
        self.act = build_activation_layer(act_cfg)

    @property
    def has_identity(self):
        """Whether the input can be added to the output (same shape)."""
        return self.in_channels == self.out_channels and self.stride == 1

    def _build_branches(self, norm_cfg):
        self.branch_3x3 = self._conv(3, norm_cfg)
        self.branch_1x1 = self._conv(1, norm_cfg)
        self.branch_norm = (
            build_norm_layer(norm_cfg, self.in_channels)[1]
            if self.has_identity else None)

    def _conv_layer(self, kernel_size, bias):
        # Same-size padding: the branches' outputs add up tap for tap.
        dilation = self.dilation if kernel_size == 3 else 1
        return build_conv_layer(
            self.conv_cfg,
            self.in_channels,
            self.out_channels,
            kernel_size,
            stride=self.stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=self.groups,
            bias=bias)

    def _conv(self, kernel_size, norm_cfg=None):
        # ``conv`` and ``norm``, as the OpenMMLab model zoo names them.
        layers = OrderedDict(conv=self._conv_layer(kernel_size, bias=False))
        if norm_cfg is not None:
            layers['norm'] = build_norm_layer(norm_cfg, self.out_channels)[1]
        return Sequential(layers)

    def _sum_branches(self, x):
        out = self.branch_3x3(x) + self.branch_1x1(x)
        if self.branch_norm is not None:
            out = out + self.branch_norm(x)
        return out

    def _before_activation(self, x):
        out = self.branch_reparam(x) if self.deploy else self._sum_branches(x)
        return out if self.se_layer is None else self.se_layer(out)

    def forward(self, x):
        if self.with_cp and x.requires_grad:
            return self.act(
                cp.checkpoint(self._before_activation, x, use_reentrant=False))
        return self.act(self._before_activation(x))

    def _identity_kernel(self, device):
        return identity_kernel(
            self.in_channels, self.groups, kernel_size=1, device=device)

    def equivalent_kernel_bias(self):
        """The 3x3 kernel and bias, in float64, that the branches sum to."""
        kernel, bias = fuse_conv_bn(self.branch_3x3.conv.weight,
                                    self.branch_3x3.norm)
        branches = [(self.branch_1x1.conv.weight, self.branch_1x1.norm)]
        if self.branch_norm is not None:
            branches.append(
                (self._identity_kernel(kernel.device), self.branch_norm))
        for branch_kernel, norm in branches:
            branch_kernel, branch_bias = fuse_conv_bn(branch_kernel, norm)
            add_centered(kernel, branch_kernel)
            bias += branch_bias
        return kernel, bias

    def switch_to_deploy(self):
        """Fold the branches into one 3x3 conv. Idempotent; returns self."""
        if self.deploy:
            return self
        kernel, bias = self.equivalent_kernel_bias()
        weight = self.branch_3x3.conv.weight
        # Built on the meta device: its parameters are replaced at once, so
        # a random initialization would be wasted work.
        with torch.device('meta'):
            fused = self._conv_layer(3, bias=True)
        fused.weight = nn.Parameter(
            kernel.to(weight), requires_grad=weight.requires_grad)
        fused.bias = nn.Parameter(
            bias.to(weight), requires_grad=weight.requires_grad)
        fused.train(self.training)
        self.branch_reparam = fused
        for name in self.training_branches:
            delattr(self, name)
        self.deploy = True
        return self


class QARepVGGBlock(RepVGGBlock):
    """A quantization-aware re-parameterizable block (QARepVGG).

    It trains as a 3x3 conv+BN, a 1x1 conv without BN or bias and (when
    shapes allow) the identity without BN, summed, then one BN (``norm``),
    as the paper's reference code does, which keeps the fused weights and
    activations quantizable. Its arguments are :class:`RepVGGBlock`'s.
    """

    training_branches = ('branch_3x3', 'branch_1x1', 'norm')

    def _build_branches(self, norm_cfg):
        self.branch_3x3 = self._conv(3, norm_cfg)
        self.branch_1x1 = self._conv(1)
        self.norm = build_norm_layer(norm_cfg, self.out_channels)[1]

    def _sum_branches(self, x):
        out = self.branch_3x3(x) + self.branch_1x1(x)
        if self.has_identity:
            out = out + x
        return self.norm(out)

    def equivalent_kernel_bias(self):
        """The 3x3 kernel and bias, in float64, of the normalized sum."""
        kernel, bias = fuse_conv_bn(self.branch_3x3.conv.weight,
                                    self.branch_3x3.norm)
        add_centered(kernel, self.branch_1x1.conv.weight.double())
        if self.has_identity:
            add_centered(kernel, self._identity_kernel(kernel.device))
        return fuse_conv_bn(kernel, self.norm, bias)
