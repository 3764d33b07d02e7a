"""Checking that a converted or exported model computes what its source
did."""
import os.path as osp

import torch
from mmengine.dataset import Compose, pseudo_collate
from mmengine.structures import BaseDataElement
from torch import nn

from ..errors import ConfigError, UsageError
from .convert import deploy_roots


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
    :func:`mmrepvgg.deploy.convert.deploy_roots`), in float32, for one
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
        outputs.extend(t.detach().float().clone() for t in _tensors(output))
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
        UsageError: The image is missing or unreadable.
        ConfigError: The config has no test pipeline.
    """
    if not osp.isfile(img):
        raise UsageError(f'{img}: no such file')
    dataset = cfg.get('test_dataloader', {}).get('dataset', {})
    transforms = dataset.get('pipeline') or cfg.get('test_pipeline')
    if not transforms:
        raise ConfigError(
            f'{cfg.filename}: has no test pipeline to read {img} with')
    pipeline = Compose(
        [t for t in transforms if 'LoadAnnotations' not in str(t['type'])])
    data = pseudo_collate([pipeline(dict(img_path=img, img_id=0))])
    return model.data_preprocessor(data, False)
