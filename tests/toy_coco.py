"""A tiny COCO-format detection and instance set for tests.

Each image shows a few filled boxes of two COCO classes on a noisy
background, annotated with their boxes and polygon masks, so mmdet's
``CocoDataset`` reads it with its default 80 classes.
"""
import json
import os.path as osp

import cv2
import numpy as np
from mmengine.utils import mkdir_or_exist

# COCO category ids and names, and the BGR colours they are drawn in here.
_CATEGORIES = {1: ('person', (60, 20, 220)), 3: ('car', (142, 0, 0))}


def make_toy_coco(root, num_images=4, height=128, width=128, seed=0):
    """Write images to ``root/images`` and ``root/annotations.json``.

    Args:
        root (str): Dataset root; created if missing.
        num_images (int): Number of images. Defaults to 4.
        height (int): Image height. Defaults to 128.
        width (int): Image width. Defaults to 128.
        seed (int): Seed of the generator. Defaults to 0.

    Returns:
        str: Path of the annotation file.
    """
    rng = np.random.default_rng(seed)
    mkdir_or_exist(osp.join(root, 'images'))
    images, annotations = [], []
    for image_id in range(1, num_images + 1):
        image = rng.normal(110, 20, (height, width, 3))
        for category_id in rng.choice(list(_CATEGORIES), size=3):
            w, h = rng.integers(width // 6, width // 2, size=2)
            x, y = rng.integers(0, width - w), rng.integers(0, height - h)
            image[y:y + h, x:x + w] = _CATEGORIES[category_id][1]
            corners = [x, y, x + w, y, x + w, y + h, x, y + h]
            annotations.append(
                dict(
                    id=len(annotations) + 1,
                    image_id=image_id,
                    category_id=int(category_id),
                    bbox=[int(x), int(y), int(w),
                          int(h)],
                    area=int(w * h),
                    segmentation=[[int(c) for c in corners]],
                    iscrowd=0))
        file_name = f'{image_id:06d}.png'
        cv2.imwrite(
            osp.join(root, 'images', file_name),
            np.clip(image, 0, 255).astype(np.uint8))
        images.append(
            dict(id=image_id, file_name=file_name, height=height, width=width))
    ann_file = osp.join(root, 'annotations.json')
    with open(ann_file, 'w') as f:
        json.dump(
            dict(
                images=images,
                annotations=annotations,
                categories=[
                    dict(id=i, name=name)
                    for i, (name, _) in _CATEGORIES.items()
                ]), f)
    return ann_file
