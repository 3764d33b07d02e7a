"""Image files as mmseg reads them (OpenCV's BGR uint8), their size checked
from the file's header before anything is decoded."""
import os.path as osp
import struct

import cv2
import numpy as np

from ..errors import UsageError, first_line

__all__ = [
    'MAX_IMAGE_PIXELS', 'image_size', 'read_image', 'check_image', 'fit_within'
]

# A larger image file is not decoded: its header says how large it is.
MAX_IMAGE_PIXELS = 8192 * 8192
_PNG = b'\x89PNG\r\n\x1a\n'
# JPEG markers without a length, and the start-of-frame markers, which
# hold the size.
_STANDALONE = {0x01, *range(0xd0, 0xda)}
_START_OF_FRAME = set(range(0xc0, 0xd0)) - {0xc4, 0xc8, 0xcc}


def _header_size(header):
    """``(height, width)`` from the first bytes of a PNG or JPEG file; None
    for other formats (or a header cut short)."""
    if header.startswith(_PNG) and header[12:16] == b'IHDR':
        width, height = struct.unpack('>II', header[16:24])
        return height, width
    if not header.startswith(b'\xff\xd8'):
        return None
    pos = 2
    while pos + 4 <= len(header) and header[pos] == 0xff:
        marker = header[pos + 1]
        if marker == 0xff:  # fill byte
            pos += 1
            continue
        if marker in _STANDALONE:
            pos += 2
            continue
        if marker in _START_OF_FRAME and pos + 9 <= len(header):
            return struct.unpack('>HH', header[pos + 5:pos + 9])
        pos += 2 + struct.unpack('>H', header[pos + 2:pos + 4])[0]
    return None


def image_size(path):
    """``(height, width)`` of a PNG or JPEG file from its header (of any
    other format from its decoded pixels), checked.

    Raises:
        UsageError: The file is missing, no readable image, or larger than
            :data:`MAX_IMAGE_PIXELS`.
    """
    return read_image(path, decode=False)


def _check_pixels(path, height, width):
    if height * width > MAX_IMAGE_PIXELS:
        raise UsageError(f'{path}: {width}x{height} is larger than the '
                         f'{MAX_IMAGE_PIXELS:,} pixels read at most')


def read_image(path, decode=True):
    """An image file as ``mmcv.imread`` reads it: ``(H, W, 3)`` BGR uint8,
    its size checked first.

    Args:
        path (str): The file.
        decode (bool): Return the image; False: only its ``(height,
            width)``, from the header where the format allows.

    Raises:
        UsageError: The file is missing, unreadable or too large.
    """
    path = str(path)
    if not osp.isfile(path):
        raise UsageError(f'{path}: no such file')
    try:
        with open(path, 'rb') as f:
            header = f.read(1 << 16)
        size = _header_size(header)
        if size is not None:
            _check_pixels(path, *size)
            if not decode:
                return size
        image = cv2.imread(path, cv2.IMREAD_COLOR)
    except (OSError, cv2.error, struct.error) as error:
        raise UsageError(
            f'{path}: not a readable image ({first_line(error)})') from error
    if image is None or image.ndim != 3:
        raise UsageError(f'{path}: not a readable image')
    _check_pixels(path, *image.shape[:2])
    return image if decode else image.shape[:2]


def check_image(image):
    """Raise UsageError unless ``image`` is an ``(H, W, 3)`` uint8 array
    within :data:`MAX_IMAGE_PIXELS`."""
    if not (isinstance(image, np.ndarray) and image.dtype == np.uint8
            and image.ndim == 3 and image.shape[2] == 3
            and min(image.shape[:2]) > 0):
        raise UsageError('an image is an (H, W, 3) BGR uint8 array, got '
                         f'{getattr(image, "dtype", type(image).__name__)} '
                         f'of shape {getattr(image, "shape", None)}')
    _check_pixels('the image', *image.shape[:2])
    return image


def fit_within(size, pixels):
    """``size`` (height, width), scaled down with its aspect ratio to at
    most ``pixels``; unchanged if it fits."""
    height, width = size
    if height * width <= pixels:
        return tuple(size)
    scale = (pixels / (height * width))**0.5
    return max(1, int(height * scale)), max(1, int(width * scale))
