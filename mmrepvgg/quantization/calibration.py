"""The activation ranges that QAT starts from, and keeps alike across the
processes of a distributed run."""
import torch
from mmengine.dist import all_reduce
from torch.ao.quantization import MinMaxObserver

from ..deploy.logits import run_on_images
from .fake_quant import activation_quantizers, float_mode, set_qparams

__all__ = [
    'CALIBRATION_IMAGES', 'calibrate_activation_ranges',
    'average_activation_ranges'
]

# Training images that ``qat.equalize`` and the first activation ranges are
# measured on, as many as ``tools/export.py --int8`` calibrates on.
CALIBRATION_IMAGES = 16


def calibrate_activation_ranges(model, images):
    """Start every activation quantizer that inference reaches from the
    min/max its input takes over ``images`` in the float model, as
    ``tools/export.py --int8`` calibrates, rather than from the first
    training batch, which its moving average would take whole.

    Args:
        model (nn.Module): A segmentor made quantization-aware
            (:func:`prepare_qat`).
        images (Sequence[Tensor]): Image batches, as the exported model
            takes them.
    """
    ranges = {}

    def observe(quantizer, args):
        if quantizer not in ranges:
            ranges[quantizer] = MinMaxObserver(
                dtype=torch.quint8, quant_min=0, quant_max=255)
        ranges[quantizer](args[0])

    hooks = [
        quantizer.register_forward_pre_hook(observe)
        for _, quantizer in activation_quantizers(model)
    ]
    try:
        with float_mode(model):
            run_on_images(model, images)
    finally:
        for hook in hooks:
            hook.remove()
    for quantizer, seen in ranges.items():
        quantizer.activation_post_process.load_state_dict(seen.state_dict())
        set_qparams(quantizer)


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
        set_qparams(quantizer)
