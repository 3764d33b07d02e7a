"""Every shipped config loads, builds its model, and wires the heads to the
backbone's channels."""
import glob
import os.path as osp
import re

import pytest
import torch
from mmengine.config import Config
from mmengine.runner.checkpoint import get_mmcls_models

from mmrepvgg import QARepVGGBlock, RepVGGBlock
from tests.helpers import REPO_ROOT

CONFIGS = sorted(
    osp.relpath(path, REPO_ROOT)
    for path in glob.glob(osp.join(REPO_ROOT, 'configs', '*', '*.py'))
    if '_base_' not in path)
SEGMENTORS = [path for path in CONFIGS if 'cityscapes' in path]
DETECTORS = [path for path in CONFIGS if 'coco' in path]
# No QARepVGG ImageNet weights exist in the OpenMMLab zoo.
REPVGG = [path for path in CONFIGS if '_qarepvgg-' not in path]
QAREPVGG = [path for path in CONFIGS if '_qarepvgg-' in path]


def _arch_in_name(path):
    return re.search(r'_(?:qa)?repvgg-([a-z0-9]+)',
                     osp.basename(path)).group(1)


def _build(path, registry):
    cfg = Config.fromfile(osp.join(REPO_ROOT, path))
    # init_weights is never called, so no ImageNet weights download.
    model = registry.build(cfg.model)
    model.eval()
    return cfg, model


def test_every_config_is_covered():
    assert len(SEGMENTORS) == 12 and len(DETECTORS) == 3
    assert sorted(SEGMENTORS + DETECTORS) == CONFIGS
    assert len(QAREPVGG) == 3


@pytest.mark.parametrize('path', QAREPVGG)
def test_qarepvgg_configs_name_the_block_and_start_from_scratch(path):
    cfg = Config.fromfile(osp.join(REPO_ROOT, path))
    backbone = cfg.model.backbone
    assert backbone.block_cfg.type == 'QARepVGGBlock'
    assert backbone.arch.lower() == _arch_in_name(path)
    assert backbone.init_cfg is None
    from mmseg.registry import MODELS
    _, model = _build(path, MODELS)
    blocks = [
        m for m in model.backbone.modules() if isinstance(m, RepVGGBlock)
    ]
    assert blocks and all(type(b) is QARepVGGBlock for b in blocks)


@pytest.mark.parametrize('path', REPVGG)
def test_backbone_starts_from_the_named_zoo_weights(path):
    cfg = Config.fromfile(osp.join(REPO_ROOT, path))
    backbone = cfg.model.backbone
    assert backbone.type == 'RepVGG'
    assert backbone.arch.lower() == _arch_in_name(path)
    init_cfg = backbone.init_cfg
    assert init_cfg.type == 'Pretrained'
    assert init_cfg.prefix == 'backbone.'
    assert init_cfg.checkpoint == f'mmcls://repvgg_{backbone.arch}'
    # The name resolves in mmengine's model zoo table, without a download.
    assert f'repvgg_{backbone.arch}' in get_mmcls_models()
    assert 'mmrepvgg' in cfg.custom_imports.imports


@pytest.mark.parametrize('path', SEGMENTORS)
def test_segmentor_builds_and_predicts_19_classes(path):
    from mmseg.registry import MODELS
    cfg, model = _build(path, MODELS)
    assert cfg.model.pretrained is None
    assert cfg.model.backbone.norm_cfg.type == 'SyncBN'
    backbone = model.backbone
    for head in (model.decode_head, model.auxiliary_head):
        assert head.in_channels == backbone.out_channels[head.in_index]
    assert model.decode_head.in_index == 3
    assert model.auxiliary_head.in_index == 2
    if 'deeplabv3plus' in path:
        c1_in = model.decode_head.c1_bottleneck.conv.in_channels
        assert c1_in == backbone.stage_channels[0]

    assert backbone.strides == (2, 2, 1, 1)
    stage_2 = [block.dilation for block in backbone.stage_3]
    stage_3 = [block.dilation for block in backbone.stage_4]
    if '-fast-' in path:
        # The paper's fast variants dilate only the last 4 blocks of body
        # stage 2.
        assert stage_2 == [1] * (len(stage_2) - 4) + [2] * 4
    else:
        assert set(stage_2) == {2}
    assert set(stage_3) == {4}

    inputs = torch.rand(1, 3, 64, 128)
    with torch.no_grad():
        features = backbone(inputs)
        logits = model(inputs, mode='tensor')
    # Output stride 8; DeepLabV3+ decodes at body stage 0's stride 4.
    sizes = [tuple(f.shape[-2:]) for f in features]
    assert sizes == [(16, 32), (8, 16), (8, 16), (8, 16)]
    stride = 4 if 'deeplabv3plus' in path else 8
    assert logits.shape == (1, 19, 64 // stride, 128 // stride)


@pytest.mark.parametrize('path', DETECTORS)
def test_detector_builds_and_fpn_takes_all_stages(path):
    from mmdet.registry import MODELS
    _, model = _build(path, MODELS)
    backbone = model.backbone
    assert backbone.out_indices == (0, 1, 2, 3)
    assert model.neck.in_channels == list(backbone.stage_channels)
    with torch.no_grad():
        features = model.extract_feat(torch.rand(1, 3, 64, 64))
    assert len(features) == model.neck.num_outs == 5
    assert all(f.shape[1] == model.neck.out_channels for f in features)
