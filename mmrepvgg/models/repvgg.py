"""RepVGG: Making VGG-style ConvNets Great Again (Ding et al., CVPR 2021).

Paper: https://arxiv.org/abs/2101.03697
Official code: https://github.com/DingXiaoH/RepVGG

A block trains as the sum of a 3x3 conv+BN, a 1x1 conv+BN and (when shapes
allow) an identity BN, followed by ReLU. ``switch_to_deploy`` folds the
branches into one 3x3 conv with bias, so the deployed network is a plain
stack of 3x3 convs and ReLUs.
"""
from collections import OrderedDict
from collections.abc import Sequence

import torch
import torch.nn.functional as F
import torch.utils.checkpoint as cp
from mmcv.cnn import (ConvModule, build_activation_layer, build_conv_layer,
                      build_norm_layer)
from mmengine.model import BaseModule, Sequential
from torch import nn

from .fusion import add_centered, fuse_conv_bn, identity_kernel, is_batch_norm
from .weight_layouts import check_weights_fit, to_mmrepvgg_layout

# Blocks counted from the stem (stem = 0) that the paper's g2/g4 variants
# build as grouped convolutions.
_GROUPED_BLOCKS = range(2, 27, 2)
_G2 = dict.fromkeys(_GROUPED_BLOCKS, 2)
_G4 = dict.fromkeys(_GROUPED_BLOCKS, 4)
_A = dict(num_blocks=(2, 4, 14, 1))
_B = dict(num_blocks=(4, 6, 16, 1))


class SELayer(BaseModule):
    """Squeeze-and-excitation as in RepVGG-D2se.

    Global average pooling, a 1x1 conv that reduces the channels by
    ``ratio``, ReLU, a 1x1 conv back, and a sigmoid gate.

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
    """A re-parameterizable RepVGG block.

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
            self.branch_reparam = self._fused_conv()
        else:
            self.branch_3x3 = self._conv_norm(3, dilation, norm_cfg)
            self.branch_1x1 = self._conv_norm(1, 1, norm_cfg)
            if in_channels == out_channels and stride == 1:
                self.branch_norm = build_norm_layer(norm_cfg, in_channels)[1]
            else:
                self.branch_norm = None
        self.se_layer = (
            SELayer(out_channels, conv_cfg=conv_cfg, **se_cfg)
            if se_cfg is not None else None)
        self.act = build_activation_layer(act_cfg)

    def _conv_norm(self, kernel_size, dilation, norm_cfg):
        # ``conv`` and ``norm``, as the OpenMMLab model zoo names them.
        conv = build_conv_layer(
            self.conv_cfg,
            self.in_channels,
            self.out_channels,
            kernel_size,
            stride=self.stride,
            padding=dilation * (kernel_size // 2),
            dilation=dilation,
            groups=self.groups,
            bias=False)
        norm = build_norm_layer(norm_cfg, self.out_channels)[1]
        return Sequential(OrderedDict(conv=conv, norm=norm))

    def _fused_conv(self):
        return build_conv_layer(
            self.conv_cfg,
            self.in_channels,
            self.out_channels,
            3,
            stride=self.stride,
            padding=self.dilation,
            dilation=self.dilation,
            groups=self.groups,
            bias=True)

    def forward(self, x):

        def _inner_forward(x):
            if self.deploy:
                out = self.branch_reparam(x)
            else:
                out = self.branch_3x3(x) + self.branch_1x1(x)
                if self.branch_norm is not None:
                    out = out + self.branch_norm(x)
            if self.se_layer is not None:
                out = self.se_layer(out)
            return out

        if self.with_cp and x.requires_grad:
            out = cp.checkpoint(_inner_forward, x, use_reentrant=False)
        else:
            out = _inner_forward(x)
        return self.act(out)

    def equivalent_kernel_bias(self):
        """The 3x3 kernel and bias, in float64, that the branches sum to."""
        kernel, bias = fuse_conv_bn(self.branch_3x3.conv.weight,
                                    self.branch_3x3.norm)
        branches = [(self.branch_1x1.conv.weight, self.branch_1x1.norm)]
        if self.branch_norm is not None:
            branches.append((identity_kernel(
                self.in_channels,
                self.groups,
                kernel_size=1,
                device=kernel.device), self.branch_norm))
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
            fused = self._fused_conv()
        fused.weight = nn.Parameter(
            kernel.to(weight), requires_grad=weight.requires_grad)
        fused.bias = nn.Parameter(
            bias.to(weight), requires_grad=weight.requires_grad)
        fused.train(self.training)
        self.branch_reparam = fused
        del self.branch_3x3, self.branch_1x1, self.branch_norm
        self.deploy = True
        return self


class RepVGG(BaseModule):
    """RepVGG backbone for dense prediction.

    The stem (the paper's stage 1) halves the resolution; the four body
    stages (the paper's stages 2-5) are indexed 0-3 by ``out_indices``,
    ``strides`` and ``dilations``.

    Args:
        arch (str | dict): One of :attr:`arch_settings`, or a dict with
            ``num_blocks`` and ``width_factor`` (four values each) and
            optionally ``group_layer_map`` (block index counted from the
            stem, stem = 0, to conv groups) and ``se_cfg``.
        in_channels (int): Input image channels. Defaults to 3.
        base_channels (int): Channels of the first body stage at width 1;
            each later stage doubles them. Defaults to 64.
        out_indices (Sequence[int]): Body stages whose outputs are returned.
            Defaults to ``(0, 1, 2, 3)``.
        strides (Sequence[int]): Stride of the first block of each body
            stage. Defaults to ``(2, 2, 2, 2)``.
        dilations (Sequence[int | Sequence[int]]): Dilation of each body
            stage, or a sequence with one value per block of that stage.
            Defaults to ``(1, 1, 1, 1)``.
        frozen_stages (int): Freeze the stem (0) and the first
            ``frozen_stages`` body stages; -1 freezes nothing.
            Defaults to -1.
        norm_eval (bool): Keep batch norms in eval mode during training.
            Defaults to False.
        with_cp (bool): Gradient checkpointing in every block.
            Defaults to False.
        deploy (bool): Build the fused plain-conv form. Defaults to False.
        conv_cfg (dict, optional): Conv layer config. Defaults to None.
        norm_cfg (dict): Norm layer config. Defaults to ``dict(type='BN')``.
        act_cfg (dict): Activation config of every block. Defaults to
            ``dict(type='ReLU', inplace=True)``.
        pretrained (str, optional): Checkpoint to load; the same as
            ``init_cfg=dict(type='Pretrained', checkpoint=pretrained)``.
            Defaults to None.
        init_cfg (dict | list[dict], optional): Initialization config.
            Defaults to Kaiming for convs and ones for norms.
    """

    arch_settings = {
        'A0':
        dict(**_A, width_factor=(0.75, 0.75, 0.75, 2.5)),
        'A1':
        dict(**_A, width_factor=(1, 1, 1, 2.5)),
        'A2':
        dict(**_A, width_factor=(1.5, 1.5, 1.5, 2.75)),
        'B0':
        dict(**_B, width_factor=(1, 1, 1, 2.5)),
        'B1':
        dict(**_B, width_factor=(2, 2, 2, 4)),
        'B1g2':
        dict(**_B, width_factor=(2, 2, 2, 4), group_layer_map=_G2),
        'B1g4':
        dict(**_B, width_factor=(2, 2, 2, 4), group_layer_map=_G4),
        'B2':
        dict(**_B, width_factor=(2.5, 2.5, 2.5, 5)),
        'B2g2':
        dict(**_B, width_factor=(2.5, 2.5, 2.5, 5), group_layer_map=_G2),
        'B2g4':
        dict(**_B, width_factor=(2.5, 2.5, 2.5, 5), group_layer_map=_G4),
        'B3':
        dict(**_B, width_factor=(3, 3, 3, 5)),
        'B3g2':
        dict(**_B, width_factor=(3, 3, 3, 5), group_layer_map=_G2),
        'B3g4':
        dict(**_B, width_factor=(3, 3, 3, 5), group_layer_map=_G4),
        'D2se':
        dict(
            num_blocks=(8, 14, 24, 1),
            width_factor=(2.5, 2.5, 2.5, 5),
            se_cfg=dict(ratio=16)),
    }

    def __init__(self,
                 arch,
                 in_channels=3,
                 base_channels=64,
                 out_indices=(0, 1, 2, 3),
                 strides=(2, 2, 2, 2),
                 dilations=(1, 1, 1, 1),
                 frozen_stages=-1,
                 norm_eval=False,
                 with_cp=False,
                 deploy=False,
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 act_cfg=dict(type='ReLU', inplace=True),
                 pretrained=None,
                 init_cfg=None):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError(
                    'pretrained and init_cfg cannot be set at the same time')
            init_cfg = dict(type='Pretrained', checkpoint=pretrained)
        elif init_cfg is None:
            init_cfg = [
                dict(type='Kaiming', layer=['Conv2d']),
                dict(type='Constant', val=1, layer=['_BatchNorm'])
            ]
        super().__init__(init_cfg)

        arch = self._parse_arch(arch)
        num_blocks = arch['num_blocks']
        group_layer_map = arch.get('group_layer_map') or {}
        out_indices = tuple(out_indices)
        if not all(0 <= i < 4 for i in out_indices):
            raise ValueError(
                f'out_indices must index the 4 body stages (0-3), got '
                f'{out_indices}')
        if len(strides) != 4:
            raise ValueError(
                f'strides needs one value per body stage (4), got {strides}')
        if len(dilations) != 4:
            raise ValueError(f'dilations needs one value per body stage (4), '
                             f'got {dilations}')
        block_dilations = [
            self._per_block(d, n, stage)
            for stage, (d, n) in enumerate(zip(dilations, num_blocks))
        ]

        self.arch = arch
        self.out_indices = out_indices
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.deploy = deploy

        block_cfg = dict(
            se_cfg=arch.get('se_cfg'),
            with_cp=with_cp,
            conv_cfg=conv_cfg,
            norm_cfg=norm_cfg,
            act_cfg=act_cfg,
            deploy=deploy)
        channels = [
            int(base_channels * 2**i * w)
            for i, w in enumerate(arch['width_factor'])
        ]
        stem_channels = min(base_channels, channels[0])
        self.stem = RepVGGBlock(
            in_channels, stem_channels, stride=2, **block_cfg)

        self.stage_names = []
        block_index = 1
        in_channels = stem_channels
        for stage, out_channels in enumerate(channels):
            blocks = []
            for i, dilation in enumerate(block_dilations[stage]):
                blocks.append(
                    RepVGGBlock(
                        in_channels,
                        out_channels,
                        stride=strides[stage] if i == 0 else 1,
                        dilation=dilation,
                        groups=group_layer_map.get(block_index, 1),
                        **block_cfg))
                in_channels = out_channels
                block_index += 1
            name = f'stage_{stage + 1}'
            self.add_module(name, torch.nn.Sequential(*blocks))
            self.stage_names.append(name)
        self.stage_channels = tuple(channels)
        self.out_channels = tuple(channels[i] for i in out_indices)

    def _parse_arch(self, arch):
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'arch "{arch}" is not one of '
                                 f'{sorted(self.arch_settings)}')
            return self.arch_settings[arch]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch)}')
        missing = {'num_blocks', 'width_factor'} - set(arch)
        if missing:
            raise ValueError(f'arch dict lacks {sorted(missing)}')
        for key in ('num_blocks', 'width_factor'):
            if len(arch[key]) != 4:
                raise ValueError(f'arch["{key}"] needs 4 values, '
                                 f'got {arch[key]}')
        return arch

    @staticmethod
    def _per_block(dilation, num_blocks, stage):
        if not isinstance(dilation, Sequence):
            return [dilation] * num_blocks
        if len(dilation) != num_blocks:
            raise ValueError(
                f'dilations[{stage}] has {len(dilation)} values but body '
                f'stage {stage} has {num_blocks} blocks')
        return list(dilation)

    def forward(self, x):
        x = self.stem(x)
        outs = []
        for i, name in enumerate(self.stage_names):
            x = getattr(self, name)(x)
            if i in self.out_indices:
                outs.append(x)
        return tuple(outs)

    def _freeze_stages(self):
        for name in (['stem'] + self.stage_names)[:self.frozen_stages + 1]:
            module = getattr(self, name)
            module.eval()
            for param in module.parameters():
                param.requires_grad = False

    def train(self, mode=True):
        """Set the mode, keeping frozen stages and, with ``norm_eval``,
        batch norms in eval mode. Returns self."""
        super().train(mode)
        self._freeze_stages()
        if mode and self.norm_eval:
            for module in self.modules():
                if is_batch_norm(module):
                    module.eval()
        return self

    def switch_to_deploy(self):
        """Fold every block into one 3x3 conv. Idempotent; returns self."""
        for module in self.modules():
            if isinstance(module, RepVGGBlock):
                module.switch_to_deploy()
        self.deploy = True
        return self

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Weights of every published layout load as they are. Whatever a
        # state dict holds for the backbone must fit it exactly: mmengine's
        # Pretrained init would only log what is missing.
        layout = to_mmrepvgg_layout(state_dict, prefix)
        provided = {
            k[len(prefix):]: v
            for k, v in state_dict.items() if k.startswith(prefix)
        }
        if provided:
            expected = {k: v.shape for k, v in self.state_dict().items()}
            check_weights_fit(expected, provided, layout, self.deploy, prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
