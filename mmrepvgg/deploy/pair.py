"""Writing the deploy pair of a trained segmentor or detector: the deploy
checkpoint and its config, verified (:func:`reparameterize`).
"""
import io
import os.path as osp
from dataclasses import dataclass

import torch
from mmengine.config import Config

from ..checkpoint import load_weights, read_checkpoint, weights_of
from ..config import build_model, deploy_config, read_config
from ..errors import (CheckpointError, ConfigError, MMRepVGGError, UsageError,
                      VerificationError)
from ..fileio import check_output_path, serialize, write_files
from .compare import Fp32Tolerance
from .convert import (ConversionCheck, ConversionComparison,
                      convertible_blocks, image_input, random_input,
                      switch_to_deploy)
from .images import TestPipeline, check_input_size
from .loading import DEFAULT_CHECK_SIZE, dataset_meta, load_model

__all__ = ['ReparameterizeResult', 'deploy_config_path', 'reparameterize']


@dataclass
class ReparameterizeResult:
    """What :func:`reparameterize` did.

    Attributes:
        converted (int): Blocks folded into one conv each.
        params_before (int): Parameters of the training-form model.
        params_after (int): Parameters of the deploy-form model.
        check (ConversionComparison): How closely the written pair computes
            what the trained model did, for the output nearest to its limit.
        num_inputs (int): Verification inputs: the random one and the
            images.
        out (str): The deploy checkpoint.
        out_config (str): The deploy config.
    """
    converted: int
    params_before: int
    params_after: int
    check: ConversionComparison
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
                   check_size=DEFAULT_CHECK_SIZE,
                   tolerance=Fp32Tolerance(),
                   convert=switch_to_deploy):
    """Write the deploy form of a trained checkpoint, and its config.

    Every block anywhere in the model (any module with
    ``switch_to_deploy``) is folded into one conv. The deploy model is then
    rebuilt from the config text and checkpoint bytes about to be written,
    and checked against the trained one on a random input and on ``imgs``
    (:class:`~mmrepvgg.deploy.convert.ConversionCheck`); a mismatch writes
    nothing. Tensors of the checkpoint keep their dtypes; fused tensors are
    float32 (or float64) even when the checkpoint is float16 or bfloat16:
    rounded to half precision they would move the logits by 1e-3 to 1e-2
    and can overflow.

    Args:
        config (str): The config the checkpoint was trained with (RepVGG
            in training or deploy form; SyncBN is fine).
        checkpoint (str): An mmengine checkpoint or plain state dict,
            optionally with a ``module.`` prefix and in half precision.
        out (str): The deploy checkpoint to write. The deploy config goes
            to :func:`deploy_config_path` of it.
        imgs (Sequence[str]): Images to verify on too, read through the
            config's test pipeline.
        force (bool): Overwrite existing outputs.
        check_size (tuple[int]): ``(height, width)`` of the random input.
        tolerance (Fp32Tolerance): How close the pair must be.
        convert (callable): Converts a model to deploy form in place; a
            stand-in lets tests check that a wrong conversion is caught.

    Returns:
        ReparameterizeResult: What was converted and how closely it matches.

    Raises:
        MMRepVGGError: A missing, unreadable or unsafe input, a config that
            does not match the checkpoint, an input already in deploy form,
            an output path that is an input (the config's ``_base_`` files
            and the images included), exists or cannot be written, or a
            deploy pair whose outputs differ (:class:`VerificationError`).
    """
    check_input_size(check_size)
    config_files = []
    cfg = read_config(config, config_files)
    out_config = _check_outputs(out,
                                [config, checkpoint, *imgs, *config_files],
                                force)
    loaded = _trained_model(cfg, checkpoint, config)
    model = loaded.model
    blocks = len(convertible_blocks(model))
    pipeline = TestPipeline(cfg) if imgs else None
    inputs = [random_input(model, check_size)]
    inputs += [image_input(pipeline, model, img) for img in imgs]
    check = ConversionCheck(model, inputs)
    params_before = _num_params(model)
    convert(model)
    text = deploy_config(cfg).pretty_text
    data = serialize(
        dict(
            meta=_deploy_meta(cfg, loaded.checkpoint, text),
            state_dict=_state_dict_to_write(model, loaded.checkpoint)))
    written = _rebuild(text, data, out, out_config)
    comparison = check.compare(written, tolerance)
    if not comparison.passed:
        raise VerificationError(
            f'{checkpoint}: the deploy model differs from the trained one '
            f'({comparison.describe()}); nothing written')
    write_files({out: data, out_config: text.encode('utf-8')}, force)
    return ReparameterizeResult(blocks, params_before, _num_params(written),
                                comparison, len(inputs), out, out_config)


def _check_outputs(out, inputs, force):
    out_config = deploy_config_path(out)
    if out_config == out:
        raise UsageError(
            f'{out}: must not end in .py, the deploy config is written to '
            'the checkpoint path with its suffix replaced by .py')
    for path in (out, out_config):
        check_output_path(path, inputs, force)
    return out_config


def _trained_model(cfg, checkpoint, config):
    loaded = load_model(cfg, checkpoint, config)
    if loaded.deploy_form:
        raise CheckpointError(
            f'{checkpoint}: already in deploy form, nothing to convert')
    if not convertible_blocks(loaded.model):
        raise ConfigError(f'{config}: its model holds no blocks to convert '
                          '(no module has switch_to_deploy)')
    return loaded


def _state_dict_to_write(model, checkpoint):
    dtypes = {key: value.dtype for key, value in checkpoint.weights.items()}
    state_dict = {}
    for key, value in model.state_dict().items():
        if key in dtypes:
            state_dict[key] = value.to(dtypes[key])
            continue
        # A fused tensor: at least float32, whatever the block's dtype.
        value = value.to(
            torch.promote_types(_enclosing_dtype(key, dtypes), torch.float32))
        if not value.isfinite().all():
            raise VerificationError(
                f'{checkpoint.path}: the fused {key} is not finite '
                '(batch-norm statistics out of range); nothing written')
        state_dict[key] = value
    return state_dict


def _enclosing_dtype(key, dtypes):
    # The dtype of the first tensor that the checkpoint holds under the
    # nearest module enclosing ``key`` (the block's 3x3 conv weight).
    parts = key.split('.')
    for end in range(len(parts) - 1, -1, -1):
        prefix = '.'.join(parts[:end] + [''])
        for name, dtype in dtypes.items():
            if name.startswith(prefix) and dtype.is_floating_point:
                return dtype
    return torch.float32


def _rebuild(text, data, out, out_config):
    """The deploy model as the written config text and checkpoint bytes
    give it, read back the way users will read them."""
    try:
        cfg = Config.fromstring(text, '.py')
        weights = weights_of(read_checkpoint(io.BytesIO(data), out), out)
        model = build_model(cfg, deploy=True)
        load_weights(model, weights, out, out_config)
    except MMRepVGGError as error:
        raise VerificationError(
            f'the deploy pair does not rebuild the converted model ({error}); '
            'nothing written') from error
    return model


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _deploy_meta(cfg, checkpoint, text):
    meta = dict(checkpoint.meta)
    meta['cfg'] = text
    meta['reparameterized_from'] = osp.basename(checkpoint.path)
    # Checked; mmseg's own metadata (reduce_zero_label, ...) is kept.
    dataset = dataset_meta(cfg, checkpoint)
    if dataset is not None and 'dataset_meta' not in meta:
        meta['dataset_meta'] = dict(
            classes=dataset.classes,
            palette=[list(c) for c in dataset.palette])
    return meta
