"""Comparing a model's outputs with a reference's: fp32 outputs within a
small factor of the reference model's *own* fp32 error from its exact
(float64) outputs, as docs/user_guides/conversion.md explains; lower
precisions (bf16, int8) by how many labels they keep.
"""
import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..cli import option
from ..errors import UsageError

__all__ = [
    'relative_error', 'Fp32Tolerance', 'Fp32Comparison', 'compare_fp32',
    'LabelComparison', 'compare_labels', 'tensors_of', 'OutputComparison',
    'compare_outputs'
]

# Elements compared at a time: float64 temporaries of whole 1024x2048
# logits would take a GB.
_COMPARED_AT_ONCE = 1 << 20


def relative_error(actual, expected):
    """``max|actual - expected| / max|expected|`` (the plain difference
    where ``expected`` is all zeros), in float64."""
    if actual.shape != expected.shape:
        raise ValueError(f'cannot compare a {tuple(actual.shape)} tensor '
                         f'with a {tuple(expected.shape)} one')
    # Tensors, not floats: a NaN anywhere must make the result NaN.
    scale = difference = torch.zeros((), dtype=torch.float64)
    for part, reference in zip(
            actual.reshape(-1).split(_COMPARED_AT_ONCE),
            expected.reshape(-1).split(_COMPARED_AT_ONCE)):
        reference = reference.double()
        scale = torch.maximum(scale, reference.abs().max())
        difference = torch.maximum(difference,
                                   (part.double() - reference).abs().max())
    return (difference if scale == 0 else difference / scale).item()


@dataclass(frozen=True)
class Fp32Tolerance:
    """How far fp32 outputs may be from the exact ones.

    Attributes:
        factor (float): Times the reference model's own fp32 error. Two
            fp32 computations of one function in other orders of summation
            differ by about the same amount; 10 leaves room for that and
            still refuses a wrong conversion by a wide margin.
        floor (float): Added to the limit, for outputs that the reference
            computes almost exactly (relative, about 8 fp32 ulps).
    """
    factor: float = option(
        10.0, "times the reference model's own fp32 error from the exact "
        'outputs')
    floor: float = option(1e-6, 'added to the relative limit')

    def __post_init__(self):
        if not (self.factor >= 1 and self.floor >= 0):
            raise UsageError(f'a tolerance factor is at least 1 and a floor '
                             f'at least 0, got {self.factor} and {self.floor}')

    def limit(self, own_error):
        """The largest relative error accepted, for a reference whose own
        fp32 outputs are ``own_error`` off."""
        return self.factor * own_error + self.floor


@dataclass(frozen=True)
class Fp32Comparison:
    """How far fp32 outputs are from the exact ones, for the output that
    came closest to its limit.

    Attributes:
        error (float): ``max|actual - exact| / max|exact|``.
        own_error (float): The same of the reference model's fp32 outputs.
        limit (float): The largest ``error`` accepted
            (:meth:`Fp32Tolerance.limit` of ``own_error``).
    """
    error: float
    own_error: float
    limit: float

    @property
    def passed(self):
        return self.error <= self.limit  # False for NaN

    @property
    def margin(self):
        """``error / limit``: at most 1 when passed; infinite for NaN."""
        return self.error / self.limit if self.error == self.error else (
            math.inf)

    @classmethod
    def of(cls, actual, exact, own_error, tolerance=Fp32Tolerance()):
        """The comparison of one fp32 output with the exact one, where the
        reference model's fp32 output is ``own_error`` off
        (:func:`relative_error`)."""
        return cls(
            relative_error(actual, exact), own_error,
            tolerance.limit(own_error))

    def describe(self):
        return (f'max relative difference {self.error:.2e} from the exact '
                '(float64) outputs, where the reference fp32 model is off by '
                f'{self.own_error:.2e} (limit {self.limit:.2e})')


def compare_fp32(actual, own, exact, tolerance=Fp32Tolerance()):
    """Compare fp32 outputs with exact ones, given the reference model's own
    fp32 outputs on the same inputs.

    Args:
        actual (Sequence[Tensor]): The fp32 outputs to judge.
        own (Sequence[Tensor]): The reference model's fp32 outputs.
        exact (Sequence[Tensor]): The reference model's float64 outputs.
        tolerance (Fp32Tolerance): The limit.

    Returns:
        Fp32Comparison: Of the output nearest to (or furthest over) its
        limit.
    """
    if not len(actual) == len(own) == len(exact) > 0:
        raise ValueError(f'cannot compare {len(actual)} outputs with '
                         f'{len(own)} and {len(exact)}')
    comparisons = (Fp32Comparison.of(a, e, relative_error(o, e), tolerance)
                   for a, o, e in zip(actual, own, exact))
    return max(comparisons, key=lambda c: c.margin)


def tensors_of(output):
    """The tensors in a module's output (a tensor, or nested sequences of
    them), in order."""
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in tensors_of(item)]
    return []


@dataclass(frozen=True)
class LabelComparison:
    """Pixels whose labels differ from the reference's.

    Attributes:
        differ (int): All of them.
        untied (int): Those where the reference's two best classes are
            further apart than the logits may move: these flips are
            errors, the others are rounding at near-ties.
    """
    differ: int
    untied: int


def compare_labels(labels, exact_logits, limit):
    """Compare labels with the argmax of exact logits, allowing flips where
    the two best classes are within ``2 * limit * max|logits|``: each logit
    may move by ``limit`` of the largest.

    Args:
        labels (Tensor): ``(N, H, W)``.
        exact_logits (Tensor): ``(N, C, H, W)``.
        limit (float): The relative error accepted of the logits.

    Returns:
        LabelComparison: The flips, and those outside near-ties.
    """
    exact_logits = exact_logits.double()
    differ = labels != exact_logits.argmax(1)
    top2 = exact_logits.topk(2, dim=1).values
    scale = torch.maximum(exact_logits.amax(), -exact_logits.amin())
    tie = (top2[:, 0] - top2[:, 1]) <= (2 * limit * scale)
    return LabelComparison(int(differ.sum()), int((differ & ~tie).sum()))


@dataclass(frozen=True)
class OutputComparison:
    """How far a model's outputs are from a reference model's exact ones.

    Attributes:
        max_rel_error (float): Of the output nearest its limit.
        limit (float): Its limit (:class:`Fp32Comparison`).
        label_mismatches (int, optional): Pixels whose label differs from
            the exact logits' (:func:`compare_labels`); None if not logits.
        label_agreement (float, optional): The share of the other pixels.
        exact (bool): Within the limit, labels flipped at near-ties only.
    """
    max_rel_error: float
    limit: float
    label_mismatches: Optional[int]
    label_agreement: Optional[float]
    exact: bool


def compare_outputs(actual, own, exact, logits=True):
    """Compare a model's fp32 outputs with a reference model's exact ones
    (:class:`OutputComparison`), and if the first is logits, its labels.

    Args:
        actual: The outputs: a tensor, or nested sequences of them.
        own: The reference model's fp32 outputs on the same inputs.
        exact: Its float64 outputs.
        logits (bool): Whether the first output is ``(N, C, H, W)`` logits.
    """
    actual, own, exact = (tensors_of(o) for o in (actual, own, exact))
    check = compare_fp32(actual, own, exact)
    if not logits:
        return OutputComparison(check.error, check.limit, None, None,
                                check.passed)
    labels = actual[0].argmax(dim=1)
    flips = compare_labels(labels, exact[0], check.limit)
    return OutputComparison(check.error, check.limit, flips.differ,
                            1 - flips.differ / labels.numel(), check.passed
                            and not flips.untied)
