from mmseg.registry import MODELS as MMSEG_MODELS

from .blocks import QARepVGGBlock, RepVGGBlock, SELayer
from .fusion import add_centered, fuse_conv_bn, identity_kernel
from .repvgg import RepVGG
from .weight_layouts import to_mmrepvgg_layout

# Found by mmseg and mmdet configs alike under their type names.
_REGISTERED = (RepVGG, RepVGGBlock, QARepVGGBlock)
for module in _REGISTERED:
    MMSEG_MODELS.register_module(module=module)
try:
    from mmdet.registry import MODELS as MMDET_MODELS
except ImportError:  # mmdet is an optional extra
    pass
else:
    for module in _REGISTERED:
        MMDET_MODELS.register_module(module=module)

__all__ = [
    'RepVGG', 'RepVGGBlock', 'QARepVGGBlock', 'SELayer', 'add_centered',
    'fuse_conv_bn', 'identity_kernel', 'to_mmrepvgg_layout'
]
