from mmseg.registry import MODELS as MMSEG_MODELS

from .fusion import add_centered, fuse_conv_bn, identity_kernel
from .repvgg import RepVGG, RepVGGBlock, SELayer
from .weight_layouts import to_mmrepvgg_layout

# One class, found by mmseg and mmdet configs alike under type='RepVGG'.
MMSEG_MODELS.register_module(module=RepVGG)
try:
    from mmdet.registry import MODELS as MMDET_MODELS
except ImportError:  # mmdet is an optional extra
    pass
else:
    MMDET_MODELS.register_module(module=RepVGG)

__all__ = [
    'RepVGG', 'RepVGGBlock', 'SELayer', 'add_centered', 'fuse_conv_bn',
    'identity_kernel', 'to_mmrepvgg_layout'
]
