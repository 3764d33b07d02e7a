"""Label maps of images, as ``mmseg.apis.inference_model`` computes them on
the deploy model, from an exported model and its metadata alone.

What mmseg does around the graph, step by step:

- preprocessing: the test pipeline's resize, as mmcv's ``Resize`` does it
  (``mmcv.imrescale`` or ``mmcv.imresize``, OpenCV's interpolations);
- inference: the graph on the whole image, or on windows that slide over
  it with their logits averaged where they overlap (``slide_inference``);
- postprocessing: the logits resized bilinearly back to the image's size
  (``align_corners`` as the model's), then their argmax.

The graph normalizes its input itself (see
:class:`mmrepvgg.deploy.logits.ImageSegmentor`).
"""
import os

import cv2
import numpy as np

from ..errors import UsageError
from .engine import EngineSettings, SegmentationEngine
from .images import check_image, fit_within, read_image

__all__ = [
    'RUN_PIXELS', 'CV2_INTERPOLATIONS', 'resized_size', 'resize_logits',
    'Segmenter'
]

# The most pixels a model of any input size runs an image at, in whole
# mode: a Cityscapes frame. Larger images are scaled down to it, and their
# logits brought back up.
RUN_PIXELS = 1024 * 2048
# mmcv's names of OpenCV's interpolations (mmcv.image.geometric).
CV2_INTERPOLATIONS = dict(
    nearest=cv2.INTER_NEAREST,
    bilinear=cv2.INTER_LINEAR,
    bicubic=cv2.INTER_CUBIC,
    area=cv2.INTER_AREA,
    lanczos=cv2.INTER_LANCZOS4)
# Values of logits resized at a time: bands of rows of this many keep the
# memory of postprocessing a large image bounded (64 MB per array).
_BAND_VALUES = 1 << 24


def resized_size(size, resize):
    """``(height, width)`` that mmcv's ``Resize`` makes of an image of
    ``size`` (``mmcv.rescale_size`` with ``keep_ratio``).

    Args:
        size (tuple[int]): ``(height, width)``.
        resize (ResizeStep): The resize.
    """
    height, width = size
    scale_width, scale_height = resize.scale
    if not resize.keep_ratio:
        return scale_height, scale_width
    factor = min(
        max(resize.scale) / max(height, width),
        min(resize.scale) / min(height, width))
    return int(height * factor + 0.5), int(width * factor + 0.5)


def _resize_image(image, size, interpolation='bilinear'):
    """``image`` at ``size`` (height, width), as ``mmcv.imresize``."""
    if tuple(image.shape[:2]) == tuple(size):
        return image
    return cv2.resize(
        image, (size[1], size[0]),
        interpolation=CV2_INTERPOLATIONS[interpolation])


def _source_index(out_size, in_size, align_corners):
    """Where each output sample of a linear resize reads its input, as
    PyTorch's bilinear ``F.interpolate`` computes it in float32: the two
    neighbours and the weight of the second."""
    samples = np.arange(out_size, dtype=np.float32)
    if align_corners:
        scale = np.float32((in_size - 1) /
                           (out_size - 1) if out_size > 1 else 0)
        source = scale * samples
    else:
        scale = np.float32(in_size / out_size)
        source = np.maximum(
            scale * (samples + np.float32(0.5)) - np.float32(0.5),
            np.float32(0))
    first = source.astype(np.int64)
    second = np.minimum(first + 1, in_size - 1)
    weight = source - first.astype(np.float32)
    return first, second, weight


def resize_logits(logits, size, align_corners, rows=None):
    """Yield ``(start, band)``: ``(C, h, w)`` logits resized bilinearly to
    ``size`` (height, width) as mmseg's ``resize`` does, a band of rows at a
    time.

    Args:
        logits (np.ndarray): ``(C, h, w)`` float32.
        size (tuple[int]): ``(height, width)`` of the output.
        align_corners (bool): As ``F.interpolate``'s.
        rows (int, optional): Rows per band; by default as many as keep a
            band within 16M values.
    """
    channels, height, width = logits.shape
    out_height, out_width = size
    if (height, width) == tuple(size):
        yield 0, logits
        return
    top, bottom, row_weight = _source_index(out_height, height, align_corners)
    left, right, column_weight = _source_index(out_width, width, align_corners)
    rows = rows or max(1, _BAND_VALUES // (channels * out_width))
    for start in range(0, out_height, rows):
        band = slice(start, start + rows)
        upper = _columns(logits[:, top[band]], left, right, column_weight)
        lower = _columns(logits[:, bottom[band]], left, right, column_weight)
        weight = row_weight[band, None]
        yield start, (np.float32(1) - weight) * upper + weight * lower


def _columns(rows, left, right, weight):
    return ((np.float32(1) - weight) * rows[..., left] +
            weight * rows[..., right])


def _labels(logits, size, align_corners):
    """The argmax of ``(C, h, w)`` logits resized to ``size``."""
    dtype = np.uint8 if len(logits) <= 256 else np.int32
    labels = np.empty(size, dtype)
    for start, band in resize_logits(logits, size, align_corners):
        labels[start:start + band.shape[1]] = band.argmax(0)
    return labels


def _as_batch(images):
    """``(N, H, W, 3)`` images (or one) as the graph takes them: a float32
    ``(N, 3, H, W)`` batch."""
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    return np.ascontiguousarray(images.transpose(0, 3, 1, 2), np.float32)


def _windows(size, crop_size, stride):
    """The windows of mmseg's ``slide_inference`` over ``size``, as
    ``(top, bottom, left, right)``."""
    height, width = size
    crop_h, crop_w = crop_size
    stride_h, stride_w = stride
    rows = max(height - crop_h + stride_h - 1, 0) // stride_h + 1
    columns = max(width - crop_w + stride_w - 1, 0) // stride_w + 1
    for row in range(rows):
        for column in range(columns):
            bottom = min(row * stride_h + crop_h, height)
            right = min(column * stride_w + crop_w, width)
            top, left = max(bottom - crop_h, 0), max(right - crop_w, 0)
            yield top, bottom, left, right


class Segmenter:
    """Label maps of images from an exported segmentor, as mmseg's
    ``inference_model`` computes them on the model it was exported from.

    Example:
        >>> from mmrepvgg.runtime import Segmenter
        >>> segmenter = Segmenter('model.onnx')
        >>> labels = segmenter('image.png')  # (H, W) class indices

    Args:
        model (str | bytes | SegmentationEngine): An ONNX model exported
            by mmrepvgg (or its bytes), or an engine running one.
        settings (EngineSettings): Engine, precision and threads (of a
            model that is not yet on an engine).
        batch (int): Windows run at once in slide mode. Defaults to 1.

    Attributes:
        engine (SegmentationEngine): The engine that runs the graph.
        info (ExportedModelInfo): The model's metadata: classes, palette,
            resize and test mode.

    Raises:
        MMRepVGGError: A model or settings that cannot run.
    """

    def __init__(self, model, settings=EngineSettings(), batch=1):
        if not isinstance(model, SegmentationEngine):
            model = SegmentationEngine(model, settings)
        if type(batch) is not int or batch < 1:
            raise UsageError(f'batch must be at least 1, got {batch}')
        self.engine, self.info, self.batch = model, model.info, batch

    def __call__(self, image):
        """The label map of an image.

        Args:
            image (str | np.ndarray): An image file, or an ``(H, W, 3)``
                BGR uint8 array as ``cv2.imread`` gives it.

        Returns:
            np.ndarray: ``(H, W)`` class indices (uint8 for up to 256
            classes).
        """
        if isinstance(image, (str, os.PathLike)):
            image = read_image(image)
        check_image(image)
        return self.postprocess(
            self.infer(self.preprocess(image)), image.shape[:2])[0]

    def preprocess(self, image):
        """An ``(H, W, 3)`` uint8 image through the test pipeline's resize,
        as the graph takes it: a float32 ``(1, 3, h, w)`` batch."""
        resize = self.info.resize
        if resize is not None:
            image = _resize_image(image, resized_size(image.shape[:2], resize),
                                  resize.interpolation)
        return _as_batch(image)

    def infer(self, images):
        """What mmseg's ``inference`` gives for a preprocessed batch: the
        logits at its size, whole or from sliding windows.

        Args:
            images (np.ndarray): ``(N, 3, h, w)`` float32 BGR 0-255, all
                of one size.

        Returns:
            tuple[np.ndarray]: ``(N, C, h, w)`` float32 logits, and their
            ``(N, h, w)`` argmax when the graph computed it (else None).
        """
        if self.info.test_mode.mode == 'slide':
            return self._slide(images), None
        return self._whole(images)

    def postprocess(self, outputs, size):
        """The label maps at the image's ``size`` (height, width) of what
        :meth:`infer` gave: its logits resized back, then their argmax."""
        logits, labels = outputs
        if labels is not None and tuple(labels.shape[1:]) == tuple(size):
            dtype = np.uint8 if logits.shape[1] <= 256 else np.int32
            return labels.astype(dtype)
        return np.stack(
            [_labels(one, size, self.info.align_corners) for one in logits])

    def model_size(self, size):
        """The size the graph runs a whole image of ``size`` at: the
        model's input size, or for a model of any size, ``size`` brought
        within :data:`RUN_PIXELS`."""
        if self.info.input_size:
            return tuple(self.info.input_size)
        return fit_within(size, RUN_PIXELS)

    def _whole(self, images):
        """The graph on whole images; a model of another size than the
        images runs them resized to its own, and its logits are resized
        back."""
        size = images.shape[2:]
        model_size = self.model_size(size)
        if model_size == tuple(size):
            return tuple(self.engine(images))
        resized = [
            _resize_image(
                np.ascontiguousarray(image.transpose(1, 2, 0)), model_size)
            for image in images
        ]
        logits = self.engine(_as_batch(np.stack(resized)))[0]
        return np.stack([
            np.concatenate([
                band for _, band in resize_logits(one, size,
                                                  self.info.align_corners)
            ], 1) for one in logits
        ]), None

    def _slide(self, images):
        """mmseg's ``slide_inference``: windows of the crop size, their
        logits summed into the image's and divided by the windows that
        cover each pixel."""
        mode, size = self.info.test_mode, images.shape[2:]
        if self.info.input_size and any(s < c
                                        for s, c in zip(size, mode.crop_size)):
            raise UsageError(
                f'{self.engine.name}: an image of {size[0]}x{size[1]} (after '
                'the test resize) is smaller than its '
                f'{mode.crop_size[0]}x{mode.crop_size[1]} windows; export '
                'it with --dynamic to slide over such images')
        windows = list(_windows(size, mode.crop_size, mode.stride))
        count = np.zeros(size, np.float32)
        for top, bottom, left, right in windows:
            count[top:bottom, left:right] += 1
        results = []
        for image in images:
            summed = None
            for start in range(0, len(windows), self.batch):
                chosen = windows[start:start + self.batch]
                crops = np.stack([
                    image[:, top:bottom, left:right]
                    for top, bottom, left, right in chosen
                ])
                logits = self.engine(crops)[0]
                if summed is None:
                    summed = np.zeros((logits.shape[1], *size), np.float32)
                for (top, bottom, left, right), crop in zip(chosen, logits):
                    summed[:, top:bottom, left:right] += crop
            results.append(summed / count)
        return np.stack(results)
