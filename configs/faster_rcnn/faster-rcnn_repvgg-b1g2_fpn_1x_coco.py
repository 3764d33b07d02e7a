# Faster R-CNN with a RepVGG-B1g2 backbone and FPN on COCO, 1x schedule.
_base_ = [
    'mmdet::faster_rcnn/faster-rcnn_r50_fpn_1x_coco.py', '../_base_/repvgg.py'
]

arch = 'B1g2'
model = dict(
    backbone=dict(
        _base_.repvgg_fpn,
        arch=arch,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=f'mmcls://repvgg_{arch}',
            prefix='backbone.')),
    # Body stage channels of B1g2.
    neck=dict(in_channels=[128, 256, 512, 2048]))
