"""How an int8 model's predictions agree with those of its reference (the
fp32 model, or the QAT model it was exported from), measured on ONNX
Runtime."""
from dataclasses import dataclass
from typing import Optional

import torch

from ..deploy.compare import relative_error
from ..deploy.engines import onnxruntime_session
from ..deploy.model_info import INPUT
from ..errors import VerificationError

__all__ = ['Agreement', 'run_onnx', 'measure_agreement', 'check_agreement']


@dataclass
class Agreement:
    """How an int8 model's predictions compare with its fp32 model's.

    Attributes:
        labels (float): The share of pixels with the same label.
        max_rel_error (float): The largest ``max|int8 - fp32| / max|fp32|``
            of the logits.
        images (int): The images compared on.
        split (str): The dataset split they came from.
        all_int8_labels (float, optional): For a model with convs kept in
            fp32, the share of labels kept with every conv in int8.
        unequalized_labels (float, optional): For a model equalized
            because full int8 of the model as it was missed the agreement
            asked, the share of labels that full int8 kept.
        equalized_labels (float, optional): For a model not equalized
            although its equalized model was tried (and kept fewer labels
            or needed more convs in fp32), the share of labels that the
            equalized model's full int8 kept.
    """
    labels: float
    max_rel_error: float
    images: int
    split: str
    all_int8_labels: Optional[float] = None
    unequalized_labels: Optional[float] = None
    equalized_labels: Optional[float] = None


def run_onnx(model, images):
    """(logits, labels) of a model on ONNX Runtime for each batch."""
    session = onnxruntime_session(model)
    return [session.run(None, {INPUT: b.numpy()}) for b in images]


def measure_agreement(model, reference, images, split):
    """:class:`Agreement` of a model on ONNX Runtime with a reference over
    ``images``.

    Args:
        model (bytes): The model compared.
        reference (bytes | list): The reference model, or its outputs on
            ``images`` (``(logits, labels)`` arrays for each batch).
        images (Sequence[Tensor]): Image batches.
        split (str): The dataset split they came from.
    """
    if isinstance(reference, bytes):
        reference = run_onnx(reference, images)
    same, total, error = 0, 0, 0.0
    for (logits,
         labels), (ref_logits,
                   ref_labels) in zip(run_onnx(model, images), reference):
        same += int((labels == ref_labels).sum())
        total += labels.size
        error = max(
            error,
            relative_error(
                torch.from_numpy(logits), torch.from_numpy(ref_logits)))
    return Agreement(same / total, error, len(images), split)


def check_agreement(agreement, min_agreement, float_convs=0, reference='fp32'):
    """Raise VerificationError if fewer labels agree than asked.

    Args:
        agreement (Agreement): The int8 model's agreement.
        min_agreement (float): The share of labels asked for.
        float_convs (int): The convs the model keeps in fp32.
        reference (str): What it was compared with.
    """
    if not agreement.labels >= min_agreement:
        kept = f' with {float_convs} conv(s) in fp32' if float_convs else ''
        raise VerificationError(
            f'INT8 labels agree with {reference} on {agreement.labels:.2%} '
            f'of the pixels of {agreement.images} {agreement.split} '
            f'image(s){kept}, below the {min_agreement:.2%} asked; '
            'nothing written')
