"""RepVGG for the OpenMMLab toolboxes.

With torch, mmcv, mmengine and mmseg installed, importing it registers
:class:`RepVGG` and its blocks in mmseg's and mmdet's model registries and
lets mmengine checkpoints load under torch's safe unpickler; without them
only :mod:`mmrepvgg.runtime` and :mod:`mmrepvgg.errors` are there.
"""
import importlib
import importlib.util

from .errors import MMRepVGGError
from .version import __version__

_STACK = ('torch', 'mmcv', 'mmengine', 'mmseg')
_DEPLOY = ('switch_to_deploy', 'reparameterize', 'FoldedPSPHead',
           'fold_psp_heads')
__all__ = ['MMRepVGGError', '__version__']

if all(importlib.util.find_spec(name) for name in _STACK):
    from .checkpoint import allow_mmengine_checkpoints
    from .models import QARepVGGBlock, RepVGG, RepVGGBlock, fuse_conv_bn

    allow_mmengine_checkpoints()
    __all__ += [
        'RepVGG', 'RepVGGBlock', 'QARepVGGBlock', 'fuse_conv_bn', *_DEPLOY,
        'allow_mmengine_checkpoints'
    ]


def __getattr__(name):
    if name not in _DEPLOY or name not in __all__:
        raise AttributeError(f'module {__name__!r} has no attribute {name!r}')
    return getattr(importlib.import_module('.deploy', __name__), name)


def __dir__():
    return sorted(set(globals()) | set(__all__))
