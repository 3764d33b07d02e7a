# PSPNet with a RepVGG-B2 backbone at output stride 8 on Cityscapes.
_base_ = './pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py'

arch = 'B2'
model = dict(
    backbone=dict(
        arch=arch, init_cfg=dict(checkpoint=f'mmcls://repvgg_{arch}')),
    # Body stage channels of B2: 160, 320, 640, 2560. Head widths as in mmseg's
    # ResNet-50 configs.
    decode_head=dict(in_channels=2560, channels=512),
    auxiliary_head=dict(in_channels=640, channels=256))
