"""Images: the size limits, batches as the exported model takes them, and
a config's test pipeline.

Every image a tool reads goes through the runtime's :func:`read_image`
(:mod:`mmrepvgg.runtime.images`), which checks the size in the file's
header before decoding it; every model input a tool checks or runs stays
within :data:`MAX_INPUT_PIXELS`.
"""

import mmcv
import numpy as np
import torch
from mmengine.dataset import Compose
from mmengine.registry import DATASETS, TRANSFORMS

from ..errors import ConfigError, UsageError, first_line
from ..runtime.images import fit_within, image_size, read_image
from .test_settings import test_transforms

__all__ = [
    'MAX_INPUT_PIXELS', 'image_size', 'read_image', 'as_batch',
    'check_input_size', 'fit_within', 'TestPipeline', 'dataset_image_paths',
    'split_images'
]

# The largest input a model is checked or run on: a 2048x2048 input checks
# PSPNet-RepVGG-B2 in a few GB.
MAX_INPUT_PIXELS = 2048 * 2048


def as_batch(image, size=None):
    """An ``(H, W, 3)`` image as the exported model takes it: a float32
    ``(1, 3, H, W)`` batch, resized to ``size`` (height, width) if given."""
    if size is not None and tuple(size) != image.shape[:2]:
        image = mmcv.imresize(image, tuple(size[::-1]))
    return torch.from_numpy(image.astype(np.float32)).permute(2, 0, 1)[None]


def check_input_size(size, minimum=1):
    """Raise UsageError unless ``size`` is a (height, width) of integers of
    at least ``minimum`` within :data:`MAX_INPUT_PIXELS`."""
    if len(size) != 2 or not all(
            isinstance(s, int) and s >= minimum for s in size):
        raise UsageError(f'an input size is two integers of at least '
                         f'{minimum} (height width), got '
                         f'{" ".join(map(str, size))}')
    if size[0] * size[1] > MAX_INPUT_PIXELS:
        raise UsageError(f'an input of {size[0]}x{size[1]} is larger than the '
                         f'{MAX_INPUT_PIXELS:,} pixels a model is run on at '
                         'most')


class TestPipeline:
    """A config's test pipeline (its test dataset's, else
    ``test_pipeline``) without its loading steps, run on images that
    :func:`read_image` read, with its checks.

    Args:
        cfg (Config): The config.

    Raises:
        ConfigError: The config has no test pipeline.
    """

    def __init__(self, cfg):
        transforms = test_transforms(cfg)
        if not isinstance(transforms, (list, tuple)) or not transforms:
            raise ConfigError(f'{cfg.filename}: has no test pipeline')
        try:
            # In the config's own scope (mmseg's transforms), whatever scope
            # this process used last.
            with TRANSFORMS.switch_scope_and_registry(
                    cfg.get('default_scope')) as registry:
                self._pipeline = Compose([
                    registry.build(t) for t in transforms
                    if 'Load' not in str(t.get('type'))
                ])
        except (AttributeError, KeyError, TypeError, ValueError) as error:
            raise ConfigError(
                f'{cfg.filename}: its test pipeline does not build '
                f'({type(error).__name__}: {first_line(error)})') from error

    def __call__(self, image, path=''):
        """The packed results (``inputs``, ``data_samples``) of an
        ``(H, W, 3)`` BGR image."""
        shape = image.shape[:2]
        results = self._pipeline(
            dict(img=image, img_shape=shape, ori_shape=shape, img_path=path))
        if not isinstance(results, dict) or 'inputs' not in results:
            raise ConfigError('the test pipeline does not pack its results '
                              "into 'inputs' (no PackSegInputs at its end?)")
        return results

    def output_size(self, size):
        """``(height, width)`` that the pipeline makes of an image of
        ``size``."""
        image = np.zeros((*size, 3), np.uint8)
        return tuple(self(image)['inputs'].shape[-2:])


def _leaf_datasets(dataset_cfg):
    """The configs of the datasets inside dataset wrappers
    (``RepeatDataset``, ``ConcatDataset``, ...), or the config itself."""
    if isinstance(dataset_cfg.get('dataset'), dict):
        return _leaf_datasets(dataset_cfg['dataset'])
    if isinstance(dataset_cfg.get('datasets'), (list, tuple)):
        return [
            leaf for child in dataset_cfg['datasets']
            for leaf in _leaf_datasets(child)
        ]
    return [dataset_cfg]


def _image_paths(cfg, dataset_cfg, split):
    try:
        with DATASETS.switch_scope_and_registry(
                cfg.get('default_scope')) as registry:
            dataset = registry.build(
                dict(dataset_cfg, pipeline=[], lazy_init=False))
        return [
            dataset.get_data_info(i)['img_path'] for i in range(len(dataset))
        ]
    except Exception as error:  # datasets fail in any way on bad roots
        raise UsageError(f'no {split} images to read ({type(error).__name__}:'
                         f' {first_line(error)})') from error


def dataset_image_paths(cfg, split, count):
    """``count`` image files of a dataset split of the config, spread
    evenly over it; dataset wrappers are looked through and each image is
    taken once.

    Args:
        cfg (Config): A config with ``{split}_dataloader``.
        split (str): ``'train'``, ``'val'`` or ``'test'``.
        count (int): How many; fewer if the split is smaller.

    Raises:
        UsageError: ``count`` < 1, or the split lists no images (its data
            root missing or empty).
        ConfigError: The config has no such split.
    """
    if count < 1:
        raise UsageError(f'the number of {split} images must be at least 1, '
                         f'got {count}')
    dataset_cfg = (cfg.get(f'{split}_dataloader') or {}).get('dataset')
    if not isinstance(dataset_cfg, dict):
        raise ConfigError(f'{cfg.filename}: has no {split}_dataloader dataset')
    paths = list(
        dict.fromkeys(
            path for leaf in _leaf_datasets(dataset_cfg)
            for path in _image_paths(cfg, leaf, split)))
    if not paths:
        raise UsageError(f'the {split} split of {cfg.filename} lists no '
                         'images')
    chosen = np.linspace(0, len(paths) - 1, min(count, len(paths)))
    return [paths[int(round(i))] for i in chosen]


def split_images(cfg, split, count, size):
    """``count`` images of a dataset split of the config
    (:func:`dataset_image_paths`) through its test pipeline, as the
    exported model takes them at ``size`` (None: as the pipeline makes
    them)."""
    pipeline = TestPipeline(cfg)
    batches = []
    for path in dataset_image_paths(cfg, split, count):
        inputs = pipeline(read_image(path), path)['inputs']
        batches.append(as_batch(inputs.permute(1, 2, 0).numpy(), size))
    return batches
