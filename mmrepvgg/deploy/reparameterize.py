"""Converting a trained segmentor or detector checkpoint to deploy form.

:func:`reparameterize` builds the training-form model from its config
without downloading anything, loads the checkpoint with the weights-only
loader, folds every RepVGG block into one conv, checks that the deploy
model computes what the trained one did, and only then writes the deploy
checkpoint and its config.
"""
import copy
import os.path as osp
from dataclasses import dataclass

import torch
from mmengine.registry import DATASETS
from mmengine.utils import ProgressBar

from ..checkpoint import load_checkpoint_file, load_weights, weights_of
from ..config import build_model, deploy_config, read_config
from ..errors import (CheckpointError, ConfigError, UsageError,
                      VerificationError, first_keys)
from ..fileio import check_output_path, save_atomic, write_atomic
from ..models import RepVGGBlock
from .convert import switch_to_deploy
from .verify import (converted_outputs, image_input, random_input,
                     relative_error)

# Small enough to be quick on a CPU, large enough that every tap of a
# dilation-4 kernel at output stride 8 reads the image.
DEFAULT_INPUT_SIZE = (64, 128)
# float32 rounding of the fused kernels, accumulated over a whole backbone,
# measures around 1e-6.
DEFAULT_TOLERANCE = 1e-5


@dataclass
class ReparameterizeResult:
    """What :func:`reparameterize` did.

    Attributes:
        converted (int): RepVGG blocks folded into one conv each.
        params_before (int): Parameters of the training-form model.
        params_after (int): Parameters of the deploy-form model.
        max_error (float): Largest ``max|deploy - train| / max|train|``
            over the outputs of the converted modules on every verification
            input.
        num_inputs (int): Verification inputs: the random one and the
            images.
        out (str): The deploy checkpoint.
        out_config (str): The deploy config.
    """
    converted: int
    params_before: int
    params_after: int
    max_error: float
    num_inputs: int
    out: str
    out_config: str


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
        MMRepVGGError: A missing, unreadable or unsafe input, a config that
            does not match the checkpoint, an input already in deploy form,
            an output path that is an input or exists
            (:class:`CheckpointError`, :class:`ConfigError`,
            :class:`UsageError`), or a deploy model whose outputs differ
            (:class:`VerificationError`).
    """
    cfg = read_config(config)
    out_config = _check_outputs(config, checkpoint, out, force)
    loaded = load_checkpoint_file(checkpoint)
    model = _trained_model(cfg, loaded, checkpoint, config)
    blocks = sum(
        isinstance(m, RepVGGBlock) and not m.deploy for m in model.modules())
    inputs = [random_input(model, input_size)]
    inputs += [image_input(cfg, model, img) for img in imgs]
    bar = ProgressBar(2 * len(inputs)) if progress else None
    expected = _outputs(model, inputs, bar)
    params_before = _num_params(model)
    convert(model)
    max_error = _compare(
        _outputs(model, inputs, bar), expected, tolerance, checkpoint)
    deploy_cfg = deploy_config(cfg)
    state_dict = _state_dict_to_write(model, weights_of(loaded, checkpoint))
    _check_deploy_config(deploy_cfg, state_dict)
    text = deploy_cfg.pretty_text
    save_atomic(
        dict(
            meta=_deploy_meta(loaded, deploy_cfg, text, checkpoint),
            state_dict=state_dict), out)
    write_atomic(out_config, lambda f: f.write(text.encode('utf-8')))
    return ReparameterizeResult(blocks, params_before, _num_params(model),
                                max_error, len(inputs), out, out_config)


def _check_outputs(config, checkpoint, out, force):
    out_config = deploy_config_path(out)
    if out_config == out:
        raise UsageError(
            f'{out}: must not end in .py, the deploy config is written to '
            'the checkpoint path with its suffix replaced by .py')
    for path in (out, out_config):
        check_output_path(path, [config, checkpoint], force)
    return out_config


def _trained_model(cfg, loaded, checkpoint, config):
    weights = weights_of(loaded, checkpoint)
    if any('.branch_reparam.' in key for key in weights):
        raise CheckpointError(
            f'{checkpoint}: already in deploy form, nothing to convert')
    model = build_model(cfg, deploy=False)
    load_weights(model, weights, checkpoint, config)
    if not any(
            isinstance(m, RepVGGBlock) and not m.deploy
            for m in model.modules()):
        raise ConfigError(f'{config}: its model holds no RepVGG blocks')
    return model


def _outputs(model, inputs, bar):
    outputs = []
    for data in inputs:
        outputs.append(converted_outputs(model, data))
        if bar is not None:
            bar.update()
            if bar.completed == bar.task_num:
                bar.file.write('\n')
    return outputs


def _compare(actual, expected, tolerance, checkpoint):
    max_error = max(
        relative_error(a, e) for outs, expects in zip(actual, expected)
        for a, e in zip(outs, expects))
    if not max_error <= tolerance:
        raise VerificationError(
            f'{checkpoint}: the deploy model differs from the trained one '
            f'(max relative difference {max_error:.2e} > {tolerance:.0e}); '
            'nothing written')
    return max_error


def _state_dict_to_write(model, weights):
    dtypes = {key: value.dtype for key, value in weights.items()}
    return {
        key: value.to(_original_dtype(key, dtypes))
        for key, value in model.state_dict().items()
    }


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
