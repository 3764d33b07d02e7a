"""Replacing modules inside a model by others that compute the same thing
in another way: for export (sliced adaptive pooling), for speed (the
folded PSP head), and for float64 references within memory (chunked
convolutions)."""
import torch
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


class ChunkedConv2d(nn.Conv2d):
    """An ``nn.Conv2d`` that sums its input channels ``chunk`` at a time.

    PyTorch computes float64 convolutions (which oneDNN does not) through
    explicit im2col columns of input channels x kernel taps x output
    pixels: 4 GB for a 1792-channel 3x3 conv at 128x256. Chunk by chunk
    they stay small; the sum is the same up to float64 rounding. Build one
    with :meth:`of`.
    """
    chunk = 128

    def _conv_forward(self, input, weight, bias):
        out = None
        for start in range(0, self.in_channels, self.chunk):
            part = F.conv2d(input[:, start:start + self.chunk],
                            weight[:, start:start + self.chunk], None,
                            self.stride, self.padding, self.dilation)
            out = part if out is None else out.add_(part)
        return out if bias is None else out + bias.reshape(1, -1, 1, 1)

    @classmethod
    def of(cls, module):
        """A chunked conv with the parameters of ``module``, if it is an
        ungrouped, zero-padded conv of more input channels than a chunk;
        else None (for :func:`replace_modules`)."""
        if not (type(module) is nn.Conv2d and module.groups == 1
                and module.padding_mode == 'zeros'
                and not isinstance(module.padding, str)
                and module.in_channels > cls.chunk):
            return None
        with torch.device('meta'):
            chunked = cls(
                module.in_channels,
                module.out_channels,
                module.kernel_size,
                stride=module.stride,
                padding=module.padding,
                dilation=module.dilation,
                bias=module.bias is not None)
        chunked.weight, chunked.bias = module.weight, module.bias
        return chunked.train(module.training)
