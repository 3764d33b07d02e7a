"""RepVGG for the OpenMMLab toolboxes.

Importing the package registers :class:`RepVGG` and its blocks in mmseg's
and mmdet's model registries and lets mmengine checkpoints load under
torch's safe unpickler.
"""
from .checkpoint import allow_mmengine_checkpoints
from .deploy import (FoldedPSPHead, fold_psp_heads, reparameterize,
                     switch_to_deploy)
from .errors import MMRepVGGError
from .models import QARepVGGBlock, RepVGG, RepVGGBlock, fuse_conv_bn
from .version import __version__

allow_mmengine_checkpoints()

__all__ = [
    'RepVGG', 'RepVGGBlock', 'QARepVGGBlock', 'fuse_conv_bn',
    'switch_to_deploy', 'reparameterize', 'FoldedPSPHead', 'fold_psp_heads',
    'allow_mmengine_checkpoints', 'MMRepVGGError', '__version__'
]
