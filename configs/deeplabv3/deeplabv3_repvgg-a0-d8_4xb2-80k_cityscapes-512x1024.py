# DeepLabV3 with a RepVGG-A0 backbone at output stride 8 on Cityscapes.
_base_ = 'mmseg::deeplabv3/deeplabv3_r50-d8_4xb2-80k_cityscapes-512x1024.py'
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)

arch = 'A0'
norm_cfg = dict(type='SyncBN', requires_grad=True)
model = dict(
    pretrained=None,
    backbone=dict(
        _delete_=True,
        type='RepVGG',
        arch=arch,
        out_indices=(0, 1, 2, 3),
        strides=(2, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        norm_cfg=norm_cfg,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=f'mmcls://repvgg_{arch}',
            prefix='backbone.')),
    # Body stage channels of A0: 48, 96, 192, 1280.
    decode_head=dict(in_channels=1280),
    auxiliary_head=dict(in_channels=192))
