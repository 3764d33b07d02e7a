"""Faster exact fp32 inference paths for a deployed segmentor or backbone.

Each step keeps the outputs the same up to rounding; the benchmark checks
that before it times a path.
"""
import copy

import torch
from torch import nn
from torch.utils.mkldnn import to_mkldnn

from mmrepvgg.config import read_config
from mmrepvgg.deploy import fold_psp_heads
from mmrepvgg.deploy.logits import SegmentorLogits
from mmrepvgg.errors import UsageError

FAST_STEPS = ('fold_psp', 'channels_last', 'mkldnn', 'jit', 'compile')
# Steps that change only a segmentor's head: a backbone's fast path skips
# them.
HEAD_STEPS = ('fold_psp', )


def check_fast_path(fast_path, config=None):
    """Raise UsageError unless ``fast_path`` is a valid list of steps (for
    ``config``'s segmentor, when given)."""
    unknown = set(fast_path) - set(FAST_STEPS)
    if unknown:
        raise UsageError(f'fast path steps must be among {FAST_STEPS}, got '
                         f'{sorted(unknown)}')
    if {'jit', 'compile'} <= set(fast_path):
        raise UsageError('fast path: choose one of jit and compile')
    if 'mkldnn' in fast_path and set(fast_path) - {'mkldnn', *HEAD_STEPS}:
        raise UsageError('fast path: mkldnn goes with fold_psp only (it '
                         'picks its own memory layout and cannot be traced '
                         'or compiled)')
    if 'fold_psp' in fast_path and config is not None:
        head = read_config(config).model.decode_head.type
        if head.split('.')[-1] != 'PSPHead':
            raise UsageError(f'fast path fold_psp: the decode head of '
                             f'{config} is {head}, not PSPHead')


def fast_steps_for(part, fast_path):
    """The steps of ``fast_path`` that apply to a ``part``, in order."""
    return [
        step for step in fast_path
        if part == 'segmentor' or step not in HEAD_STEPS
    ]


class ChannelsLast(nn.Module):
    """Run a module in channels-last memory format; its outputs return to
    the default (contiguous) format.

    Args:
        module (nn.Module): Converted in place.
    """

    def __init__(self, module):
        super().__init__()
        self.module = module.to(memory_format=torch.channels_last)

    def forward(self, inputs):
        outputs = self.module(
            inputs.contiguous(memory_format=torch.channels_last))
        return _map_outputs(outputs, lambda o: o.contiguous())


class OneDNNLayout(nn.Module):
    """Run a CPU module on oneDNN tensors, so that activations stay in
    oneDNN's blocked layout from one conv to the next; the outputs return
    to dense tensors.

    Args:
        module (nn.Module): Converted: its convs get prepacked weights.
    """

    def __init__(self, module):
        super().__init__()
        self.module = to_mkldnn(module)

    def forward(self, inputs):
        outputs = self.module(inputs.to_mkldnn())
        return _map_outputs(outputs, lambda o: o.to_dense())


def _map_outputs(outputs, function):
    if isinstance(outputs, (tuple, list)):
        return type(outputs)(function(o) for o in outputs)
    return function(outputs)


def _wrap_backbone(model, wrapper):
    # A segmentor's head keeps the default layout: only the plain conv
    # stack of the backbone changes.
    if isinstance(model, SegmentorLogits):
        model.segmentor.backbone = wrapper(model.segmentor.backbone)
        return model.eval()
    return wrapper(model).eval()


def optimize(model, inputs, fast_path):
    """A copy of an eval-mode model on a faster fp32 inference path.

    Args:
        model (nn.Module): A :class:`SegmentorLogits` or a backbone, in eval
            mode; left unchanged.
        inputs (Tensor): An example input.
        fast_path (Sequence[str]): Steps among :data:`FAST_STEPS`:
            ``'channels_last'`` runs the backbone in channels-last memory
            format, oneDNN's native layout for its plain 3x3 convs on CPU,
            while a segmentor's head keeps the default layout (faster for
            the PSP head's wide concatenating conv); ``'mkldnn'`` runs the
            backbone on oneDNN tensors (CPU only); ``'jit'`` traces and
            freezes the model (weights become constants, BN folds into the
            convs before it); ``'compile'`` uses ``torch.compile`` with
            frozen weights; ``'fold_psp'`` folds a segmentor's pyramid
            pooling into its bottleneck conv (see
            :class:`mmrepvgg.deploy.FoldedPSPHead`).

    Returns:
        callable: The optimized model.
    """
    check_fast_path(fast_path)
    model = copy.deepcopy(model)
    if 'fold_psp' in fast_path and not fold_psp_heads(model):
        raise UsageError('fast path fold_psp: the model has no PSPHead')
    if 'channels_last' in fast_path:
        model = _wrap_backbone(model, ChannelsLast)
    if 'mkldnn' in fast_path:
        model = _wrap_backbone(model, OneDNNLayout)
    if 'jit' in fast_path:
        with torch.no_grad():
            model = torch.jit.freeze(
                torch.jit.trace(model, inputs, check_trace=False))
    if 'compile' in fast_path:
        model = torch.compile(model, options=dict(freezing=True))
    return model
