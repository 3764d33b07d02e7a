"""Converting a trained segmentor or detector checkpoint to deploy form.

:func:`reparameterize` builds the training-form model from its config
without downloading anything, loads the checkpoint with the weights-only
loader, folds every RepVGG block into one conv, checks that the deploy
model computes what the trained one did, and only then writes the deploy
checkpoint and its config.
"""
import copy
import os.path as osp
from collections import namedtuple

import torch
from mmengine.config import Config
from mmengine.dataset import Compose, pseudo_collate
from mmengine.registry import DATASETS, MODELS, init_default_scope
from mmengine.structures import BaseDataElement
from mmengine.utils import ProgressBar
from torch import nn

from .deploy import switch_to_deploy
from .errors import CheckpointError, VerificationError, first_keys
from .fileio import (check_output_path, load_checkpoint_file, save_atomic,
                     weights_of, write_atomic)
from .models import RepVGG, RepVGGBlock

ReparameterizeResult = namedtuple('ReparameterizeResult', [
    'converted', 'params_before', 'params_after', 'max_error', 'num_inputs',
    'out', 'out_config'
])
ReparameterizeResult.__doc__ = """What :func:`reparameterize` did.

Attributes:
    converted (int): RepVGG blocks folded into one conv each.
    params_before (int): Parameters of the training-form model.
    params_after (int): Parameters of the deploy-form model.
    max_error (float): Largest ``max|deploy - train| / max|train|`` over the
        outputs of the converted modules on every verification input.
    num_inputs (int): Verification inputs: the random one and the images.
    out (str): The deploy checkpoint.
    out_config (str): The deploy config.
"""

_PRETRAINED = ('Pretrained', 'PretrainedInit')
# Small enough to be quick on a CPU, large enough that every tap of a
# dilation-4 kernel at output stride 8 reads the image.
DEFAULT_INPUT_SIZE = (64, 128)
# float32 rounding of the fused kernels, accumulated over a whole backbone,
# measures around 1e-6.
DEFAULT_TOLERANCE = 1e-5


def deploy_config_path(out):
    """The deploy config written beside checkpoint ``out``: its suffix
    replaced by ``.py``."""
    return osp.splitext(out)[0] + '.py'


def reparameterize(config,
                   checkpoint,
                   out,
                   imgs=(),
                   force=False,
                   input_size=DEFAULT_INPUT_SIZE,
                   tolerance=DEFAULT_TOLERANCE,
                   convert=switch_to_deploy,
                   progress=False):
    """Write the deploy form of a trained checkpoint, and its config.

    Every RepVGG block anywhere in the model is folded into one conv. Before
    anything is written, the converted modules' outputs are compared with
    the trained model's on a random input and on ``imgs``, in float32; a
    mismatch writes nothing. Weights keep the dtypes they have in
    ``checkpoint``; new fused tensors take the dtype of the block they
    replace.

    Args:
        config (str): The config the checkpoint was trained with (RepVGG
            in training or deploy form; SyncBN is fine).
        checkpoint (str): An mmengine checkpoint or plain state dict,
            optionally with a ``module.`` prefix and in float16.
        out (str): The deploy checkpoint to write. The deploy config goes
            to :func:`deploy_config_path` of it.
        imgs (Sequence[str]): Images to verify on too, read through the
            config's test pipeline. Defaults to ().
        force (bool): Overwrite existing outputs. Defaults to False.
        input_size (tuple[int]): ``(height, width)`` of the random input.
            Defaults to ``(64, 128)``.
        tolerance (float): Largest relative difference accepted.
            Defaults to 1e-5.
        convert (callable): Converts a model to deploy form in place.
            Defaults to :func:`mmrepvgg.switch_to_deploy`; a stand-in lets
            tests check that a wrong conversion is caught.
        progress (bool): Show a progress bar while verifying.
            Defaults to False.

    Returns:
        ReparameterizeResult: What was converted and how closely it matches.

    Raises:
        CheckpointError: A missing, unreadable or unsafe input, a config
            that does not match the checkpoint, an input already in deploy
            form, or an output path that is an input or exists.
        VerificationError: The deploy model's outputs differ.
    """
    if not osp.isfile(config):
        raise CheckpointError(f'{config}: no such file')
    out_config = deploy_config_path(out)
    if out_config == out:
        raise CheckpointError(
            f'{out}: must not end in .py, the deploy config is written to '
            'the checkpoint path with its suffix replaced by .py')
    for path in (out, out_config):
        check_output_path(path, [config, checkpoint], force)

    loaded = load_checkpoint_file(checkpoint)
    weights = weights_of(loaded, checkpoint)
    if any('.branch_reparam.' in key for key in weights):
        raise CheckpointError(
            f'{checkpoint}: already in deploy form, nothing to convert')
    cfg = _load_config(config)
    model = build_model(cfg, deploy=False)
    load_weights(model, weights, checkpoint, config)
    blocks = [
        m for m in model.modules()
        if isinstance(m, RepVGGBlock) and not m.deploy
    ]
    if not blocks:
        raise CheckpointError(f'{config}: its model holds no RepVGG blocks')

    inputs = [_random_input(model, input_size)]
    inputs += [_image_input(cfg, model, img) for img in imgs]
    bar = ProgressBar(2 * len(inputs)) if progress else None
    expected = [_converted_outputs(model, x, bar) for x in inputs]
    params_before = _num_params(model)
    convert(model)
    actual = [_converted_outputs(model, x, bar) for x in inputs]
    if bar is not None:
        bar.file.write('\n')
    max_error = max(
        relative_error(a, e) for outs, expects in zip(actual, expected)
        for a, e in zip(outs, expects))
    if not max_error <= tolerance:
        raise VerificationError(
            f'{checkpoint}: the deploy model differs from the trained one '
            f'(max relative difference {max_error:.2e} > {tolerance:.0e}); '
            'nothing written')
    state_dict = model.state_dict()
    deploy_cfg = deploy_config(cfg)
    _check_deploy_config(deploy_cfg, state_dict)

    dtypes = {key: value.dtype for key, value in weights.items()}
    state_dict = {
        key: value.to(_original_dtype(key, dtypes))
        for key, value in state_dict.items()
    }
    text = deploy_cfg.pretty_text
    save_atomic(
        dict(
            meta=_deploy_meta(loaded, deploy_cfg, text, checkpoint),
            state_dict=state_dict), out)
    write_atomic(out_config, lambda f: f.write(text.encode('utf-8')))
    return ReparameterizeResult(
        converted=len(blocks),
        params_before=params_before,
        params_after=_num_params(model),
        max_error=max_error,
        num_inputs=len(inputs),
        out=out,
        out_config=out_config)


def deploy_config(cfg):
    """A copy of ``cfg`` whose model builds in deploy form, offline.

    Every RepVGG node anywhere in it gets ``deploy=True``; pretrained
    ``init_cfg`` and ``pretrained`` entries are dropped so that nothing is
    downloaded.

    Args:
        cfg (Config): A config holding a ``model``.

    Returns:
        Config: The deploy config.
    """
    cfg = copy.deepcopy(cfg)
    # Not only the model: configs keep backbone settings in variables too.
    for value in cfg.values():
        _set_deploy(value, True)
    return cfg


def build_model(cfg, deploy=False):
    """Build ``cfg.model`` in training or deploy form without loading or
    downloading any weights; the model is in eval mode.

    Args:
        cfg (Config): A config of any OpenMMLab toolbox (its
            ``default_scope`` names it).
        deploy (bool): Build RepVGG nodes in deploy form.
            Defaults to False.

    Returns:
        nn.Module: The model.
    """
    model_cfg = copy.deepcopy(cfg.model)
    _set_deploy(model_cfg, deploy)
    if cfg.get('default_scope'):
        init_default_scope(cfg.default_scope)
    try:
        model = MODELS.build(model_cfg)
    except Exception as error:
        raise CheckpointError(
            f'{cfg.filename}: cannot build its model ({type(error).__name__}:'
            f' {_first_line(error)})') from None
    return model.eval()


def load_weights(model, weights, checkpoint='checkpoint', config='config'):
    """Load a state dict, naming the first keys that do not match.

    Args:
        model (nn.Module): The model.
        weights (dict): Its weights, as :func:`fileio.weights_of` returns.
        checkpoint (str): Name of the weights' file, for messages.
        config (str): Name of the model's config, for messages.

    Raises:
        CheckpointError: The weights do not fit the model.
    """
    try:
        result = model.load_state_dict(weights, strict=False)
    except (RuntimeError, ValueError) as error:
        # torch lists size mismatches under a header line.
        lines = str(error).splitlines()
        detail = next(
            (line.strip() for line in lines if 'size mismatch' in line),
            _first_line(error))
        raise CheckpointError(
            f'{checkpoint} does not match {config}: {detail}') from None
    problems = [
        f'{name} keys {first_keys(keys)}'
        for name, keys in (('missing', result.missing_keys),
                           ('unexpected', result.unexpected_keys)) if keys
    ]
    if problems:
        raise CheckpointError(f'{checkpoint} does not match {config}: ' +
                              '; '.join(problems))


def _check_deploy_config(deploy_cfg, state_dict):
    # The deploy config must rebuild exactly the converted model; its
    # skeleton on the meta device costs no memory and no initialization.
    with torch.device('meta'):
        skeleton = build_model(deploy_cfg, deploy=True)
    shapes = {k: v.shape for k, v in skeleton.state_dict().items()}
    differing = [
        k for k in shapes.keys() | state_dict.keys() if k not in shapes
        or k not in state_dict or shapes[k] != state_dict[k].shape
    ]
    if differing:
        raise VerificationError(
            f'{deploy_cfg.filename}: its deploy form does not rebuild the '
            f'converted model (keys {first_keys(sorted(differing))})')


def _load_config(path):
    try:
        return Config.fromfile(path)
    except Exception as error:
        raise CheckpointError(
            f'{path}: not a readable config ({_first_line(error)})') from None


def _set_deploy(node, deploy):
    # Walks the model config: RepVGG nodes get the form, and no node keeps
    # a pretrained checkpoint to fetch.
    if isinstance(node, (list, tuple)):
        for child in node:
            _set_deploy(child, deploy)
        return
    if not isinstance(node, dict):
        return
    node_type = node.get('type')
    if node_type is RepVGG or (isinstance(node_type, str)
                               and node_type.split('.')[-1] == 'RepVGG'):
        node['deploy'] = deploy
    if isinstance(node.get('pretrained'), str):
        node['pretrained'] = None
    init_cfg = node.get('init_cfg')
    if isinstance(init_cfg, dict) and init_cfg.get('type') in _PRETRAINED:
        node['init_cfg'] = None
    elif isinstance(init_cfg, (list, tuple)):
        node['init_cfg'] = [
            c for c in init_cfg
            if not (isinstance(c, dict) and c.get('type') in _PRETRAINED)
        ] or None
    for key, child in node.items():
        if key != 'init_cfg':
            _set_deploy(child, deploy)


def _random_input(model, size):
    in_channels = next(m for m in model.modules()
                       if isinstance(m, nn.Conv2d)).in_channels
    generator = torch.Generator().manual_seed(0)
    inputs = torch.randn(1, in_channels, *size, generator=generator)
    # Some tensor-mode forwards (two-stage detectors) read image shapes.
    shape = tuple(size)
    meta = dict(
        img_shape=shape,
        ori_shape=shape,
        pad_shape=shape,
        batch_input_shape=shape,
        scale_factor=(1.0, 1.0))
    return dict(inputs=inputs, data_samples=[BaseDataElement(metainfo=meta)])


def _image_input(cfg, model, img):
    if not osp.isfile(img):
        raise CheckpointError(f'{img}: no such file')
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    transforms = dataset.get('pipeline') or cfg.get('test_pipeline')
    if not transforms:
        raise CheckpointError(
            f'{cfg.filename}: has no test pipeline to read {img} with')
    pipeline = Compose(
        [t for t in transforms if 'LoadAnnotations' not in str(t['type'])])
    data = pseudo_collate([pipeline(dict(img_path=img, img_id=0))])
    return model.data_preprocessor(data, False)


class _RootsDone(Exception):
    """Ends a verification forward once every converted module has run."""


def _converted_outputs(model, data, bar):
    # Compares what conversion changed: the outputs of the outermost
    # modules that hold RepVGG blocks. The rest of the model is unchanged
    # and is not run: final outputs may pass through discrete steps
    # (proposal ranking) that amplify rounding.
    roots = []
    for name, module in model.named_modules():
        if isinstance(module, (RepVGG, RepVGGBlock)) and not any(
                name.startswith(root + '.') for root in roots):
            roots.append(name)
    outputs, finished = [], set()

    def record(name, output):
        outputs.extend(t.detach().float().clone() for t in _tensors(output))
        finished.add(name)
        if len(finished) == len(roots):
            raise _RootsDone

    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: record(name, output))
        for name in roots
    ]
    try:
        with torch.no_grad():
            model(**data, mode='tensor')
    except _RootsDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    if bar is not None:
        bar.update()
    return outputs


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def relative_error(actual, expected):
    """``max|actual - expected| / max|expected|`` (the plain difference
    where ``expected`` is all zeros)."""
    scale = expected.abs().max()
    difference = (actual - expected).abs().max()
    if scale == 0:
        return difference.item()
    return (difference / scale).item()


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _original_dtype(key, dtypes):
    # A fused tensor is new: it takes the dtype of the first tensor that the
    # checkpoint holds under the nearest enclosing module (the block's 3x3
    # conv weight).
    if key in dtypes:
        return dtypes[key]
    parts = key.split('.')
    for end in range(len(parts) - 1, -1, -1):
        prefix = '.'.join(parts[:end] + [''])
        for name, dtype in dtypes.items():
            if name.startswith(prefix) and dtype.is_floating_point:
                return dtype
    return torch.float32


def _deploy_meta(checkpoint, deploy_cfg, text, path):
    meta = dict(checkpoint.get('meta') or {})
    meta['cfg'] = text
    meta['reparameterized_from'] = osp.basename(path)
    if 'dataset_meta' not in meta:
        dataset_meta = _config_dataset_meta(deploy_cfg)
        if dataset_meta is not None:
            meta['dataset_meta'] = dataset_meta
    return meta


def _config_dataset_meta(cfg):
    # Plain state dicts carry no class names: take the test dataset's.
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    with DATASETS.switch_scope_and_registry(
            cfg.get('default_scope')) as registry:
        dataset_type = registry.get(dataset.get('type', ''))
    if not hasattr(dataset_type, '_load_metainfo'):
        return None
    return dataset_type._load_metainfo(copy.deepcopy(dataset.get('metainfo')))


def _first_line(error):
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
