# DeepLabV3+ with a RepVGG-A0 backbone at output stride 8 on Cityscapes.
_base_ = [
    'mmseg::deeplabv3plus/'
    'deeplabv3plus_r50-d8_4xb2-80k_cityscapes-512x1024.py',
    '../_base_/repvgg.py'
]

arch = 'A0'
model = dict(
    pretrained=None,
    backbone=dict(
        _base_.repvgg_d8,
        arch=arch,
        init_cfg=dict(
            type='Pretrained',
            checkpoint=f'mmcls://repvgg_{arch}',
            prefix='backbone.')),
    # Body stage channels of A0: 48, 96, 192, 1280; the decoder takes its
    # low-level features from body stage 0. Head widths as in mmseg's
    # ResNet-18 configs, for a backbone of that size.
    decode_head=dict(
        in_channels=1280, c1_in_channels=48, c1_channels=12, channels=128),
    auxiliary_head=dict(in_channels=192, channels=64))
