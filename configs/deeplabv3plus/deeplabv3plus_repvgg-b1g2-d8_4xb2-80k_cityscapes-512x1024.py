# DeepLabV3+ with a RepVGG-B1g2 backbone at output stride 8 on Cityscapes.
_base_ = './deeplabv3plus_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py'

arch = 'B1g2'
model = dict(
    backbone=dict(
        arch=arch, init_cfg=dict(checkpoint=f'mmcls://repvgg_{arch}')),
    # Body stage channels of B1g2: 128, 256, 512, 2048. Head widths as in
    # mmseg's ResNet-50 configs.
    decode_head=dict(
        in_channels=2048, c1_in_channels=128, c1_channels=48, channels=512),
    auxiliary_head=dict(in_channels=512, channels=256))
