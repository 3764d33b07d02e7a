# A PSPNet small enough for a checkpoint kept in the repository: a custom
# RepVGG with identity, grouped and squeeze-excitation blocks at output
# stride 8, and an 8-channel PSP head.
_base_ = [
    'mmseg::_base_/datasets/cityscapes.py', 'mmseg::_base_/default_runtime.py',
    'mmseg::_base_/schedules/schedule_80k.py'
]
custom_imports = dict(imports=['mmrepvgg'], allow_failed_imports=False)
norm_cfg = dict(type='BN', requires_grad=True)
data_preprocessor = dict(
    type='SegDataPreProcessor',
    mean=[123.675, 116.28, 103.53],
    std=[58.395, 57.12, 57.375],
    bgr_to_rgb=True,
    pad_val=0,
    seg_pad_val=255,
    size=(64, 128))
model = dict(
    type='EncoderDecoder',
    data_preprocessor=data_preprocessor,
    backbone=dict(
        type='RepVGG',
        arch=dict(
            num_blocks=(1, 2, 2, 1),
            width_factor=(1, 1, 1, 1),
            group_layer_map={3: 2},
            se_cfg=dict(ratio=4)),
        base_channels=8,
        strides=(2, 2, 1, 1),
        dilations=(1, 1, 2, 4),
        norm_cfg=norm_cfg),
    decode_head=dict(
        type='PSPHead',
        in_channels=64,
        in_index=3,
        channels=8,
        pool_scales=(1, 2, 3, 6),
        dropout_ratio=0.1,
        num_classes=19,
        norm_cfg=norm_cfg,
        align_corners=False,
        loss_decode=dict(
            type='CrossEntropyLoss', use_sigmoid=False, loss_weight=1.0)),
    train_cfg=dict(),
    test_cfg=dict(mode='whole'))
