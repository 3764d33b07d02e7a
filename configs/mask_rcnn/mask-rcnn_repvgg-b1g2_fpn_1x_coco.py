# Mask R-CNN with a RepVGG-B1g2 backbone and FPN on COCO, 1x schedule.
_base_ = 'mmdet::mask_rcnn/mask-rcnn_r50_fpn_1x_coco.py'
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

arch = 'B1g2'
model = dict(
    backbone=dict(
        _delete_=True,
        type='RepVGG',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        # Frozen stem and first stage, frozen norms: as mmdet's ResNets.
        frozen_stages=1,
        norm_cfg=dict(type='BN', requires_grad=True),
        norm_eval=True,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=f'mmcls://repvgg_{arch}',
            prefix='backbone.')),
    # Body stage channels of B1g2.
    neck=dict(in_channels=[128, 256, 512, 2048]))
