# PSPNet with a QARepVGG-B1g2 backbone (quantization-aware blocks) at output
# stride 8 on Cityscapes. The OpenMMLab model zoo has no QARepVGG ImageNet
# weights, so the backbone starts from its default initialization; point
# init_cfg at your own ImageNet-trained QARepVGG checkpoint if you have one.
_base_ = './pspnet_repvgg-b1g2-d8_4xb2-80k_cityscapes-512x1024.py'

model = dict(
    backbone=dict(block_cfg=dict(type='QARepVGGBlock'), init_cfg=None))
