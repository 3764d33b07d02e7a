from mmseg.registry import MODELS as MMSEG_MODELS

from .blocks import QARepVGGBlock, RepVGGBlock, SELayer
from .fusion import add_centered, fuse_conv_bn, identity_kernel
from .repvgg import RepVGG
from .weight_layouts import to_mmrepvgg_layout

_REGISTRIES = [MMSEG_MODELS]
try:
    from mmdet.registry import MODELS as MMDET_MODELS
    _REGISTRIES.append(MMDET_MODELS)
except ImportError:  # mmdet is an optional extra
    pass
# Found by mmseg and mmdet configs alike under their type names.
for registry in _REGISTRIES:
    for module in (RepVGG, RepVGGBlock, QARepVGGBlock):
        registry.register_module(module=module)

__all__ = [
    'RepVGG', 'RepVGGBlock', 'QARepVGGBlock', 'SELayer', 'add_centered',
    'fuse_conv_bn', 'identity_kernel', 'to_mmrepvgg_layout'
]
