"""Replacing modules inside a model by others that compute the same thing
in another way: for export (sliced adaptive pooling), for speed (the
folded PSP head), and for float64 references within memory (chunked
convolutions)."""
import torch.nn.functional as F
from torch import nn

__all__ = ['replace_modules', 'ChunkedConv2d']


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


class ChunkedConv2d(nn.Module):
    """An ``nn.Conv2d`` that sums its input channels ``chunk`` at a time.

    PyTorch computes float64 convolutions (which oneDNN does not) through
    explicit im2col columns of input channels x kernel taps x output
    pixels: 4 GB for a 1792-channel 3x3 conv at 128x256. Chunk by chunk
    they stay small; the sum is the same up to float64 rounding.

    Args:
        conv (nn.Conv2d): Ungrouped, zero-padded; kept, not copied.
        chunk (int): Input channels at a time. Defaults to 128.
    """

    def __init__(self, conv, chunk=128):
        super().__init__()
        self.conv = conv
        self.chunk = chunk

    def forward(self, x):
        conv = self.conv
        out = None
        for start in range(0, conv.in_channels, self.chunk):
            part = F.conv2d(x[:, start:start + self.chunk],
                            conv.weight[:, start:start + self.chunk], None,
                            conv.stride, conv.padding, conv.dilation)
            out = part if out is None else out.add_(part)
        if conv.bias is not None:
            out += conv.bias.reshape(1, -1, 1, 1)
        return out

    @classmethod
    def of(cls, module, chunk=128):
        """A chunked form of ``module`` if it is a conv that gains from
        one, else None (for :func:`replace_modules`)."""
        if (type(module) is nn.Conv2d and module.groups == 1
                and module.padding_mode == 'zeros'
                and isinstance(module.padding, tuple)
                and module.in_channels > chunk):
            return cls(module, chunk)
        return None
