"""Checking that a converted or exported model computes what its source
did."""
import os.path as osp

import torch
from mmengine.dataset import Compose, pseudo_collate
from mmengine.structures import BaseDataElement
from PIL import Image
from torch import nn

from ..config import inference_transforms
from ..errors import ConfigError, UsageError, first_line
from .convert import deploy_roots

# Verification runs whole images through the model: a limit on their size
# keeps a huge image from taking all memory (a 2048x2048 input checks
# PSPNet-RepVGG-B2 in a few GB).
MAX_INPUT_PIXELS = 2048 * 2048
# A larger image file is not even decoded.
MAX_IMAGE_PIXELS = 8192 * 8192


def relative_error(actual, expected):
    """``max|actual - expected| / max|expected|`` (the plain difference
    where ``expected`` is all zeros)."""
    actual, expected = actual.double(), expected.double()
    scale = expected.abs().max()
    difference = (actual - expected).abs().max()
    if scale == 0:
        return difference.item()
    return (difference / scale).item()


class _RootsDone(Exception):
    """Ends a verification forward once every converted module has run."""


def converted_outputs(model, data):
    """The outputs of the modules that conversion changes (see
    :func:`mmrepvgg.deploy.convert.deploy_roots`), for one
    tensor-mode forward of ``model`` on ``data``.

    The rest of the model is the same before and after conversion and is not
    run: a detector's final outputs pass through discrete steps (proposal
    ranking) that would amplify rounding.

    Args:
        model (nn.Module): An OpenMMLab model (``model(**data,
            mode='tensor')``).
        data (dict): ``inputs`` and ``data_samples``.

    Returns:
        list[Tensor]: Every tensor the roots returned, in order.
    """
    roots = deploy_roots(model)
    outputs, finished = [], set()

    def record(name, output):
        outputs.extend(t.detach().clone() for t in _tensors(output))
        finished.add(name)
        if len(finished) == len(roots):
            raise _RootsDone

    handles = [
        model.get_submodule(name).register_forward_hook(
            lambda module, args, output, name=name: record(name, output))
        for name in roots
    ]
    try:
        with torch.no_grad():
            model(**data, mode='tensor')
    except _RootsDone:
        pass
    finally:
        for handle in handles:
            handle.remove()
    return outputs


def _tensors(output):
    if isinstance(output, torch.Tensor):
        return [output]
    if isinstance(output, (list, tuple)):
        return [t for item in output for t in _tensors(item)]
    return []


def check_input_size(size):
    """Raise UsageError unless ``size`` is a (height, width) of positive
    integers within :data:`MAX_INPUT_PIXELS`."""
    if len(size) != 2 or not all(isinstance(s, int) and s >= 1 for s in size):
        raise UsageError(f'an input size is two positive integers (height '
                         f'width), got {" ".join(map(str, size))}')
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise UsageError(f'an input of {size[0]}x{size[1]} is larger than the '
                         f'{MAX_INPUT_PIXELS:,} pixels verified at most')


def random_input(model, size, seed=0):
    """A seeded random batch of one for ``model``'s tensor-mode forward:
    ``inputs`` of ``size`` (height, width) with the channels of the model's
    first conv, and image metas that two-stage detectors read."""
    in_channels = next(m for m in model.modules()
                       if isinstance(m, nn.Conv2d)).in_channels
    generator = torch.Generator().manual_seed(seed)
    inputs = torch.randn(1, in_channels, *size, generator=generator)
    shape = tuple(size)
    meta = dict(
        img_shape=shape,
        ori_shape=shape,
        pad_shape=shape,
        batch_input_shape=shape,
        scale_factor=(1.0, 1.0))
    return dict(inputs=inputs, data_samples=[BaseDataElement(metainfo=meta)])


def image_input(cfg, model, img):
    """``img`` read through the config's test pipeline (without loading
    annotations) and ``model``'s data preprocessor.

    Raises:
        UsageError: The image is missing, unreadable, or larger than
            :data:`MAX_IMAGE_PIXELS`, or the pipeline makes it larger than
            :data:`MAX_INPUT_PIXELS`.
        ConfigError: The config has no test pipeline.
    """
    check_image_file(img)
    transforms = inference_transforms(cfg, leave_out=('LoadAnnotations', ))
    if not transforms:
        raise ConfigError(
            f'{cfg.filename}: has no test pipeline to read {img} with')
    pipeline = Compose(transforms)
    try:
        data = pipeline(dict(img_path=img, img_id=0))
    except Exception as error:  # any transform may fail on a bad image
        raise UsageError(
            f'{img}: not a readable image '
            f'({type(error).__name__}: {first_line(error)})') from None
    height, width = data['inputs'].shape[-2:]
    if height * width > MAX_INPUT_PIXELS:
        raise UsageError(
            f'{img}: the test pipeline makes it a {height}x{width} input, '
            f'larger than the {MAX_INPUT_PIXELS:,} pixels verified at most; '
            'resize it first')
    return model.data_preprocessor(pseudo_collate([data]), False)


def check_image_file(img):
    if not osp.isfile(img):
        raise UsageError(f'{img}: no such file')
    try:
        with Image.open(img) as image:  # reads the header only
            width, height = image.size
    except Exception as error:  # Pillow raises many kinds
        raise UsageError(
            f'{img}: not a readable image '
            f'({type(error).__name__}: {first_line(error)})') from None
    if width * height > MAX_IMAGE_PIXELS:
        raise UsageError(f'{img}: {width}x{height} is larger than the '
                         f'{MAX_IMAGE_PIXELS:,} pixels read at most')
