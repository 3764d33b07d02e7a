"""RepVGG for the OpenMMLab toolboxes.

Importing the package registers :class:`RepVGG` and its blocks in mmseg's
and mmdet's model registries and lets mmengine checkpoints load under
torch's safe unpickler. The road to deployment (:mod:`mmrepvgg.deploy`) is
imported on first use.
"""
import importlib

from .checkpoint import allow_mmengine_checkpoints
from .errors import MMRepVGGError
from .models import QARepVGGBlock, RepVGG, RepVGGBlock, fuse_conv_bn
from .version import __version__

allow_mmengine_checkpoints()

_DEPLOY = ('switch_to_deploy', 'reparameterize', 'FoldedPSPHead',
           'fold_psp_heads')
__all__ = [
    'RepVGG', 'RepVGGBlock', 'QARepVGGBlock', 'fuse_conv_bn', *_DEPLOY,
    'allow_mmengine_checkpoints', 'MMRepVGGError', '__version__'
]


def __getattr__(name):
    if name not in _DEPLOY:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module('.deploy', __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
