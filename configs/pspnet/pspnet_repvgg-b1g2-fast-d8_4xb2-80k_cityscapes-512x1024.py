# The paper's "fast" PSPNet-B1g2: still output stride 8, but dilated convs
# (slower than plain ones) only in the last 5 blocks: the last 4 of the 16
# in body stage 2 (the paper's stage 4) at rate 2, body stage 3 at rate 4.
_base_ = './pspnet_repvgg-b1g2-d8_4xb2-80k_cityscapes-512x1024.py'

model = dict(backbone=dict(dilations=(1, 1, (1, ) * 12 + (2, ) * 4, 4)))
