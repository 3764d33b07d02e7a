# DeepLabV3+ with a QARepVGG-A0 backbone (quantization-aware blocks) at
# output stride 8 on Cityscapes. The OpenMMLab model zoo has no QARepVGG
# ImageNet weights, so the backbone starts from its default initialization;
# point init_cfg at your own ImageNet-trained QARepVGG checkpoint if you
# have one.
_base_ = './deeplabv3plus_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py'

model = dict(
    backbone=dict(block_cfg=dict(type='QARepVGGBlock'), init_cfg=None))
