"""RetinaNet-RepVGG-A0 trains through mmengine's Runner on a toy COCO set."""
import math
import os.path as osp

import torch
from mmengine.config import Config
from mmengine.runner import Runner

from tests.helpers import REPO_ROOT
from tests.toy_coco import make_toy_coco

RETINANET = osp.join(REPO_ROOT, 'configs', 'retinanet',
                     'retinanet_repvgg-a0_fpn_1x_coco.py')


def test_retinanet_repvgg_a0_trains(tmp_path):
    data_root = str(tmp_path / 'coco')
    ann_file = make_toy_coco(data_root, num_images=4, height=64, width=96)
    cfg = Config.fromfile(RETINANET)
    # Offline: the backbone starts from its default initialization, so its
    # norms must learn statistics instead of keeping ImageNet's.
    cfg.model.backbone.update(init_cfg=None, norm_eval=False)
    cfg.train_dataloader.update(
        batch_size=2, num_workers=0, persistent_workers=False)
    cfg.train_dataloader.dataset.update(
        data_root=data_root,
        ann_file=ann_file,
        data_prefix=dict(img='images/'),
        # The toy images are already small: no 1333x800 resize.
        pipeline=[
            dict(type='LoadImageFromFile'),
            dict(type='LoadAnnotations', with_bbox=True),
            dict(type='RandomFlip', prob=0.5),
            dict(type='PackDetInputs'),
        ])
    # One epoch of 4 images in batches of 2: two iterations.
    cfg.train_cfg = dict(type='EpochBasedTrainLoop', max_epochs=1)
    for split in ('val', 'test'):
        cfg[f'{split}_cfg'] = None
        cfg[f'{split}_dataloader'] = None
        cfg[f'{split}_evaluator'] = None
    cfg.default_hooks.checkpoint = None
    cfg.work_dir = str(tmp_path / 'work_dir')

    runner = Runner.from_cfg(cfg)
    before = {
        name: value.detach().clone()
        for name, value in runner.model.backbone.named_parameters()
        if value.requires_grad
    }
    runner.train()

    assert runner.iter == 2
    for key in ('loss', 'loss_cls', 'loss_bbox'):
        history = runner.message_hub.get_scalar(f'train/{key}')
        values = history.data[0]
        assert len(values) == 2, key
        assert all(math.isfinite(v) for v in values), (key, values)
    # The optimizer moved the backbone's weights: the losses reached it.
    after = dict(runner.model.backbone.named_parameters())
    assert before and any(not torch.equal(after[name], value)
                          for name, value in before.items())
