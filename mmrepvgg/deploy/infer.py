"""Segmenting image files with an exported model, as coloured PNGs."""
import os.path as osp

import cv2
import numpy as np

from ..errors import UsageError
from ..fileio import check_output_path, write_files
from .engines import EngineSettings, SegmentationEngine
from .images import image_size, read_image

__all__ = ['colour_labels', 'overlay', 'segment_images']


def colour_labels(labels, palette):
    """A BGR image of ``labels`` in the RGB ``palette``."""
    palette = np.asarray(palette, np.uint8)
    if labels.max() >= len(palette):
        raise UsageError(f'the model predicted class {labels.max()}, but its '
                         f'palette has {len(palette)} colours')
    return palette[labels][..., ::-1]


def overlay(image, colours, opacity, rows=512):
    """``colours`` blended over a BGR ``image`` with ``opacity``, ``rows``
    at a time (the float copies of a whole large image would take GBs)."""
    blend = np.empty_like(image)
    for start in range(0, image.shape[0], rows):
        band = slice(start, start + rows)
        mixed = (
            image[band].astype(np.float32) * (1 - opacity) +
            colours[band].astype(np.float32) * opacity)
        blend[band] = np.clip(mixed + 0.5, 0, 255)
    return blend


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
                   settings=EngineSettings(),
                   opacity=0.5,
                   force=False):
    """Write ``<name>_labels.png`` (the label map in the dataset's palette)
    and ``<name>_overlay.png`` (it over the image) for every image.

    Every image is checked (its size from its header) before the model is
    loaded; a model of any input size runs large images at most at
    :data:`~mmrepvgg.deploy.engines.RUN_PIXELS`.

    Args:
        model (str): ONNX model written by
            :func:`mmrepvgg.deploy.export.export_onnx`.
        imgs (Sequence[str]): Image files.
        out_dir (str): Folder of the PNGs; created if missing.
        settings (EngineSettings): Engine, precision and threads.
        opacity (float): Of the label colours in the overlay, 0 to 1.
        force (bool): Overwrite existing PNGs.

    Returns:
        list[str]: The files written: all of them, or none on error.
    """
    if not 0 <= opacity <= 1:
        raise UsageError(f'opacity must be between 0 and 1, got {opacity}')
    outputs = _outputs(imgs, out_dir)
    inputs = [model, *imgs]
    for stem in outputs.values():
        for suffix in ('labels', 'overlay'):
            check_output_path(f'{stem}_{suffix}.png', inputs, force)
    for img in imgs:
        image_size(img)
    # One image at a time, perhaps a large one: no memory kept between.
    engine = SegmentationEngine(model, settings.check(), keep_memory=False)
    if not engine.info.palette:
        raise UsageError(f'{model}: its metadata has no palette to colour '
                         'the labels with')
    contents = {}
    for img, stem in outputs.items():
        image = read_image(img)
        colours = colour_labels(engine.predict(image), engine.info.palette)
        contents[f'{stem}_labels.png'] = _png(colours)
        contents[f'{stem}_overlay.png'] = _png(
            overlay(image, colours, opacity))
    write_files(contents, force)
    return list(contents)
