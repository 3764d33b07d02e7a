"""Converting a trained segmentor or detector checkpoint to deploy form.

:func:`reparameterize` builds the training-form model from its config
without downloading anything, loads the checkpoint with the weights-only
loader, folds every RepVGG block into one conv, rebuilds the deploy model
from exactly the bytes it is about to write, checks that it computes what
the trained one did, and only then writes the deploy checkpoint and its
config, together.
"""
import copy
import io
import os.path as osp
from dataclasses import dataclass

import torch
from mmengine.config import Config
from mmengine.registry import DATASETS
from mmengine.utils import ProgressBar

from ..checkpoint import (checkpoint_meta, load_checkpoint_file, load_weights,
                          read_checkpoint, weights_of)
from ..config import build_model, deploy_config, read_config
from ..errors import (CheckpointError, ConfigError, MMRepVGGError, UsageError,
                      VerificationError, first_line)
from ..fileio import check_output_path, serialize, write_files
from ..models import RepVGGBlock
from ..models.weight_layouts import is_deploy_form
from .convert import switch_to_deploy
from .verify import (check_input_size, converted_outputs, image_input,
                     random_input, relative_error)

# Small enough to be quick on a CPU, large enough that every tap of a
# dilation-4 kernel at output stride 8 reads the image.
DEFAULT_INPUT_SIZE = (64, 128)
# The deploy model's float32 arithmetic, against the trained model's exact
# (float64) outputs, measures 1e-7 to 7e-6 over a whole backbone.
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

    Every RepVGG block anywhere in the model is folded into one conv. The
    deploy model is then rebuilt from the config text and checkpoint bytes
    about to be written, and its converted modules' outputs, in float32,
    are compared with the trained model's exact (float64) ones on a random
    input and on ``imgs``; a mismatch writes nothing. Tensors of the
    checkpoint keep their dtypes;
    fused tensors are float32 (or float64) even when the checkpoint is
    float16 or bfloat16: rounded to half precision they would move the
    logits by 1e-3 to 1e-2 and can overflow.

    Args:
        config (str): The config the checkpoint was trained with (RepVGG
            in training or deploy form; SyncBN is fine).
        checkpoint (str): An mmengine checkpoint or plain state dict,
            optionally with a ``module.`` prefix and in half precision.
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
            an output path that is an input (the config's ``_base_`` files
            included), exists or cannot be written (:class:`CheckpointError`,
            :class:`ConfigError`, :class:`UsageError`), or a deploy pair
            whose outputs differ (:class:`VerificationError`).
    """
    check_input_size(input_size)
    if not tolerance > 0:
        raise UsageError(f'tolerance must be positive, got {tolerance}')
    config_files = []
    cfg = read_config(config, config_files)
    out_config = _check_outputs(out, [config, checkpoint, *config_files],
                                force)
    loaded = load_checkpoint_file(checkpoint)
    meta = checkpoint_meta(loaded, checkpoint)
    weights = weights_of(loaded, checkpoint)
    model = _trained_model(cfg, weights, checkpoint, config)
    blocks = sum(isinstance(m, RepVGGBlock) for m in model.modules())
    inputs = [random_input(model, input_size)]
    inputs += [image_input(cfg, model, img) for img in imgs]
    bar = ProgressBar(2 * len(inputs)) if progress else None
    expected = _exact_outputs(model, inputs, bar)
    params_before = _num_params(model)
    convert(model)
    text = deploy_config(cfg).pretty_text
    data = serialize(
        dict(
            meta=_deploy_meta(meta, cfg, text, checkpoint),
            state_dict=_state_dict_to_write(model, weights, checkpoint)))
    written = _rebuild(text, data, out, out_config)
    max_error = _compare(
        _outputs(written, inputs, bar), expected, tolerance, checkpoint)
    write_files({out: data, out_config: text.encode('utf-8')}, force)
    return ReparameterizeResult(blocks, params_before, _num_params(written),
                                max_error, len(inputs), out, out_config)


def deploy_model(cfg,
                 checkpoint,
                 config='config',
                 input_size=DEFAULT_INPUT_SIZE,
                 tolerance=DEFAULT_TOLERANCE):
    """The deploy-form model of a checkpoint in either form, in eval mode.

    A deploy checkpoint (as :func:`reparameterize` writes them) loads into
    the deploy form of ``cfg``'s model. A trained one is converted and
    checked as :func:`reparameterize` checks it, on a random input. A model
    without RepVGG blocks is loaded as it is.

    Args:
        cfg (Config): The model's config (training or deploy form).
        checkpoint (str): A trained or a deploy checkpoint.
        config (str): Name of the config, for messages.
        input_size (tuple[int]): ``(height, width)`` of the random input.
        tolerance (float): Largest relative difference accepted.

    Returns:
        tuple[nn.Module, dict]: The model and the loaded checkpoint.
    """
    loaded = load_checkpoint_file(checkpoint)
    weights = weights_of(loaded, checkpoint)
    deploy = is_deploy_form(weights)
    model = build_model(cfg, deploy=deploy)
    load_weights(model, weights, checkpoint, config)
    if deploy or not _convertible(model):
        return model, loaded
    inputs = [random_input(model, input_size)]
    expected = _exact_outputs(model, inputs, None)
    switch_to_deploy(model)
    _compare(_outputs(model, inputs, None), expected, tolerance, checkpoint)
    return model, loaded


def _check_outputs(out, inputs, force):
    out_config = deploy_config_path(out)
    if out_config == out:
        raise UsageError(
            f'{out}: must not end in .py, the deploy config is written to '
            'the checkpoint path with its suffix replaced by .py')
    for path in (out, out_config):
        check_output_path(path, inputs, force)
    return out_config


def _trained_model(cfg, weights, checkpoint, config):
    if is_deploy_form(weights):
        raise CheckpointError(
            f'{checkpoint}: already in deploy form, nothing to convert')
    model = build_model(cfg, deploy=False)
    load_weights(model, weights, checkpoint, config)
    if not _convertible(model):
        raise ConfigError(f'{config}: its model holds no RepVGG blocks')
    return model


def _convertible(model):
    return any(
        isinstance(m, RepVGGBlock) and not m.deploy for m in model.modules())


def _exact_outputs(model, inputs, bar):
    # The trained model in float64 is the reference: in float32, its own
    # arithmetic is off by up to 1e-5 in deep nets, as much as the deploy
    # model's, and comparing the two would count both.
    exact = copy.deepcopy(model).double()
    return _outputs(
        exact, [dict(data, inputs=data['inputs'].double()) for data in inputs],
        bar)


def _outputs(model, inputs, bar):
    outputs = []
    for data in inputs:
        try:
            outputs.append(converted_outputs(model, data))
        except (RuntimeError, ValueError, IndexError) as error:
            size = 'x'.join(map(str, data['inputs'].shape[-2:]))
            raise UsageError(f'the model cannot run on a {size} input '
                             f'({first_line(error)})') from None
        if bar is not None:
            bar.update()
            if bar.completed == bar.task_num:
                bar.file.write('\n')
    return outputs


def _compare(actual, expected, tolerance, checkpoint):
    # torch's max propagates NaN, Python's would drop it by position.
    max_error = torch.tensor([
        relative_error(a, e) for outs, expects in zip(actual, expected)
        for a, e in zip(outs, expects)
    ]).max().item()
    if not max_error <= tolerance:
        raise VerificationError(
            f'{checkpoint}: the deploy model differs from the trained one '
            f'(max relative difference {max_error:.2e} > {tolerance:.0e}); '
            'nothing written')
    return max_error


def _state_dict_to_write(model, weights, checkpoint):
    dtypes = {key: value.dtype for key, value in weights.items()}
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
                f'{checkpoint}: the fused {key} is not finite (batch-norm '
                'statistics out of range); nothing written')
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
            'nothing written') from None
    return model


def _num_params(model):
    return sum(p.numel() for p in model.parameters())


def _deploy_meta(meta, cfg, text, path):
    meta = dict(meta)
    meta['cfg'] = text
    meta['reparameterized_from'] = osp.basename(path)
    dataset = dataset_meta(cfg, meta)
    if dataset is not None:
        meta['dataset_meta'] = dataset
    return meta


def dataset_meta(cfg, meta):
    """The class names (and palette) of a checkpoint's ``meta``, or of the
    config's test dataset when the checkpoint has none (plain state dicts
    carry no class names); None if neither has them."""
    if 'dataset_meta' in meta:
        return meta['dataset_meta']
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    with DATASETS.switch_scope_and_registry(
            cfg.get('default_scope')) as registry:
        dataset_type = registry.get(dataset.get('type', ''))
    if not hasattr(dataset_type, '_load_metainfo'):
        return None
    return dataset_type._load_metainfo(copy.deepcopy(dataset.get('metainfo')))
