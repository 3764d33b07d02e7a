"""Loading a trained or deployed model for use: built offline from its
config, its weights read once with the safe loader and loaded strictly, in
deploy form, with the class names and palette it predicts.
"""
import copy
from dataclasses import dataclass
from typing import Optional

from mmengine.model import revert_sync_batchnorm
from mmengine.registry import DATASETS
from torch import nn

from ..checkpoint import Checkpoint, load_checkpoint, load_weights
from ..config import build_model
from ..errors import CheckpointError, VerificationError
from ..models.weight_layouts import is_deploy_form
from ..runtime.metadata import DatasetMeta
from .compare import Fp32Tolerance
from .convert import (ConversionCheck, ConversionComparison, deploy_roots,
                      random_input, switch_to_deploy)
from .images import check_input_size

__all__ = [
    'DEFAULT_CHECK_SIZE', 'dataset_meta', 'LoadedModel', 'load_model',
    'deploy_model'
]

# Small enough to be quick on a CPU, large enough that every tap of a
# dilation-4 kernel at output stride 8 reads the image.
DEFAULT_CHECK_SIZE = (64, 128)


def dataset_meta(cfg, checkpoint=None):
    """The classes and palette of a checkpoint's ``meta``, or of the
    config's test dataset when there is no checkpoint or it has none (plain
    state dicts carry no class names); None if neither has them.

    Args:
        cfg (Config): The model's config.
        checkpoint (Checkpoint, optional): Its checkpoint.

    Raises:
        MetadataError: The metadata is malformed.
    """
    meta = checkpoint.meta if checkpoint is not None else {}
    if 'dataset_meta' in meta:
        return DatasetMeta.parse(meta['dataset_meta'], checkpoint.path)
    dataset = (cfg.get('test_dataloader') or {}).get('dataset') or {}
    with DATASETS.switch_scope_and_registry(
            cfg.get('default_scope')) as registry:
        dataset_type = registry.get(dataset.get('type') or '')
    if not hasattr(dataset_type, '_load_metainfo'):
        return None
    metainfo = dataset_type._load_metainfo(
        copy.deepcopy(dataset.get('metainfo')))
    return DatasetMeta.parse(metainfo, cfg.filename)


@dataclass
class LoadedModel:
    """A model with the weights of a checkpoint, in eval mode, with plain
    batch norms.

    Attributes:
        model (nn.Module): The model.
        checkpoint (Checkpoint): Its checkpoint as read.
        deploy_form (bool): Whether the model was built in deploy form (its
            weights were).
        conversion (ConversionComparison, optional): The check of its
            conversion to deploy form, if it was converted when loaded.
    """
    model: nn.Module
    checkpoint: Checkpoint
    deploy_form: bool
    conversion: Optional[ConversionComparison] = None


def load_model(cfg, checkpoint=None, config='config'):
    """Build ``cfg``'s model offline in the form of the checkpoint's
    weights (training or deploy) and load them strictly.

    Args:
        cfg (Config): The model's config (either form).
        checkpoint (str, optional): A checkpoint of either form; None
            leaves the model in training form with random weights.
        config (str): Name of the config, for messages.

    Returns:
        LoadedModel: The model.

    Raises:
        MMRepVGGError: An unreadable or unsafe checkpoint, a config that does
            not build, weights that fit neither form of the model.
    """
    if checkpoint is None:
        model = revert_sync_batchnorm(build_model(cfg)).eval()
        return LoadedModel(model, Checkpoint('random weights', {}, ''), False)
    loaded = load_checkpoint(checkpoint)
    # RepVGG's fused convs say the form; other blocks' weights are tried
    # in both.
    forms = (True, False) if is_deploy_form(loaded.weights) else (False, True)
    errors = []
    for deploy in forms:
        model = build_model(cfg, deploy=deploy)
        try:
            load_weights(model, loaded.weights, checkpoint, config)
        except CheckpointError as error:
            errors.append(error)
            continue
        return LoadedModel(
            revert_sync_batchnorm(model).eval(), loaded, deploy_form=deploy)
    raise errors[0]


def deploy_model(cfg,
                 checkpoint,
                 config='config',
                 check_size=DEFAULT_CHECK_SIZE,
                 tolerance=Fp32Tolerance()):
    """The deploy-form model of a checkpoint in either form.

    A deploy checkpoint loads into the deploy form of ``cfg``'s model. A
    trained one is converted and checked on a random input, as
    :func:`mmrepvgg.deploy.reparameterize` checks it. A model without
    blocks to convert is loaded as it is.

    Args:
        cfg (Config): The model's config (training or deploy form).
        checkpoint (str): A trained or a deploy checkpoint.
        config (str): Name of the config, for messages.
        check_size (tuple[int]): ``(height, width)`` of the random input.
        tolerance (Fp32Tolerance): How close the conversion must be.

    Returns:
        LoadedModel: The model, with its conversion's check if converted.

    Raises:
        VerificationError: The converted model computes something else.
    """
    check_input_size(check_size)
    loaded = load_model(cfg, checkpoint, config)
    model = loaded.model
    if loaded.deploy_form or not deploy_roots(model):
        return loaded
    check = ConversionCheck(model, [random_input(model, check_size)])
    switch_to_deploy(model)
    loaded.conversion = check.compare(model, tolerance)
    if not loaded.conversion.passed:
        raise VerificationError(
            f'{checkpoint}: its deploy form differs from the trained model '
            f'({loaded.conversion.describe()})')
    return loaded
