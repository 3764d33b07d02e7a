# RetinaNet with a RepVGG-A0 backbone and FPN on COCO, 1x schedule.
_base_ = [
    'mmdet::retinanet/retinanet_r50_fpn_1x_coco.py', '../_base_/repvgg.py'
]

arch = 'A0'
model = dict(
    backbone=dict(
        _base_.repvgg_fpn,
        arch=arch,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=f'mmcls://repvgg_{arch}',
            prefix='backbone.')),
    # Body stage channels of A0.
    neck=dict(in_channels=[48, 96, 192, 1280]))
