"""Quantization-aware training (QAT) of RepVGG segmentors in deploy form,
under the deploy model's module names, by the mmengine Runner
(:class:`QATRunner`) with the config's own dataset, optimizer wrapper,
hooks and launchers (``docs/deployment/int8.md``).
"""
import copy
import os.path as osp
from collections import OrderedDict
from functools import cache, partial

import torch
import torch.nn.functional as F
from mmengine.config import Config
from mmengine.dist import get_world_size
from mmengine.hooks import Hook
from mmengine.model import BaseModel, is_model_wrapper
from mmengine.registry import HOOKS, MODELS, RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint
from torch import nn

from ..checkpoint import load_checkpoint, load_weights
from ..config import build_model, config_dicts, is_repvgg_node
from ..deploy import convert
from ..deploy.images import split_images
from ..deploy.loading import DEFAULT_CHECK_SIZE, deploy_model
from ..errors import ConfigError, MMRepVGGError, UsageError
from ..models.weight_layouts import is_deploy_form
from .fake_quant import (average_activation_ranges,
                         calibrate_activation_ranges, prepare_qat,
                         set_observers)

__all__ = [
    'QAT_META_KEY', 'QAT_SCHEME', 'CALIBRATION_IMAGES', 'is_qat_checkpoint',
    'check_qat_start', 'use_qat', 'build_qat_model', 'load_qat_model',
    'Distillation', 'QATHook', 'QATRunner'
]

# The key under a checkpoint's meta that marks it as a QAT checkpoint.
QAT_META_KEY = 'mmrepvgg_qat'
# The int8 scheme trained for: the one ``tools/export.py --int8`` writes.
QAT_SCHEME = 'cpu'
# Training images that ``qat.equalize`` and the first activation ranges are
# measured on, as many as ``tools/export.py --int8`` calibrates on.
CALIBRATION_IMAGES = 16


def is_qat_checkpoint(checkpoint):
    """Whether a checkpoint carries the QAT marker.

    Args:
        checkpoint (str | Checkpoint): Its file, or the file loaded.

    Raises:
        CheckpointError: The file is missing or unreadable.
    """
    if isinstance(checkpoint, str):
        checkpoint = load_checkpoint(checkpoint)
    return QAT_META_KEY in checkpoint.meta


def _load_for_repvgg(cfg, checkpoint, config):
    """``checkpoint`` loaded, once ``cfg`` builds a RepVGG model."""
    if not isinstance(cfg.get('model'), dict):
        raise ConfigError(f'{config}: has no model to build')
    if not any(is_repvgg_node(node) for node in config_dicts(cfg.model)):
        raise ConfigError(f'{config}: QAT fine-tunes RepVGG models in deploy '
                          'form; this config builds no RepVGG backbone')
    return load_checkpoint(checkpoint)


def check_qat_start(cfg, checkpoint, config='config'):
    """Check that QAT of ``cfg``'s model can start from ``checkpoint``.

    Raises:
        ConfigError: The config builds no RepVGG model.
        CheckpointError: The file is missing or unreadable.
        UsageError: It is a deploy or a QAT checkpoint, not a trained one.
    """
    loaded = _load_for_repvgg(cfg, checkpoint, config)
    if is_qat_checkpoint(loaded):
        raise UsageError(f'{checkpoint}: is a QAT checkpoint already; '
                         'continue its training with --resume')
    if is_deploy_form(loaded.weights):
        raise UsageError(f'{checkpoint}: is a deploy checkpoint; QAT starts '
                         'from a trained (training-form) checkpoint')


def use_qat(cfg, checkpoint, config='config', equalize=False, distill=False):
    """Make ``cfg`` fine-tune its model with QAT from a trained checkpoint
    (:func:`build_qat_model`), once :func:`check_qat_start` passes: it sets
    ``qat = dict(...)``, ``runner_type='QATRunner'`` and this module in
    ``custom_imports``, so that the config written to the work dir resumes,
    tests and trains the same way, with mmseg's tools and ``mim`` too."""
    check_qat_start(cfg, checkpoint, config)
    cfg.qat = dict(checkpoint=checkpoint, equalize=equalize, distill=distill)
    cfg.runner_type = 'QATRunner'
    imports = dict(cfg.get('custom_imports') or {})
    modules = imports.get('imports') or []
    modules = [modules] if isinstance(modules, str) else list(modules)
    if __name__ not in modules:
        modules.append(__name__)
    cfg.custom_imports = dict(imports, imports=modules)


def build_qat_model(cfg,
                    checkpoint,
                    config='config',
                    equalize=False,
                    distill=False,
                    calibrate=False):
    """The QAT model of a trained checkpoint: its deploy form, checked, its
    backbone equalized if asked
    (:func:`~mmrepvgg.deploy.convert.equalize_checked`), made
    quantization-aware (:func:`prepare_qat`) and its activation ranges
    calibrated if asked (:func:`calibrate_activation_ranges`), both on
    :data:`CALIBRATION_IMAGES` training images through the test pipeline;
    with ``distill``, the student of a :class:`Distillation` from the model
    before it was made quantization-aware.

    Returns:
        nn.Module: The model (or its :class:`Distillation`), in training
        mode.

    Raises:
        MMRepVGGError: ``equalize`` for a model without a RepVGG backbone,
            or an equalized model that computes otherwise.
    """
    check_qat_start(cfg, checkpoint, config)
    model = deploy_model(cfg, checkpoint, config).model
    images = cache(
        partial(split_images, cfg, 'train', CALIBRATION_IMAGES, None))
    if equalize:
        try:
            convert.equalize_checked(model, images, DEFAULT_CHECK_SIZE)
        except MMRepVGGError as error:
            raise type(error)(f'{config}: qat.equalize: {error}') from None
    teacher = copy.deepcopy(model) if distill else None
    model = prepare_qat(model).train()
    if calibrate:
        calibrate_activation_ranges(model, images())
    return Distillation(model, teacher).train() if distill else model


def _heads(segmentor):
    """A segmentor's heads, by the prefix of their losses."""
    heads = dict(decode=segmentor.decode_head)
    auxiliary = getattr(segmentor, 'auxiliary_head', None)
    if isinstance(auxiliary, nn.ModuleList):
        heads.update((f'aux_{i}', head) for i, head in enumerate(auxiliary))
    elif auxiliary is not None:
        heads['aux'] = auxiliary
    return heads


@MODELS.register_module()
class Distillation(BaseModel):
    """A QAT segmentor (the student) that learns the fp32 model it started
    from (the teacher) rather than the labels: each head's loss is the KL
    divergence of the student's class probabilities from the teacher's,
    averaged over the pixels (``{head}.loss_distill``); it predicts as the
    student does. The student's heads lose their dropout, whose noise was
    half the decode head's KL on a toy PSPNet. The teacher stays frozen, in
    eval mode; checkpoints hold the student's weights alone, under its own
    names, and load into a QAT model as any QAT checkpoint does.

    Args:
        student (BaseModel): The QAT segmentor.
        teacher (nn.Module): The fp32 segmentor.
    """

    def __init__(self, student, teacher):
        super().__init__()
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        self.data_preprocessor = student.data_preprocessor
        for head in _heads(student).values():
            head.dropout = None
        self._register_state_dict_hook(_student_state)
        self._register_load_state_dict_pre_hook(self._as_own_state)

    def train(self, mode=True):
        super().train(mode)
        self.teacher.eval()
        return self

    def forward(self, inputs, data_samples=None, mode='tensor'):
        if mode == 'loss':
            return self.loss(inputs, data_samples)
        return self.student(inputs, data_samples, mode)

    def loss(self, inputs, data_samples=None):
        """The distillation losses of a batch of ``inputs``."""
        features = self.student.extract_feat(inputs)
        with torch.no_grad():
            teacher_features = self.teacher.extract_feat(inputs)
        teacher_heads = _heads(self.teacher)
        losses = {}
        for name, head in _heads(self.student).items():
            with torch.no_grad():
                target = teacher_heads[name].forward(teacher_features)
            losses[f'{name}.loss_distill'] = F.kl_div(
                F.log_softmax(head.forward(features), 1),
                F.log_softmax(target, 1),
                reduction='none',
                log_target=True).sum(1).mean()
        return losses

    def _as_own_state(self, state_dict, prefix, *args):
        """Load a checkpoint's student weights, and the teacher's own."""
        for key in [k for k in state_dict if k.startswith(prefix)]:
            state_dict[f'{prefix}student.{key[len(prefix):]}'] = \
                state_dict.pop(key)
        state_dict.update(self.teacher.state_dict(prefix=prefix + 'teacher.'))


def _student_state(module, state_dict, prefix, local_metadata):
    """A :class:`Distillation`'s state: the student's, under its own names."""
    student = prefix + 'student.'
    return OrderedDict((prefix + key[len(student):], value)
                       for key, value in state_dict.items()
                       if key.startswith(student))


def load_qat_model(cfg, checkpoint, config='config'):
    """A QAT checkpoint's model, for inference: in eval mode, with its
    observers off (the ranges it trained stay as they are).

    Returns:
        tuple[nn.Module, Checkpoint]: The model and its checkpoint.

    Raises:
        UsageError: The checkpoint carries no QAT marker.
        CheckpointError: It does not fit the config's model.
    """
    loaded = _load_for_repvgg(cfg, checkpoint, config)
    if not is_qat_checkpoint(loaded):
        raise UsageError(f'{checkpoint}: is not a QAT checkpoint (its meta '
                         f'has no {QAT_META_KEY!r} marker)')
    model = prepare_qat(build_model(cfg, deploy=True))
    load_weights(model, loaded.weights, checkpoint, config)
    set_observers(model, False)
    return model.eval(), loaded


@HOOKS.register_module()
class QATHook(Hook):
    """Marks a QAT run's checkpoints (:data:`QAT_META_KEY`: the scheme and
    the trained checkpoint it started from) and saves PyTorch's random state
    in them (for dropout), which mmengine does not restore on resuming;
    keeps the observers still in evaluation; averages the activation ranges
    over the processes after each iteration."""
    priority = 'VERY_HIGH'

    def before_save_checkpoint(self, runner, checkpoint):
        source = (runner.cfg.get('qat') or {}).get('checkpoint', '')
        checkpoint.setdefault('meta', {})[QAT_META_KEY] = dict(
            scheme=QAT_SCHEME, source=osp.basename(source))
        checkpoint['torch_rng_state'] = torch.get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint):
        state = checkpoint.get('torch_rng_state')
        if isinstance(state, torch.Tensor):
            torch.set_rng_state(state)

    def after_train_iter(self, runner, **kwargs):
        if get_world_size() > 1:
            average_activation_ranges(_unwrapped(runner.model))

    def before_val_epoch(self, runner):
        set_observers(_unwrapped(runner.model), False)

    def after_val_epoch(self, runner, metrics=None):
        set_observers(_unwrapped(runner.model), True)

    before_test_epoch = before_val_epoch


def _unwrapped(model):
    return model.module if is_model_wrapper(model) else model


@RUNNERS.register_module()
class QATRunner(Runner):
    """An mmengine Runner that fine-tunes a config's RepVGG model with QAT
    from the trained checkpoint of the config's ``qat = dict(checkpoint=...)``
    (:func:`build_qat_model`), not from its initializers; ``load_from`` and
    ``resume`` load QAT checkpoints over it (with nothing equalized or
    calibrated first: the checkpoint holds what they would give)."""

    def build_model(self, model):
        if isinstance(model, nn.Module):
            return model
        qat = self.cfg.get('qat') or {}
        if not qat.get('checkpoint'):
            raise ConfigError(f'{self.cfg.filename}: a QATRunner needs '
                              'qat = dict(checkpoint=TRAINED_CHECKPOINT)')
        # The whole config: equalization and calibration read its training
        # images.
        cfg = Config(dict(self.cfg.to_dict(), model=model))
        fresh = not self._loads_checkpoint()
        return build_qat_model(
            cfg,
            qat['checkpoint'],
            self.cfg.filename,
            equalize=qat.get('equalize', False) and fresh,
            distill=qat.get('distill', False),
            calibrate=fresh)

    def _loads_checkpoint(self):
        """Whether :meth:`load_or_resume` will load a checkpoint."""
        return self._load_from is not None or bool(
            self._resume and find_latest_checkpoint(self.work_dir))

    def register_hooks(self, default_hooks=None, custom_hooks=None):
        super().register_hooks(default_hooks, custom_hooks)
        self.register_hook(QATHook())

    def _init_model_weights(self):
        """Nothing: the weights come from the trained checkpoint."""
