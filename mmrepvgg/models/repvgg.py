"""RepVGG: Making VGG-style ConvNets Great Again (Ding et al., CVPR 2021).

Paper: https://arxiv.org/abs/2101.03697
Official code: https://github.com/DingXiaoH/RepVGG
"""
from collections.abc import Sequence

import torch
from mmengine.model import BaseModule
from mmseg.registry import MODELS

from .fusion import is_batch_norm
from .weight_layouts import check_weights_fit, to_mmrepvgg_layout

__all__ = ['RepVGG']

# Block arguments that the backbone gives each block.
_PLACED_BY_BACKBONE = ('in_channels', 'out_channels', 'stride', 'dilation',
                       'groups', 'deploy')
_A = (2, 4, 14, 1)
_B = (4, 6, 16, 1)
# The paper's archs, before the grouped variants of B1, B2 and B3.
_UNGROUPED_ARCHS = dict(
    A0=dict(num_blocks=_A, width_factor=(0.75, 0.75, 0.75, 2.5)),
    A1=dict(num_blocks=_A, width_factor=(1, 1, 1, 2.5)),
    A2=dict(num_blocks=_A, width_factor=(1.5, 1.5, 1.5, 2.75)),
    B0=dict(num_blocks=_B, width_factor=(1, 1, 1, 2.5)),
    B1=dict(num_blocks=_B, width_factor=(2, 2, 2, 4)),
    B2=dict(num_blocks=_B, width_factor=(2.5, 2.5, 2.5, 5)),
    B3=dict(num_blocks=_B, width_factor=(3, 3, 3, 5)),
    D2se=dict(
        num_blocks=(8, 14, 24, 1),
        width_factor=(2.5, 2.5, 2.5, 5),
        se_cfg=dict(ratio=16)))


def _with_grouped_variants(archs):
    """``archs`` with the paper's g2 and g4 variant after B1, B2 and B3
    (``B1g2``, ``B1g4``, ...): the blocks 2, 4, ..., 26 counted from the
    stem (stem = 0) built as convolutions of 2 or 4 groups."""
    settings = {}
    for name, arch in archs.items():
        settings[name] = arch
        for groups in (2, 4) if name in ('B1', 'B2', 'B3') else ():
            settings[f'{name}g{groups}'] = dict(
                arch, group_layer_map=dict.fromkeys(range(2, 27, 2), groups))
    return settings


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
        block_cfg (dict): The block: ``type`` names a registered block
            (``'RepVGGBlock'``, ``'QARepVGGBlock'`` or a user's), other keys
            are its arguments, which win over the backbone's (the block
            contract in the docs says which the backbone alone sets).
            Defaults to ``dict(type='RepVGGBlock')``.
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

    arch_settings = _with_grouped_variants(_UNGROUPED_ARCHS)

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
                 block_cfg=dict(type='RepVGGBlock'),
                 conv_cfg=None,
                 norm_cfg=dict(type='BN'),
                 act_cfg=dict(type='ReLU', inplace=True),
                 pretrained=None,
                 init_cfg=None):
        super().__init__(self._init_cfg(pretrained, init_cfg))
        self.arch = self._parse_arch(arch)
        self.out_indices = tuple(out_indices)
        self.strides = tuple(strides)
        self.dilations = tuple(dilations)
        self._check_stage_settings()
        self.frozen_stages = frozen_stages
        self.norm_eval = norm_eval
        self.deploy = deploy
        self.block_cfg = self._block_cfg(
            block_cfg,
            dict(
                se_cfg=self.arch.get('se_cfg'),
                with_cp=with_cp,
                conv_cfg=conv_cfg,
                norm_cfg=norm_cfg,
                act_cfg=act_cfg))
        channels = [
            int(base_channels * 2**i * w)
            for i, w in enumerate(self.arch['width_factor'])
        ]
        stem_channels = min(base_channels, channels[0])
        self.stem = self._block(in_channels, stem_channels, stride=2)
        self.stage_names = self._make_stages(stem_channels, channels)
        self.stage_channels = tuple(channels)
        self.out_channels = tuple(channels[i] for i in self.out_indices)

    @staticmethod
    def _init_cfg(pretrained, init_cfg):
        if pretrained is not None:
            if init_cfg is not None:
                raise ValueError(
                    'pretrained and init_cfg cannot be set at the same time')
            return dict(type='Pretrained', checkpoint=pretrained)
        if init_cfg is None:
            return [
                dict(type='Kaiming', layer=['Conv2d']),
                dict(type='Constant', val=1, layer=['_BatchNorm'])
            ]
        return init_cfg

    def _check_stage_settings(self):
        if not all(0 <= i < 4 for i in self.out_indices):
            raise ValueError(
                f'out_indices must index the 4 body stages (0-3), got '
                f'{self.out_indices}')
        for name in ('strides', 'dilations'):
            if len(getattr(self, name)) != 4:
                raise ValueError(f'{name} needs one value per body stage '
                                 f'(4), got {getattr(self, name)}')

    def _block_cfg(self, block_cfg, defaults):
        """``block_cfg`` over the backbone's settings (``defaults``)."""
        placed = set(block_cfg) & set(_PLACED_BY_BACKBONE)
        if placed:
            raise ValueError(
                f'block_cfg sets {sorted(placed)}, which the backbone sets '
                'for each block (use its strides, dilations, arch and '
                'deploy arguments)')
        return dict(defaults, **block_cfg, deploy=self.deploy)

    def _block(self, in_channels, out_channels, **kwargs):
        return MODELS.build(
            dict(
                self.block_cfg,
                in_channels=in_channels,
                out_channels=out_channels,
                **kwargs))

    def _make_stages(self, in_channels, channels):
        group_layer_map = self.arch.get('group_layer_map') or {}
        names, block_index = [], 1
        for stage, out_channels in enumerate(channels):
            blocks = []
            dilations = self._per_block(self.dilations[stage],
                                        self.arch['num_blocks'][stage], stage)
            for i, dilation in enumerate(dilations):
                blocks.append(
                    self._block(
                        in_channels,
                        out_channels,
                        stride=self.strides[stage] if i == 0 else 1,
                        dilation=dilation,
                        groups=group_layer_map.get(block_index, 1)))
                in_channels = out_channels
                block_index += 1
            names.append(f'stage_{stage + 1}')
            self.add_module(names[-1], torch.nn.Sequential(*blocks))
        return names

    def _parse_arch(self, arch):
        if isinstance(arch, str):
            if arch not in self.arch_settings:
                raise ValueError(f'arch "{arch}" is not one of '
                                 f'{sorted(self.arch_settings)}')
            return self.arch_settings[arch]
        if not isinstance(arch, dict):
            raise TypeError(f'arch must be a str or a dict, got {type(arch)}')
        for key in ('num_blocks', 'width_factor'):
            if len(arch.get(key, ())) != 4:
                raise ValueError(f'arch["{key}"] needs 4 values, '
                                 f'got {arch.get(key)}')
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
            getattr(self, name).eval().requires_grad_(False)

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

    def blocks(self):
        """The blocks that ``block_cfg`` built, from the stem on."""
        yield self.stem
        for name in self.stage_names:
            yield from getattr(self, name)

    def output_blocks(self):
        """The last block of each stage in ``out_indices``: the blocks whose
        outputs :meth:`forward` returns."""
        return [
            getattr(self, self.stage_names[i])[-1] for i in self.out_indices
        ]

    def switch_to_deploy(self):
        """Fold every block into one 3x3 conv, through the block's own
        ``switch_to_deploy()`` (any block ``block_cfg`` names has one).
        Idempotent; returns self."""
        for block in self.blocks():
            block.switch_to_deploy()
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
            check_weights_fit(self.state_dict(), provided, layout, self.deploy,
                              prefix)
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
