"""Replacing modules inside a model by others that compute the same thing
in another way: for export (sliced adaptive pooling), for speed (the
folded PSP head); and computing float64 convolutions within memory."""
import torch
import torch.nn.functional as F
from torch.nn.modules.utils import _pair
from torch.overrides import TorchFunctionMode

__all__ = ['replace_modules', 'ChunkedFloat64Convs']


def replace_modules(model, factory):
    """Replace, in place, every module below ``model`` for which
    ``factory(module)`` returns a module (not None) by what it returns; the
    replacements are not searched again.

    Returns:
        int: How many modules were replaced.
    """
    found = []
    for name, module in model.named_modules():
        if name and not any(name.startswith(f + '.') for f, _ in found):
            replacement = factory(module)
            if replacement is not None:
                found.append((name, replacement))
    for name, replacement in found:
        parent, _, attribute = name.rpartition('.')
        setattr(model.get_submodule(parent), attribute, replacement)
    return len(found)


class ChunkedFloat64Convs(TorchFunctionMode):
    """Within it, float64 2-D convolutions sum their input channels a chunk
    at a time, however a model calls them.

    PyTorch computes float64 convolutions (which oneDNN does not) through
    explicit im2col columns of input channels x kernel taps x output
    pixels: 4 GB for a 1792-channel 3x3 conv at 128x256. Chunks of channels
    whose columns take at most ``max_bytes`` stay small; the sum is the
    same up to float64 rounding. Grouped convs run as they are.

    Args:
        max_bytes (int): The most a chunk's columns take.
    """

    def __init__(self, max_bytes=128 << 20):
        super().__init__()
        self.max_bytes = max_bytes

    def __torch_function__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func is torch.conv2d:
            return self._conv2d(*args, **kwargs)
        return func(*args, **kwargs)

    def _conv2d(self,
                input,
                weight,
                bias=None,
                stride=1,
                padding=0,
                dilation=1,
                groups=1):
        channels = self._chunk_channels(input, weight, stride, padding,
                                        dilation)
        if not (input.dtype == torch.float64 and groups == 1
                and channels < weight.shape[1]):
            return F.conv2d(input, weight, bias, stride, padding, dilation,
                            groups)
        out = None
        for start in range(0, weight.shape[1], channels):
            part = F.conv2d(input[:, start:start + channels],
                            weight[:, start:start + channels], None, stride,
                            padding, dilation)
            out = part if out is None else out.add_(part)
        return out if bias is None else out.add_(bias.reshape(1, -1, 1, 1))

    def _chunk_channels(self, input, weight, stride, padding, dilation):
        """Input channels whose im2col columns fit ``max_bytes``; all of
        them for an unbatched input or a padding given by name."""
        if isinstance(padding, str) or input.dim() != 4:
            return weight.shape[1]
        pixels = input.shape[0]
        for size, k, s, p, d in zip(input.shape[2:], weight.shape[2:],
                                    _pair(stride), _pair(padding),
                                    _pair(dilation)):
            pixels *= max(0, (size + 2 * p - d * (k - 1) - 1) // s + 1)
        column = weight.shape[2] * weight.shape[3] * pixels * 8
        return max(1, self.max_bytes // max(column, 1))
