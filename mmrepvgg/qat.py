"""Quantization-aware training (QAT) of RepVGG segmentors in deploy form.

A trained (training-form) checkpoint is converted to deploy form and
checked (:func:`mmrepvgg.deploy.loading.deploy_model`), the norms of the
conv modules that keep one (mmseg's heads) are folded into their convs, and
every ``nn.Conv2d`` becomes PyTorch's eager-mode QAT conv
(``torch.ao.nn.qat.Conv2d``, fake-quantized weights) whose input is
fake-quantized too. That is the cpu int8 scheme that export writes:
symmetric signed 8-bit weights per output channel, unsigned 8-bit
activations per tensor, with zero points (which OpenVINO needs).

Module names stay those of the deploy model; the fake quantizers' ranges
and scales are buffers beside each conv. Checkpoints, ``--resume`` and the
mmengine Runner therefore work as for any model: :class:`QATRunner` (a
config's ``runner_type='QATRunner'`` with ``qat = dict(checkpoint=...)``,
which ``tools/train.py --qat CHECKPOINT`` sets) trains it with the config's
own dataset, optimizer wrapper, hooks and launchers, and marks the
checkpoints it saves (:data:`QAT_META_KEY`).

:func:`qat_onnx` exports a QAT checkpoint as a QDQ ONNX model whose ONNX
Runtime labels are checked against the QAT model's own fake-quantized ones.
"""
import copy
import os.path as osp
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from functools import cache, partial

import torch
import torch.nn.functional as F
from mmcv.cnn import ConvModule
from mmengine.config import Config
from mmengine.dist import all_reduce, get_world_size
from mmengine.hooks import Hook
from mmengine.model import is_model_wrapper
from mmengine.registry import HOOKS, RUNNERS
from mmengine.runner import Runner, find_latest_checkpoint
from torch import nn
from torch.ao.nn import qat as nnqat
from torch.ao.quantization import (FakeQuantize, FakeQuantizeBase,
                                   MinMaxObserver, MovingAverageMinMaxObserver,
                                   QConfig)
from torch.ao.quantization.fake_quantize import \
    default_per_channel_weight_fake_quant
# Defines the quantized_decomposed ops that FrozenFakeQuantize calls.
from torch.ao.quantization.fx import _decomposed  # noqa: F401

from .checkpoint import load_checkpoint, load_weights
from .config import build_model, config_dicts, is_repvgg_node, read_config
from .deploy.modules import replace_modules
from .errors import ConfigError, MMRepVGGError, UsageError
from .models.fusion import fuse_conv_bn, is_batch_norm
from .models.weight_layouts import is_deploy_form

__all__ = [
    'QAT_META_KEY', 'qat_qconfig', 'QATConv2d', 'fold_conv_norms',
    'prepare_qat', 'fake_quantizers', 'FrozenFakeQuantize', 'FrozenQATConv2d',
    'frozen_for_export', 'is_qat_checkpoint', 'check_qat_start', 'use_qat',
    'build_qat_model', 'load_qat_model', 'average_activation_ranges',
    'QATHook', 'QATRunner', 'QATExportSettings', 'QATExport', 'qat_onnx',
    'MIN_QAT_AGREEMENT', 'calibrate_activation_ranges',
    'activation_quantizers', 'QuantizedOutput', 'Distillation'
]

# The key under a checkpoint's meta that marks it as a QAT checkpoint.
QAT_META_KEY = 'mmrepvgg_qat'
# The int8 scheme trained for: the one ``tools/export.py --int8`` writes.
QAT_SCHEME = 'cpu'
# The share of pixels whose exported labels must equal the QAT model's own.
MIN_QAT_AGREEMENT = 0.999
# Training images that the activation ranges of ``qat.equalize`` and the
# quantizers' first ranges are measured on, as many as ``tools/export.py
# --int8`` calibrates on by default.
CALIBRATION_IMAGES = 16


def qat_qconfig():
    """The fake quantization trained with: per-tensor unsigned 8-bit
    activations with a zero point, per-channel symmetric signed 8-bit
    weights (each with moving-average min/max observers, as PyTorch's
    default QAT qconfig has, but over the full 8 bits)."""
    activation = FakeQuantize.with_args(
        observer=MovingAverageMinMaxObserver,
        quant_min=0,
        quant_max=255,
        dtype=torch.quint8,
        qscheme=torch.per_tensor_affine)
    return QConfig(
        activation=activation, weight=default_per_channel_weight_fake_quant)


class QATConv2d(nnqat.Conv2d):
    """PyTorch's QAT conv (fake-quantized weights) whose input is
    fake-quantized too, as an int8 engine reads it."""

    def __init__(self, *args, **kwargs):
        super().__init__(*args, **kwargs)
        self.input_fake_quant = self.qconfig.activation()

    def forward(self, input):
        return super().forward(self.input_fake_quant(input))


class QuantizedOutput(nn.Module):
    """An activation whose output is fake-quantized: that of a backbone
    stage (its ``out_indices``), which the heads may read. An int8 engine
    stores such a tensor once, quantized, and runs the conv before it in
    int8 (ONNX Runtime fuses a conv into its int8 kernel only when a
    QuantizeLinear takes its output, not where pooling, resizing or
    concatenation read it).

    Args:
        act (nn.Module): The activation.
        quantizer (FakeQuantizeBase): The fake quantizer of its output.
    """

    def __init__(self, act, quantizer):
        super().__init__()
        self.act = act
        self.output_fake_quant = quantizer

    def forward(self, x):
        return self.output_fake_quant(self.act(x))


def fold_conv_norms(model):
    """Fold the batch norm of every conv-norm ``ConvModule`` inside
    ``model`` into its conv, in place, so that the weights an int8 engine
    quantizes are the ones trained; the norm becomes an identity.

    Returns:
        int: How many norms were folded.
    """
    folded = 0
    for module in model.modules():
        if not (isinstance(module, ConvModule) and module.with_norm
                and is_batch_norm(module.norm)
                and module.order.index('conv') < module.order.index('norm')):
            continue
        conv = module.conv
        kernel, bias = fuse_conv_bn(conv.weight, module.norm, conv.bias)
        conv.weight = nn.Parameter(kernel.to(conv.weight.dtype))
        conv.bias = nn.Parameter(bias.to(conv.weight.dtype))
        setattr(module, module.norm_name, nn.Identity())
        folded += 1
    return folded


def prepare_qat(model):
    """Make a deploy-form model quantization-aware, in place: norms folded
    (:func:`fold_conv_norms`), every ``nn.Conv2d`` a :class:`QATConv2d`
    with :func:`qat_qconfig`, under the same name, and the activation of
    the last block of each backbone stage in ``out_indices`` a
    :class:`QuantizedOutput`.

    Returns:
        nn.Module: ``model``.
    """
    fold_conv_norms(model)
    qconfig = qat_qconfig()

    def swap(module):
        if type(module) is not nn.Conv2d:
            return None
        module.qconfig = qconfig
        conv = QATConv2d.from_float(module)
        # Observed once, so that its ranges have one entry per channel, as
        # in the checkpoints that load into it.
        conv.weight_fake_quant(conv.weight.detach())
        return conv

    replace_modules(model, swap)
    for block in model.backbone.output_blocks():
        block.act = QuantizedOutput(block.act, qconfig.activation())
    return model


def fake_quantizers(model):
    """``(name, module)`` of every fake quantizer inside ``model``."""
    return [(name, module) for name, module in model.named_modules()
            if isinstance(module, FakeQuantizeBase)]


def activation_quantizers(model):
    """``(name, module)`` of every fake quantizer of an activation (a
    conv's input or a :class:`QuantizedOutput`) inside ``model``."""
    return [(name, module) for name, module in fake_quantizers(model)
            if not name.endswith('weight_fake_quant')]


def _observe(model, enabled):
    for _, quantizer in fake_quantizers(model):
        quantizer.enable_observer(enabled)


@contextmanager
def _float(model):
    """Run ``model`` in float, in eval mode: every fake quantizer off, and
    back as it was after."""
    quantizers = [q for _, q in fake_quantizers(model)]
    states = [(bool(q.fake_quant_enabled[0]), bool(q.observer_enabled[0]))
              for q in quantizers]
    training = model.training
    for quantizer in quantizers:
        quantizer.disable_fake_quant()
        quantizer.disable_observer()
    try:
        yield model.eval()
    finally:
        model.train(training)
        for quantizer, (fake_quant, observer) in zip(quantizers, states):
            quantizer.enable_fake_quant(fake_quant)
            quantizer.enable_observer(observer)


def _set_qparams(quantizer):
    """Set a fake quantizer's scale and zero point from its observer's
    range."""
    scale, zero_point = quantizer.calculate_qparams()
    quantizer.scale.resize_(scale.shape).copy_(scale)
    quantizer.zero_point.resize_(zero_point.shape).copy_(zero_point)


@torch.no_grad()
def calibrate_activation_ranges(model, images):
    """Start every activation quantizer that inference reaches from the
    range its input takes over ``images`` in the float model, as
    ``tools/export.py --int8`` calibrates (min/max), rather than from the
    first training batch, which its moving average would take whole.

    Args:
        model (nn.Module): A segmentor made quantization-aware
            (:func:`prepare_qat`).
        images (Sequence[Tensor]): Image batches, as the exported model
            takes them.

    Returns:
        int: The quantizers calibrated.
    """
    from .deploy.logits import run_on_images
    ranges = {}

    def observe(quantizer, args):
        ranges.setdefault(
            quantizer,
            MinMaxObserver(dtype=torch.quint8, quant_min=0, quant_max=255))(
                args[0])

    hooks = [
        quantizer.register_forward_pre_hook(observe)
        for _, quantizer in activation_quantizers(model)
    ]
    try:
        with _float(model):
            run_on_images(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    for quantizer, seen in ranges.items():
        observer = quantizer.activation_post_process
        observer.min_val.resize_(seen.min_val.shape).copy_(seen.min_val)
        observer.max_val.resize_(seen.max_val.shape).copy_(seen.max_val)
        _set_qparams(quantizer)
    return len(ranges)


@torch.no_grad()
def average_activation_ranges(model):
    """Average the ranges that the activation quantizers of ``model``
    observed over the processes of a distributed run, and set their scales
    and zero points from them, so that every process quantizes as the
    others do (DDP keeps the weights, and so their quantizers, the same,
    but not buffers: each process observes its own batches)."""
    for _, quantizer in activation_quantizers(model):
        if not quantizer.observer_enabled[0]:
            continue
        observer = quantizer.activation_post_process
        for value in (observer.min_val, observer.max_val):
            all_reduce(value, op='mean')
        _set_qparams(quantizer)


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


def _check_repvgg_config(cfg, config):
    if not any(is_repvgg_node(node) for node in config_dicts(cfg.model)):
        raise ConfigError(f'{config}: QAT fine-tunes RepVGG models in deploy '
                          'form; this config builds no RepVGG backbone')


def check_qat_start(cfg, checkpoint, config='config'):
    """Check that QAT of ``cfg``'s model can start from ``checkpoint``.

    Raises:
        ConfigError: The config builds no RepVGG model.
        CheckpointError: The file is missing or unreadable.
        UsageError: It is a deploy or a QAT checkpoint, not a trained one.
    """
    if not isinstance(cfg.get('model'), dict):
        raise ConfigError(f'{config}: has no model to build')
    _check_repvgg_config(cfg, config)
    loaded = load_checkpoint(checkpoint)
    if is_qat_checkpoint(loaded):
        raise UsageError(f'{checkpoint}: is a QAT checkpoint already; '
                         'continue its training with --resume')
    if is_deploy_form(loaded.weights):
        raise UsageError(f'{checkpoint}: is a deploy checkpoint; QAT starts '
                         'from a trained (training-form) checkpoint')


def use_qat(cfg, checkpoint, config='config', equalize=False, distill=False):
    """Make ``cfg`` fine-tune its model with QAT from a trained checkpoint,
    after checking that it can (:func:`check_qat_start`); with
    ``equalize``, from its backbone equalized first
    (:mod:`mmrepvgg.models.equalization`); with ``distill``, learning the
    trained model's predictions instead of the labels (:class:`Distillation`).

    Sets ``qat = dict(checkpoint=..., equalize=..., distill=...)`` and
    ``runner_type='QATRunner'`` and imports this module with the config,
    so that the config written to the work dir resumes, tests and trains
    the same way, with mmseg's tools and ``mim`` too.
    """
    check_qat_start(cfg, checkpoint, config)
    cfg.qat = dict(checkpoint=checkpoint, equalize=equalize, distill=distill)
    cfg.runner_type = 'QATRunner'
    imports = dict(cfg.get('custom_imports') or {})
    modules = list(imports.get('imports') or [])
    if __name__ not in modules:
        modules.append(__name__)
    cfg.custom_imports = dict(imports, imports=modules)


def build_qat_model(cfg,
                    checkpoint,
                    config='config',
                    equalize=False,
                    distill=False,
                    calibrate=False):
    """The QAT model of a trained checkpoint: converted to deploy form,
    checked, its backbone equalized if asked
    (:func:`~mmrepvgg.deploy.convert.equalize_checked`, checked too), and
    made quantization-aware (:func:`prepare_qat`), its activation ranges
    calibrated if asked (:func:`calibrate_activation_ranges`); with
    ``distill``, its loss is :class:`Distillation` from the model before.
    Equalization and calibration measure the model on
    :data:`CALIBRATION_IMAGES` training images through the test pipeline.

    Returns:
        nn.Module: The model, in training mode.

    Raises:
        MMRepVGGError: ``equalize`` for a model without a RepVGG backbone,
            or an equalized model that computes otherwise.
    """
    from .deploy.convert import equalize_checked
    from .deploy.images import split_images
    from .deploy.loading import DEFAULT_CHECK_SIZE, deploy_model
    check_qat_start(cfg, checkpoint, config)
    model = deploy_model(cfg, checkpoint, config).model
    images = cache(
        partial(split_images, cfg, 'train', CALIBRATION_IMAGES, None))
    if equalize:
        try:
            equalize_checked(model, images, DEFAULT_CHECK_SIZE)
        except MMRepVGGError as error:
            raise type(error)(f'{config}: qat.equalize: {error}') from None
    teacher = copy.deepcopy(model) if distill else None
    model = prepare_qat(model).train()
    if calibrate:
        calibrate_activation_ranges(model, images())
    if distill:
        # Not a submodule: checkpoints, DDP and the optimizer see only the
        # QAT model.
        model.loss = Distillation(model, teacher)
    return model


def _heads(segmentor):
    """A segmentor's decode head and auxiliary heads, by the prefix of
    their losses."""
    heads = dict(decode=segmentor.decode_head)
    auxiliary = getattr(segmentor, 'auxiliary_head', None)
    if isinstance(auxiliary, nn.ModuleList):
        heads.update((f'aux_{i}', head) for i, head in enumerate(auxiliary))
    elif auxiliary is not None:
        heads['aux'] = auxiliary
    return heads


class Distillation:
    """The loss of a QAT segmentor that learns the fp32 model it started
    from rather than the labels: for each head, the KL divergence of its
    class probabilities from the fp32 model's, averaged over the pixels
    (``{head}.loss_distill``).

    The student's heads lose their dropout: the target is the fp32 model's
    deterministic output, and dropout's noise would be half the loss
    (the decode head's KL over QAT's first iterations on a trained toy
    PSPNet: 0.012 with dropout, 0.007 without).

    Args:
        student (nn.Module): The QAT segmentor; its heads' dropout is
            removed.
        teacher (nn.Module): The fp32 segmentor; frozen, and moved to the
            inputs' device when used.
    """

    def __init__(self, student, teacher):
        self.student = student
        self.teacher = teacher.eval().requires_grad_(False)
        for head in _heads(student).values():
            head.dropout = None

    def __call__(self, inputs, data_samples=None):
        self.teacher.to(inputs.device)
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


def load_qat_model(cfg, checkpoint, config='config'):
    """A QAT checkpoint's model, for inference: in eval mode, with its
    observers off (the ranges it trained stay as they are).

    Returns:
        tuple[nn.Module, Checkpoint]: The model and its checkpoint.

    Raises:
        UsageError: The checkpoint carries no QAT marker.
        CheckpointError: It does not fit the config's model.
    """
    _check_repvgg_config(cfg, config)
    loaded = load_checkpoint(checkpoint)
    if not is_qat_checkpoint(loaded):
        raise UsageError(f'{checkpoint}: is not a QAT checkpoint (its meta '
                         f'has no {QAT_META_KEY!r} marker)')
    model = prepare_qat(build_model(cfg, deploy=True))
    load_weights(model, loaded.weights, checkpoint, config)
    _observe(model, False)
    return model.eval(), loaded


@HOOKS.register_module()
class QATHook(Hook):
    """Marks the checkpoints of a QAT run, keeps the observers still while
    the model is evaluated, and makes a resumed run continue as the
    uninterrupted one would.

    Checkpoints get :data:`QAT_META_KEY` in their meta (the scheme and the
    trained checkpoint QAT started from) and PyTorch's random state (for
    dropout): mmengine re-seeds a resumed run and replays the data loader,
    but not the random numbers that the skipped iterations drew. In a
    distributed run the observed input ranges are averaged over the
    processes after each iteration (:func:`average_activation_ranges`).
    """
    priority = 'VERY_HIGH'

    def __init__(self, source=''):
        self.source = source

    def before_save_checkpoint(self, runner, checkpoint):
        checkpoint.setdefault('meta', {})[QAT_META_KEY] = dict(
            scheme=QAT_SCHEME, source=osp.basename(self.source))
        checkpoint['torch_rng_state'] = torch.get_rng_state()

    def after_load_checkpoint(self, runner, checkpoint):
        state = checkpoint.get('torch_rng_state')
        if isinstance(state, torch.Tensor):
            torch.set_rng_state(state)

    def after_train_iter(self,
                         runner,
                         batch_idx,
                         data_batch=None,
                         outputs=None):
        if get_world_size() > 1:
            average_activation_ranges(_unwrapped(runner.model))

    def before_val_epoch(self, runner):
        _observe(_unwrapped(runner.model), False)

    def after_val_epoch(self, runner, metrics=None):
        _observe(_unwrapped(runner.model), True)

    def before_test_epoch(self, runner):
        _observe(_unwrapped(runner.model), False)


def _unwrapped(model):
    return model.module if is_model_wrapper(model) else model


@RUNNERS.register_module()
class QATRunner(Runner):
    """An mmengine Runner that fine-tunes a config's RepVGG model with QAT
    from the trained checkpoint named by the config's
    ``qat = dict(checkpoint=...)``; otherwise the config's own Runner.

    The model starts from that checkpoint's weights (converted when it is
    built), not from its initializers; ``load_from`` and ``resume`` then
    load QAT checkpoints over it (with nothing equalized first: the
    checkpoint holds the weights that equalization gave).
    """

    def build_model(self, model):
        if isinstance(model, nn.Module):
            return model
        qat = self.cfg.get('qat') or {}
        if not qat.get('checkpoint'):
            raise ConfigError(f'{self.cfg.filename}: a QATRunner needs '
                              'qat = dict(checkpoint=TRAINED_CHECKPOINT)')
        # The whole config: equalization and calibration read its training
        # images. A QAT checkpoint loaded over the model next replaces
        # every weight and range that they would compute.
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
        self.register_hook(
            QATHook((self.cfg.get('qat') or {}).get('checkpoint', '')))

    def _init_model_weights(self):
        """Nothing to initialize: the weights come from the trained
        checkpoint."""


@dataclass
class QATExportSettings:
    """How :func:`qat_onnx` checks an exported QAT model.

    Attributes:
        eval_num (int): Images of the config's validation set to compare
            on.
        min_agreement (float): The share of their pixels whose ONNX Runtime
            label must equal the QAT model's own, or nothing is written.
    """
    eval_num: int = field(
        default=8,
        metadata=dict(help='validation images to compare the exported QAT '
                      'model with the QAT model on'))
    min_agreement: float = field(
        default=MIN_QAT_AGREEMENT,
        metadata=dict(help='share of pixels whose ONNX Runtime label must '
                      "equal the QAT model's own"))

    def check(self):
        """Raise UsageError for settings that cannot be met."""
        if self.eval_num < 1:
            raise UsageError('--qat-eval-num must be at least 1')
        if not 0 <= self.min_agreement <= 1:
            raise UsageError('--qat-min-agreement is a share of pixels, from '
                             f'0 to 1; got {self.min_agreement}')


@dataclass
class QATExport:
    """An exported QAT model.

    Attributes:
        data (bytes): The QDQ ONNX model, with its metadata.
        agreement (Agreement): Its labels on ONNX Runtime against the
            QAT model's own.
        info (ExportedModelInfo): Its metadata.
    """
    data: bytes
    agreement: object
    info: object


class FrozenFakeQuantize(nn.Module):
    """A fake quantizer's eval-mode computation with its scale and zero
    point fixed, as PyTorch's own PT2E flow represents it (its
    ``quantized_decomposed`` quantize and dequantize ops), which the ONNX
    exporter writes as QuantizeLinear and DequantizeLinear.
    ``torch.export`` traces neither the run-time switches of
    ``FakeQuantize`` (branches on its buffers) nor its kernel at a free
    batch size.

    Args:
        quantizer (FakeQuantizeBase): The trained fake quantizer.
    """

    def __init__(self, quantizer):
        super().__init__()
        self.bounds = (quantizer.quant_min, quantizer.quant_max,
                       torch.uint8 if quantizer.quant_min == 0 else torch.int8)
        self.axis = quantizer.ch_axis if quantizer.is_per_channel else None
        # The scale and zero point it computes with, as last observed.
        scale, zero_point = quantizer.scale, quantizer.zero_point
        if self.axis is None:
            # Python numbers: constants to the exporter.
            self.qparams = (float(scale), int(zero_point))
        else:
            self.register_buffer('scale', scale.detach().float().clone())
            self.register_buffer('zero_point',
                                 zero_point.detach().int().clone())

    def _qparams(self):
        if self.axis is None:
            return self.qparams
        return self.scale, self.zero_point, self.axis

    def quantize(self, x):
        """The integers ``x`` rounds to."""
        ops = torch.ops.quantized_decomposed
        op = ops.quantize_per_tensor if self.axis is None else \
            ops.quantize_per_channel
        return op(x, *self._qparams(), *self.bounds)

    def dequantize(self, q):
        """The values of integers ``q``."""
        ops = torch.ops.quantized_decomposed
        op = ops.dequantize_per_tensor if self.axis is None else \
            ops.dequantize_per_channel
        return op(q, *self._qparams(), *self.bounds)

    def forward(self, x):
        return self.dequantize(self.quantize(x))


class FrozenQATConv2d(nn.Module):
    """A trained :class:`QATConv2d` for export: its input fake-quantized
    with fixed parameters, its weights stored as the int8 values they round
    to, so that the ONNX model holds int8 weights behind a
    DequantizeLinear, as OpenVINO and ONNX Runtime take int8 convs.

    Args:
        conv (QATConv2d): The trained conv.
    """

    def __init__(self, conv):
        super().__init__()
        if conv.padding_mode != 'zeros':
            raise UsageError(f'cannot export a conv with {conv.padding_mode} '
                             'padding in int8')
        self.input_fake_quant = FrozenFakeQuantize(conv.input_fake_quant)
        self.weight_fake_quant = FrozenFakeQuantize(conv.weight_fake_quant)
        self.register_buffer(
            'int_weight',
            self.weight_fake_quant.quantize(conv.weight.detach()))
        self.register_buffer(
            'bias', None if conv.bias is None else conv.bias.detach().clone())
        self.conv_args = (conv.stride, conv.padding, conv.dilation,
                          conv.groups)

    def forward(self, x):
        weight = self.weight_fake_quant.dequantize(self.int_weight)
        return F.conv2d(
            self.input_fake_quant(x), weight, self.bias, *self.conv_args)


def frozen_for_export(module):
    """The export form of a trained QAT module (a :class:`QATConv2d` or
    :class:`QuantizedOutput`), or None for another (for
    :func:`~mmrepvgg.deploy.modules.replace_modules`)."""
    if isinstance(module, QATConv2d):
        return FrozenQATConv2d(module)
    if isinstance(module, QuantizedOutput):
        return nn.Sequential(module.act,
                             FrozenFakeQuantize(module.output_fake_quant))
    return None


def _agreement(model, reference, batches, split):
    """:class:`~mmrepvgg.deploy.quantize.Agreement` of an ONNX model on ONNX
    Runtime with its PyTorch form (an :class:`ImageSegmentor`) over
    ``batches``."""
    from .deploy.compare import relative_error
    from .deploy.engines import onnxruntime_session
    from .deploy.quantize import Agreement
    session = onnxruntime_session(model)
    same = total = 0
    error = 0.0
    for batch in batches:
        logits, labels = session.run(None, {'images': batch.numpy()})
        with torch.no_grad():
            expected_logits, expected = reference(batch)
        same += int((torch.from_numpy(labels) == expected).sum())
        total += expected.numel()
        error = max(error,
                    relative_error(torch.from_numpy(logits), expected_logits))
    return Agreement(same / total, error, len(batches), split)


def qat_onnx(config,
             checkpoint,
             size,
             dynamic=False,
             settings=QATExportSettings()):
    """A QAT checkpoint as a QDQ ONNX model, checked on ONNX Runtime.

    Each fake quantizer becomes a QuantizeLinear/DequantizeLinear pair with
    the scale and zero point it trained: uint8 activations with zero
    points, int8 weights per output channel, as the cpu int8 scheme has
    them. The model's labels on ONNX Runtime are compared with the QAT
    model's own (PyTorch, fake-quantized) on images of the config's
    validation set.

    Args:
        config (str): The config QAT trained (the model's own, or the one
            written to the work dir).
        checkpoint (str): A QAT checkpoint.
        size (tuple[int]): ``(height, width)`` of the model's input.
        dynamic (bool): Let height and width vary (checked at ``size``).
        settings (QATExportSettings): How it is checked.

    Returns:
        QATExport: The model, its agreement and its metadata.

    Raises:
        VerificationError: Fewer labels agree than asked.
    """
    from .deploy.graph import exportable, exported_model_info, to_onnx
    from .deploy.images import split_images
    from .deploy.loading import LoadedModel
    from .deploy.logits import ImageSegmentor
    from .deploy.quantize import check_agreement
    settings.check()
    cfg = read_config(config)
    model, loaded = load_qat_model(cfg, checkpoint, config)
    module = exportable(model)
    replace_modules(module, frozen_for_export)
    data = to_onnx(module, size, dynamic)
    agreement = _agreement(data,
                           ImageSegmentor(model).eval(),
                           split_images(cfg, 'val', settings.eval_num, size),
                           'val')
    check_agreement(
        agreement, settings.min_agreement, reference='the QAT model')
    info = exported_model_info(cfg, LoadedModel(model, loaded, True), config,
                               None if dynamic else size)
    info.precision, info.int8_scheme = 'int8', QAT_SCHEME
    info.calibration = dict(qat=loaded.meta[QAT_META_KEY])
    info.agreement = dict(asdict(agreement), reference='qat')
    return QATExport(_with_info(data, info), agreement, info)


def _with_info(data, info):
    import onnx

    from .deploy.model_info import set_info
    proto = onnx.load_from_string(data)
    set_info(proto, info)
    return proto.SerializeToString()
