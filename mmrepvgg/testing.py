"""Toy data for tests and demos: a small Cityscapes-layout dataset of a few
classes, each with its own colour and shape, that a segmentor learns within
minutes on a CPU (mmseg's ``CityscapesDataset`` reads it unchanged), and
configs that train on it offline; a real Cityscapes folder gets such a
config too.
"""
import glob
import os.path as osp
import re

import cv2
import numpy as np
import torch

from .checkpoint import load_checkpoint
from .errors import UsageError
from .fileio import write_files

# Cityscapes train ids and the RGB colours they are drawn in here.
ROAD, BUILDING, VEGETATION, SKY, PERSON, CAR = 0, 2, 8, 10, 11, 13
_COLOURS = {
    ROAD: (128, 64, 128),
    BUILDING: (70, 70, 70),
    VEGETATION: (60, 160, 40),
    SKY: (90, 150, 230),
    PERSON: (220, 20, 60),
    CAR: (0, 0, 142),
}
CITY = 'toytown'
# Cityscapes' label of pixels that no class covers.
IGNORE_INDEX = 255
# The end of the names of Cityscapes' train-id label maps.
_LABELS = '_gtFine_labelTrainIds.png'

__all__ = [
    'make_toy_cityscapes', 'write_toy_config', 'majority_class_miou',
    'HOSTILE_BLOCKS', 'make_quantization_hostile', 'cityscapes_images',
    'write_cityscapes_config'
]


def _draw_scene(rng, height, width):
    labels = np.full((height, width), ROAD, np.uint8)
    horizon = int(height * rng.uniform(0.35, 0.5))
    skyline = int(horizon * rng.uniform(0.3, 0.6))
    labels[:skyline] = SKY
    labels[skyline:horizon] = BUILDING
    for _ in range(rng.integers(1, 3)):
        radius = int(height * rng.uniform(0.08, 0.15))
        center = (int(rng.integers(0, width)), int(horizon))
        cv2.circle(labels, center, radius, VEGETATION, -1)
    for _ in range(rng.integers(1, 3)):
        w, h = int(width * rng.uniform(0.12, 0.2)), int(height * 0.15)
        x, y = int(rng.integers(0, width - w)), int(
            rng.integers(horizon, height - h))
        labels[y:y + h, x:x + w] = CAR
    for _ in range(rng.integers(1, 3)):
        axes = (int(width * 0.02) + 1, int(height * 0.12))
        center = (int(rng.integers(0, width)),
                  int(rng.integers(horizon, height - axes[1])))
        cv2.ellipse(labels, center, axes, 0, 0, 360, PERSON, -1)
    image = np.zeros((height, width, 3), np.float32)
    for train_id, colour in _COLOURS.items():
        image[labels == train_id] = colour
    image += rng.normal(0, 12, image.shape)
    return np.clip(image, 0, 255).astype(np.uint8), labels


def make_toy_cityscapes(root,
                        num_train=8,
                        num_val=4,
                        height=64,
                        width=128,
                        seed=0):
    """Write a toy dataset in Cityscapes' layout under ``root``.

    Images go to ``leftImg8bit/{split}/toytown/*_leftImg8bit.png`` and
    train-id label maps to ``gtFine/{split}/toytown/
    *_gtFine_labelTrainIds.png``.

    Args:
        root (str): Dataset root; created if missing.
        num_train (int): Training images. Defaults to 8.
        num_val (int): Validation images. Defaults to 4.
        height (int): Image height. Defaults to 64.
        width (int): Image width. Defaults to 128.
        seed (int): Seed of the scene generator. Defaults to 0.

    Returns:
        str: ``root``.
    """
    rng = np.random.default_rng(seed)
    files = {}
    for split, count in (('train', num_train), ('val', num_val)):
        for index in range(count):
            image, labels = _draw_scene(rng, height, width)
            image = cv2.cvtColor(image, cv2.COLOR_RGB2BGR)
            stem = f'{split}/{CITY}/{CITY}_{index:06d}_000019'
            files[f'{root}/leftImg8bit/{stem}_leftImg8bit.png'] = _png(image)
            files[f'{root}/gtFine/{stem}{_LABELS}'] = _png(labels)
    write_files(files, force=True)
    return root


def _png(image):
    return cv2.imencode('.png', image)[1].tobytes()


def majority_class_miou(data_root, split='val'):
    """mIoU (%) of predicting the most frequent class everywhere, on a
    Cityscapes-layout dataset: the reference for "above chance".

    That class scores its pixel share as IoU, every other class present
    scores 0.
    """
    counts = np.zeros(IGNORE_INDEX + 1, np.int64)
    for path in _label_maps(data_root, split):
        labels = cv2.imread(path, cv2.IMREAD_UNCHANGED)
        counts += np.bincount(labels.ravel(), minlength=counts.size)
    counts = counts[:IGNORE_INDEX]
    return 100 * counts.max() / counts.sum() / np.count_nonzero(counts)


_TOY_CONFIG = '''\
# Derived from {base} to train on a toy Cityscapes-layout dataset.
_base_ = {base!r}
crop_size = {crop!r}
data_preprocessor = dict(size=crop_size)
model = dict(
    data_preprocessor=data_preprocessor,
    backbone=dict(init_cfg=None))
train_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='RandomFlip', prob=0.5),
    dict(type='PackSegInputs'),
]
test_pipeline = [
    dict(type='LoadImageFromFile'),
    dict(type='LoadAnnotations'),
    dict(type='PackSegInputs'),
]
train_dataloader = dict(
    batch_size={batch_size},
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root={data_root!r}, pipeline=train_pipeline))
val_dataloader = dict(
    batch_size=1,
    num_workers=0,
    persistent_workers=False,
    dataset=dict(data_root={data_root!r}, pipeline=test_pipeline))
test_dataloader = val_dataloader
optim_wrapper = dict(optimizer=dict(lr={lr}))
param_scheduler = [
    dict(type='PolyLR', eta_min=1e-4, power=0.9, begin=0, end={iters},
         by_epoch=False)
]
train_cfg = dict(
    type='IterBasedTrainLoop', max_iters={iters}, val_interval={iters})
default_hooks = dict(
    logger=dict(type='LoggerHook', interval={log_interval},
                log_metric_by_epoch=False),
    checkpoint=dict(type='CheckpointHook', by_epoch=False,
                    interval={checkpoint_interval}))
randomness = dict(seed={seed})
'''


def write_toy_config(base,
                     data_root,
                     out,
                     iters=4,
                     crop=(64, 128),
                     batch_size=2,
                     lr=0.01,
                     checkpoint_interval=None,
                     log_interval=1,
                     seed=0):
    """Write a config that trains ``base`` on a toy dataset, offline.

    The derived config inherits everything from ``base`` and changes only
    what the toy data needs: no ImageNet download (the backbone starts from
    its default initialization), small crops without resizing, a short
    schedule, and single-process data loading.

    Args:
        base (str): Path of the config to derive from.
        data_root (str): Root of a Cityscapes-layout dataset, such as one
            written by :func:`make_toy_cityscapes`.
        out (str): Where to write the derived config.
        iters (int): Training iterations. Defaults to 4.
        crop (tuple[int]): ``(height, width)`` of the inputs.
            Defaults to ``(64, 128)``.
        batch_size (int): Training batch size per process. Defaults to 2.
        lr (float): Learning rate. Defaults to 0.01.
        checkpoint_interval (int, optional): Iterations between checkpoints.
            Defaults to ``iters``.
        log_interval (int): Iterations between log lines. Defaults to 1.
        seed (int): Random seed. Defaults to 0.

    Returns:
        str: ``out``.
    """
    text = _TOY_CONFIG.format(
        base=osp.abspath(base),
        crop=tuple(crop),
        data_root=osp.abspath(data_root),
        batch_size=batch_size,
        lr=lr,
        iters=iters,
        checkpoint_interval=checkpoint_interval or iters,
        log_interval=log_interval,
        seed=seed)
    write_files({out: text.encode()}, force=True)
    return out


# Blocks of a RepVGG-A0 backbone whose outputs make_quantization_hostile
# blows up. On the toy PSPNet of the tests (64x128), plain PTQ then keeps
# 96.6% of the fp32 labels and the two convs that read those outputs, kept
# in fp32, 99.6%. The effect on labels is not monotonic in the factor and
# the channels: a factor of 512 or 128 channels kept 98%-99%.
HOSTILE_BLOCKS = ('stage_3.9', 'stage_3.10')


def _block_names(weights):
    """The backbone's blocks in order (``stem``, ``stage_1.0``, ...)."""
    found = (re.match(r'backbone\.(.+?)\.branch_3x3\.', k) for k in weights)
    return list(dict.fromkeys(match.group(1) for match in found if match))


def _scale_outputs(weights, block, channels, factor):
    """Scale the block's output in ``channels`` by ``factor``."""
    for norm in ('branch_3x3.norm', 'branch_1x1.norm', 'branch_norm'):
        for name in ('weight', 'bias'):
            key = f'backbone.{block}.{norm}.{name}'
            if key in weights:
                weights[key][channels] *= factor


def _scale_inputs(weights, block, channels, factor, eps):
    """Make the block compute what it did on inputs whose ``channels`` are
    ``factor`` times larger."""
    for conv in ('branch_3x3', 'branch_1x1'):
        weights[f'backbone.{block}.{conv}.conv.weight'][:, channels] /= factor
    prefix = f'backbone.{block}.branch_norm.'
    if prefix + 'running_mean' in weights:
        weights[prefix + 'running_mean'][channels] *= factor
        var = weights[prefix + 'running_var']
        var[channels] = factor**2 * (var[channels] + eps) - eps


def make_quantization_hostile(checkpoint,
                              out,
                              blocks=HOSTILE_BLOCKS,
                              channels=96,
                              factor=256.0,
                              eps=1e-5):
    """Write a trained RepVGG checkpoint that computes what it did in fp32
    but quantizes as badly as ImageNet RepVGGs do.

    Trained ImageNet RepVGGs have BN statistics that give a few channels of
    some blocks a far wider range than the rest (Chu et al., "Make RepVGG
    Greater Again", AAAI 2024), so one per-tensor int8 scale leaves the
    other channels few levels. Here the first ``channels`` output channels
    of each of ``blocks`` are made ``factor`` times larger (their BN weights
    and biases, in every branch) and the next block takes them back (its
    conv weights on them divided, its identity BN's statistics scaled), so
    that the float model is unchanged up to rounding.

    Args:
        checkpoint (str): A trained (not deploy) RepVGG checkpoint.
        out (str): Where to write the hostile checkpoint.
        blocks (Sequence[str]): Backbone blocks, e.g. ``'stage_2.1'``.
        channels (int): Output channels made larger in each block.
        factor (float): How much larger.
        eps (float): The BNs' epsilon.

    Returns:
        str: ``out``.
    """
    contents = load_checkpoint(checkpoint).contents
    weights = contents['state_dict']
    order = _block_names(weights)
    index = torch.arange(channels)
    for block in blocks:
        following = order[order.index(block) + 1]
        _scale_outputs(weights, block, index, factor)
        _scale_inputs(weights, following, index, factor, eps)
    torch.save(contents, out)
    return out


def _label_maps(data_root, split):
    return glob.glob(osp.join(data_root, 'gtFine', split, '*', '*' + _LABELS))


def cityscapes_images(data_root, split='val'):
    """The images of a split of a Cityscapes folder, sorted.

    Args:
        data_root (str): The folder.
        split (str): ``'train'`` or ``'val'``.

    Raises:
        UsageError: The split lacks the images or the train-id labels that
            mmseg's ``CityscapesDataset`` reads.
    """
    images = glob.glob(osp.join(data_root, 'leftImg8bit', split, '*', '*.png'))
    if not images:
        raise UsageError(f'{data_root}: not a Cityscapes folder (no images in '
                         f'leftImg8bit/{split}/*/)')
    if not _label_maps(data_root, split):
        raise UsageError(
            f'{data_root}: gtFine/{split} holds no *_labelTrainIds.png; '
            "create them with mmseg's tools/dataset_converters/cityscapes.py")
    return sorted(images)


_CITYSCAPES_CONFIG = '''\
# Derived from {base} to train on the Cityscapes folder {data_root}.
_base_ = {base!r}
train_dataloader = dict(dataset=dict(data_root={data_root!r}))
val_dataloader = dict(dataset=dict(data_root={data_root!r}))
test_dataloader = val_dataloader
train_cfg = dict(max_iters={iters}, val_interval={iters})
default_hooks = dict(checkpoint=dict(by_epoch=False, interval={iters}))
'''


def write_cityscapes_config(base, data_root, out, iters):
    """Write to ``out`` (and return it) a config that trains ``base`` on a
    Cityscapes folder, with ``base``'s own pipelines and initialization.

    Args:
        base (str): Path of the config to derive from.
        data_root (str): The folder (see :func:`cityscapes_images`).
        out (str): Where to write the derived config.
        iters (int): Training iterations, validated and saved after.
    """
    text = _CITYSCAPES_CONFIG.format(
        base=osp.abspath(base), data_root=osp.abspath(data_root), iters=iters)
    write_files({out: text.encode()}, force=True)
    return out
