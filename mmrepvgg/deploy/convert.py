"""Whole-model conversion to deploy form (and of the deploy form to its
equalized one, before int8), and the check that the converted model
computes what the model before it did. A module converts if it has
``switch_to_deploy()`` (docs/design/block_contract.md).
"""
from dataclasses import asdict, dataclass
from functools import partial

import cv2
import torch
from mmengine.dataset import pseudo_collate
from mmengine.structures import BaseDataElement
from torch import nn

from ..errors import UsageError, VerificationError, first_line
from ..models.equalization import equalization_pairs, equalize_backbone
from .compare import (Fp32Comparison, Fp32Tolerance, compare_fp32,
                      relative_error, tensors_of)
from .exact import fp32_and_exact
from .images import MAX_INPUT_PIXELS, read_image
from .logits import run_on_images

__all__ = [
    'switch_to_deploy', 'convertible_blocks', 'deploy_roots',
    'converted_outputs', 'random_input', 'image_input', 'ConversionComparison',
    'ConversionCheck', 'equalize_checked'
]


def _converting(model):
    """``(name, module)`` of each module of ``model`` that offers
    ``switch_to_deploy()``, outer ones first."""
    return [(name, module) for name, module in model.named_modules()
            if callable(getattr(module, 'switch_to_deploy', None))]


def switch_to_deploy(model):
    """Convert every module inside ``model`` that offers
    ``switch_to_deploy()``, in place.

    That covers RepVGG and QARepVGG blocks wherever they are (a segmentor, a
    detector, a bare backbone, blocks in a user's neck) and any other block
    with that method. Each module's conversion is idempotent, so is this.

    Args:
        model (nn.Module): The model.

    Returns:
        nn.Module: ``model``.
    """
    for _, module in _converting(model):
        module.switch_to_deploy()
    return model


def convertible_blocks(model):
    """The innermost modules of ``model`` that offer ``switch_to_deploy``:
    its blocks (not the backbone that holds them)."""
    found = _converting(model)
    return [
        module for name, module in found
        if not any(other.startswith(name + '.') for other, _ in found)
    ]


def deploy_roots(model):
    """Names of the outermost modules of ``model`` that
    :func:`switch_to_deploy` changes: those that offer ``switch_to_deploy``
    and lie inside no other such module."""
    names = [name for name, _ in _converting(model)]
    return [
        name for name in names
        if not any(name.startswith(root + '.') for root in names)
    ]


class _RootsDone(Exception):
    """Ends a verification forward once every converted module has run."""


def converted_outputs(model, data):
    """The outputs of the modules that conversion changes
    (:func:`deploy_roots`), for one tensor-mode forward of ``model``.

    The rest of the model is the same before and after conversion and is not
    run: a detector's final outputs pass through discrete steps (proposal
    ranking) that would amplify rounding.

    Args:
        model (nn.Module): An OpenMMLab model (``model(**data,
            mode='tensor')``).
        data (dict): ``inputs`` and ``data_samples``.

    Returns:
        list[Tensor]: Every tensor the roots returned, in order.

    Raises:
        UsageError: The model cannot run on an input of that size.
    """
    roots = deploy_roots(model)
    outputs, finished = [], set()

    def record(name, module, args, output):
        outputs.extend(t.detach().clone() for t in tensors_of(output))
        finished.add(name)
        if len(finished) == len(roots):
            raise _RootsDone

    handles = [
        model.get_submodule(name).register_forward_hook(partial(record, name))
        for name in roots
    ]
    try:
        with torch.no_grad():
            model(**data, mode='tensor')
    except _RootsDone:
        pass
    except (RuntimeError, ValueError, IndexError) as error:
        size = 'x'.join(map(str, data['inputs'].shape[-2:]))
        raise UsageError(f'the model cannot run on a {size} input '
                         f'({first_line(error)})') from error
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def random_input(model, size, seed=0):
    """A seeded random batch of one for ``model``'s tensor-mode forward:
    ``inputs`` of ``size`` (height, width) with the channels of the model's
    first conv, and image metas that two-stage detectors read."""
    in_channels = next(m for m in model.modules()
                       if isinstance(m, nn.Conv2d)).in_channels
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(1, in_channels, *size, generator=generator)
    meta = dict.fromkeys(
        ('img_shape', 'ori_shape', 'pad_shape', 'batch_input_shape'),
        tuple(size))
    meta['scale_factor'] = (1.0, 1.0)
    return dict(inputs=inputs, data_samples=[BaseDataElement(metainfo=meta)])


def image_input(pipeline, model, path):
    """An image file through the config's test pipeline and ``model``'s
    data preprocessor, as the model's tensor-mode forward takes it.

    Args:
        pipeline (TestPipeline): The config's test pipeline.
        model (nn.Module): The model.
        path (str): The image.

    Raises:
        UsageError: The image is missing, unreadable or too large, or the
            pipeline makes it larger than :data:`MAX_INPUT_PIXELS`.
    """
    image = read_image(path)
    try:
        data = pipeline(image, path)
    except (AssertionError, KeyError, TypeError, ValueError,
            cv2.error) as error:
        raise UsageError(
            f'{path}: the test pipeline fails on it '
            f'({type(error).__name__}: {first_line(error)})') from error
    height, width = data['inputs'].shape[-2:]
    if height * width > MAX_INPUT_PIXELS:
        raise UsageError(
            f'{path}: the test pipeline makes it a {height}x{width} input, '
            f'larger than the {MAX_INPUT_PIXELS:,} pixels a model is run on '
            'at most; resize it first')
    return model.data_preprocessor(pseudo_collate([data]), False)


@dataclass(frozen=True)
class ConversionComparison(Fp32Comparison):
    """How exactly a converted model computes what the trained one did: its
    weights as stored, computed in float64, against the trained model's
    exact outputs, within the tolerance of the trained model's own fp32
    error (what decides: only the rounding of fused weights to their dtype
    remains, or the conversion is wrong).

    Attributes:
        fp32_error (float): The converted model's fp32 outputs against
            the exact ones, for information: fp32 arithmetic of this CPU on
            the fused network (whose identity branches now sum inside its
            convs), up to 20x the trained model's own error in deep nets.
    """
    fp32_error: float

    def describe(self):
        return (f'in float64 the deploy model differs from the exact outputs '
                f'by {self.error:.2e}, where the trained model in fp32 is '
                f'off by {self.own_error:.2e} (limit {self.limit:.2e}); '
                f'in fp32 it is off by {self.fp32_error:.2e}')


class ConversionCheck:
    """What a model's converted modules compute before conversion, in fp32
    and exactly, to judge its converted form by
    (:class:`ConversionComparison`).

    Args:
        model (nn.Module): The model in training form; left unchanged.
        inputs (Sequence[dict]): Its inputs (:func:`random_input`,
            :func:`image_input`).
    """

    def __init__(self, model, inputs):
        self.inputs = list(inputs)
        self.own, self.exact = fp32_and_exact(
            model, self.inputs, run=converted_outputs)

    def compare(self, converted, tolerance=Fp32Tolerance()):
        """:class:`ConversionComparison` of a converted model on the same
        inputs."""
        fp32, stored = fp32_and_exact(
            converted, self.inputs, run=converted_outputs)
        return ConversionComparison(
            **asdict(compare_fp32(stored, self.own, self.exact, tolerance)),
            fp32_error=max(map(relative_error, fp32, self.exact)))


def equalize_checked(model, read_images, check_size,
                     tolerance=Fp32Tolerance()):
    """Equalize the deploy-form RepVGG backbone of a model in place
    (:func:`~mmrepvgg.models.equalization.equalize_backbone`), checked as a
    conversion is (:class:`ConversionCheck`).

    Args:
        model (nn.Module): A segmentor with a deploy-form RepVGG backbone.
        read_images (callable): Returns the calibration image batches, as
            the exported model takes them, on which the activation ranges
            are measured; called once the backbone is known to fit.
        check_size (tuple[int]): ``(height, width)`` of the check's input.
        tolerance (Fp32Tolerance): How close to exact the check asks.

    Returns:
        int: The conv pairs equalized.

    Raises:
        UsageError: The model has no deploy-form RepVGG backbone.
        VerificationError: The equalized model computes something else.
    """
    backbone = getattr(model, 'backbone', None)
    try:
        equalization_pairs(backbone)
    except (TypeError, ValueError) as error:
        raise UsageError(str(error)) from None
    images = read_images()
    check = ConversionCheck(model, [random_input(model, check_size)])
    pairs = equalize_backbone(model, partial(run_on_images, model, images))
    comparison = check.compare(model, tolerance)
    if not comparison.passed:
        raise VerificationError('the equalized model differs from the model '
                                f'({comparison.describe()})')
    return pairs
