"""Segmenting image files with an exported model, as coloured PNGs."""
import os.path as osp

import cv2
import numpy as np

from ..errors import UsageError
from ..fileio import check_output_path, write_files
from .onnx_model import load_image
from .runtime import SegmentationEngine


def colour_labels(labels, palette):
    """A BGR image of ``labels`` in the RGB ``palette``."""
    palette = np.asarray(palette, np.uint8)
    if labels.max() >= len(palette):
        raise UsageError(f'the model predicted class {labels.max()}, but its '
                         f'palette has {len(palette)} colours')
    return palette[labels][..., ::-1]


def overlay(image, colours, opacity):
    """``colours`` blended over a BGR ``image`` with ``opacity``."""
    blend = image.astype(np.float32) * (1 - opacity) + colours * opacity
    return np.clip(blend + 0.5, 0, 255).astype(np.uint8)


def _png(image):
    ok, data = cv2.imencode('.png', image)
    if not ok:
        raise RuntimeError(f'OpenCV could not encode a {image.shape} PNG')
    return data.tobytes()


def _outputs(imgs, out_dir):
    names = {}
    for img in imgs:
        stem = osp.splitext(osp.basename(img))[0]
        if stem in names:
            raise UsageError(f'{img} and {names[stem]} would write the same '
                             f'files ({stem}_*.png)')
        names[stem] = img
    return {img: osp.join(out_dir, stem) for stem, img in names.items()}


def segment_images(model,
                   imgs,
                   out_dir,
                   backend='onnxruntime',
                   precision='fp32',
                   threads=None,
                   opacity=0.5,
                   force=False):
    """Write ``<name>_labels.png`` (the label map in the dataset's palette)
    and ``<name>_overlay.png`` (it over the image) for every image.

    Args:
        model (str): ONNX model written by
            :func:`mmrepvgg.deploy.export.export_onnx`.
        imgs (Sequence[str]): Image files.
        out_dir (str): Folder of the PNGs; created if missing.
        backend (str): ``'onnxruntime'`` or ``'openvino'``.
        precision (str): ``'fp32'`` or ``'bf16'`` (OpenVINO).
        threads (int, optional): Engine threads.
        opacity (float): Of the label colours in the overlay, 0 to 1.
        force (bool): Overwrite existing PNGs.

    Returns:
        list[str]: The files written: all of them, or none on error.
    """
    if not 0 <= opacity <= 1:
        raise UsageError(f'opacity must be between 0 and 1, got {opacity}')
    engine = SegmentationEngine(model, backend, threads, precision)
    if not engine.info.palette:
        raise UsageError(f'{model}: its metadata has no palette to colour '
                         'the labels with')
    contents = {}
    for img, stem in _outputs(imgs, out_dir).items():
        image = load_image(img)
        colours = colour_labels(engine.predict(image), engine.info.palette)
        for suffix, picture in (('labels', colours),
                                ('overlay', overlay(image, colours, opacity))):
            path = f'{stem}_{suffix}.png'
            check_output_path(path, imgs, force)
            contents[path] = _png(picture)
    write_files(contents, force)
    return list(contents)
