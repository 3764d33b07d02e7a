"""Expensive setup that the tests share: one trained toy PSPNet."""
import glob
import os.path as osp
from dataclasses import dataclass
from typing import List

import pytest

from helpers import PSPNET_A0, mim, output
from mmrepvgg.testing import make_toy_cityscapes, write_toy_config

TRAIN_ITERS = 4


@dataclass
class TrainedPSPNet:
    """A toy PSPNet-RepVGG-A0 (the shipped SyncBN config) trained by
    ``mim train mmsegmentation``, as users run it."""
    config: str
    checkpoint: str
    work_dir: str
    data_root: str
    val_images: List[str]
    iters: int = TRAIN_ITERS


@pytest.fixture(scope='session')
def trained_pspnet(tmp_path_factory):
    root = tmp_path_factory.mktemp('trained_pspnet')
    data_root = make_toy_cityscapes(str(root / 'data'), num_train=8, num_val=4)
    config = write_toy_config(
        PSPNET_A0, data_root, str(root / 'pspnet_toy.py'), iters=TRAIN_ITERS)
    work_dir = root / 'train'
    result = mim('train', 'mmsegmentation', config, '--work-dir', work_dir)
    assert result.returncode == 0, output(result)
    images = sorted(
        glob.glob(osp.join(data_root, 'leftImg8bit', 'val', '*', '*.png')))
    return TrainedPSPNet(config, str(work_dir / f'iter_{TRAIN_ITERS}.pth'),
                         str(work_dir), data_root, images)
