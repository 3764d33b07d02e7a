"""mmpretrain's RepVGG, loaded for the compatibility tests without importing
mmpretrain.

Importing mmpretrain imports all of it, torchvision included, which does
not import beside every torch build. So only its backbone module and the
few modules that module imports are loaded from the installed files,
without running mmpretrain's package ``__init__`` files, and with a private
stand-in for ``mmpretrain.registry``, so that nothing is registered in
mmengine's registries. Afterwards they are taken out of ``sys.modules``
again: nothing else sees a partial mmpretrain.
"""
import importlib
import importlib.util
import os.path as osp
import sys
import types

from mmengine.registry import Registry

from mmrepvgg.errors import UsageError

_PACKAGES = ('mmpretrain', 'mmpretrain.models', 'mmpretrain.models.backbones',
             'mmpretrain.models.utils')


def load_mmpretrain_repvgg():
    """mmpretrain's ``RepVGG`` backbone class.

    Raises:
        UsageError: mmpretrain is not installed.
    """
    spec = importlib.util.find_spec('mmpretrain')
    if spec is None or not spec.submodule_search_locations:
        raise UsageError('mmpretrain is not installed (pip install '
                         '--no-deps mmpretrain==1.2.0 is enough)')
    root = spec.submodule_search_locations[0]
    saved = {
        name: module
        for name, module in sys.modules.items()
        if name.split('.')[0] == 'mmpretrain'
    }
    try:
        for package in _PACKAGES:
            stub = types.ModuleType(package)
            stub.__path__ = [osp.join(root, *package.split('.')[1:])]
            sys.modules[package] = stub
        registry = types.ModuleType('mmpretrain.registry')
        registry.MODELS = Registry('mmpretrain backbones for comparisons')
        sys.modules[registry.__name__] = registry
        return importlib.import_module(
            'mmpretrain.models.backbones.repvgg').RepVGG
    finally:
        for name in list(sys.modules):
            if name.split('.')[0] == 'mmpretrain':
                del sys.modules[name]
        sys.modules.update(saved)
