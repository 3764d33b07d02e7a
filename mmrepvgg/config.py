"""Reading configs and building their models, offline.

Configs are Python: reading one runs its code, so read only configs you
trust (checkpoints, by contrast, are read as data).
"""
import copy
import importlib.util
import os
import os.path as osp
import sys

from mmengine.config import Config
from mmengine.registry import MODELS, init_default_scope

from .errors import ConfigError, first_line

__all__ = [
    'read_config', 'shipped_config', 'config_dicts', 'is_repvgg_node',
    'make_offline', 'deploy_config', 'build_model', 'short_config_name'
]

_PRETRAINED = ('Pretrained', 'PretrainedInit')
# Lists receiving the files opened while configs are read.
_READERS = []


def _record_opened_files(event, args):
    if event == 'open' and _READERS and isinstance(args[0], (str, bytes)):
        for files in _READERS:
            files.append(os.fsdecode(args[0]))


def read_config(path, files_read=None):
    """Read a config file, or a ``package::path`` config of an installed
    OpenMMLab package such as ``mmseg::pspnet/pspnet_r18-...py``.

    Args:
        path (str): The config.
        files_read (list, optional): Receives the path of every file that
            reading the config opened: the config, its ``_base_`` files at
            any depth, and whatever its code read. Tools must not write
            over any of them.

    Raises:
        ConfigError: The file or package is missing, or the config does not
            parse (its first error line is given).
    """
    if files_read is None:
        return _read_config(path)
    if not _READERS:
        # Audit hooks cannot be removed; this one only looks at _READERS.
        sys.addaudithook(_record_opened_files)
    _READERS.append(files_read)
    try:
        return _read_config(path)
    finally:
        _READERS.remove(files_read)


def _read_config(path):
    if '::' in path:
        return _read_package_config(path)
    if not osp.isfile(path):
        raise ConfigError(f'{path}: no such config file')
    try:
        return Config.fromfile(path)
    except Exception as error:  # a config may fail in any way code can
        raise ConfigError(
            f'{path}: not a readable config '
            f'({type(error).__name__}: {first_line(error)})') from error


def _read_package_config(path):
    package = path.split('::')[0]
    # mmengine would pip-install a missing package: refuse instead.
    if importlib.util.find_spec(package) is None:
        raise ConfigError(f'{path}: {package} is not installed')
    from mmengine.hub import get_config
    try:
        return get_config(path)
    except (AssertionError, FileNotFoundError, ValueError) as error:
        raise ConfigError(f'{path}: {first_line(error)}') from error


def shipped_config(name):
    """The path of a config that mmrepvgg ships, such as
    ``pspnet/pspnet_repvgg-a0-d8_4xb2-80k_cityscapes-512x1024.py``.

    Installed packages carry the configs in their ``.mim`` folder, as
    OpenMMLab packages do; editable installs link it to the repository's.

    Raises:
        ConfigError: No such config is shipped.
    """
    path = osp.join(osp.dirname(__file__), '.mim', 'configs', name)
    if not osp.isfile(path):
        raise ConfigError(f'{name}: mmrepvgg ships no such config')
    return path


def config_dicts(node):
    """Every dict inside a config node (itself included), depth first,
    through nested dicts, lists and tuples. A caller may change a dict's
    values before its children are visited."""
    stack = [node]
    while stack:
        node = stack.pop()
        if isinstance(node, dict):
            yield node
            stack.extend(reversed(list(node.values())))
        elif isinstance(node, (list, tuple)):
            stack.extend(reversed(node))


def is_repvgg_node(node):
    """Whether a config dict builds mmrepvgg's RepVGG backbone."""
    node_type = node.get('type')
    if isinstance(node_type, str):
        return node_type.split('.')[-1] == 'RepVGG'
    return getattr(node_type, '__name__', None) == 'RepVGG'


def make_offline(node, deploy=None):
    """Drop pretrained checkpoints from every node under ``node``, in
    place, so that building downloads nothing; with ``deploy`` given, set it
    on every RepVGG node."""
    for child in config_dicts(node):
        if deploy is not None and is_repvgg_node(child):
            child['deploy'] = deploy
        if isinstance(child.get('pretrained'), str):
            child['pretrained'] = None
        init_cfg = child.get('init_cfg')
        if isinstance(init_cfg, dict) and init_cfg.get('type') in _PRETRAINED:
            child['init_cfg'] = None
        elif isinstance(init_cfg, (list, tuple)):
            child['init_cfg'] = [
                c for c in init_cfg
                if not (isinstance(c, dict) and c.get('type') in _PRETRAINED)
            ] or None
    return node


def deploy_config(cfg):
    """A copy of ``cfg`` whose model builds in deploy form, offline.

    Not only the model: configs keep backbone settings in variables too,
    and every RepVGG node anywhere gets ``deploy=True``.
    """
    cfg = copy.deepcopy(cfg)
    for value in cfg.values():
        make_offline(value, deploy=True)
    return cfg


def build_model(cfg, deploy=None):
    """Build ``cfg.model`` without loading or downloading any weights; the
    model is in eval mode.

    Args:
        cfg (Config): A config of any OpenMMLab toolbox (its
            ``default_scope`` names it).
        deploy (bool, optional): Build RepVGG nodes in this form.
            Defaults to None (as the config says).

    Raises:
        ConfigError: The config has no model, or it does not build.
    """
    if not isinstance(cfg.get('model'), dict):
        raise ConfigError(f'{cfg.filename}: has no model to build')
    model_cfg = make_offline(copy.deepcopy(cfg.model), deploy)
    if cfg.get('default_scope'):
        init_default_scope(cfg.default_scope)
    try:
        model = MODELS.build(model_cfg)
    except Exception as error:  # any builder may raise anything
        raise ConfigError(
            f'{cfg.filename}: cannot build its model ({type(error).__name__}:'
            f' {first_line(error)})') from error
    return model.eval()


def short_config_name(config):
    """A config's name up to its second ``_``, which OpenMMLab's configs
    give their model, e.g. ``pspnet_r18-d8`` for
    ``mmseg::pspnet/pspnet_r18-d8_4xb2-80k_cityscapes-512x1024.py``.

    Args:
        config (str): A config's path, or ``package::path``.
    """
    name = osp.splitext(osp.basename(config.split('::')[-1]))[0]
    return '_'.join(name.split('_')[:2])
