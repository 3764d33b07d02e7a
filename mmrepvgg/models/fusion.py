"""The re-parameterization math, in one place: folding batch norms into
convolutions, in float64 (callers cast the result back to the dtype of the
weights they replace).
"""
import torch
from torch import nn

__all__ = ['fuse_conv_bn', 'identity_kernel', 'add_centered', 'is_batch_norm']


def fuse_conv_bn(kernel, norm, bias=None):
    """Fold a batch norm into the convolution kernel that feeds it.

    ``norm(conv(x, kernel) + bias)`` equals ``conv(x, fused_kernel) +
    fused_bias`` in eval mode, with ``fused_kernel = kernel * gamma / std``
    and ``fused_bias = beta + (bias - mean) * gamma / std``.

    Args:
        kernel (Tensor): Convolution kernel of shape ``(C_out, C_in/g, k, k)``
            that feeds ``norm``.
        norm (nn.Module): Any batch norm with running statistics (BN,
            SyncBN, mmcv's MMSyncBN, ...).
        bias (Tensor, optional): The convolution's bias. Defaults to None
            (no bias).

    Returns:
        tuple[Tensor, Tensor]: The fused kernel and bias, in float64.
    """
    mean, var = _running_stats(norm)
    std = (var.double() + norm.eps).sqrt()
    gamma = _affine(norm, 'weight', 1.0)
    beta = _affine(norm, 'bias', 0.0)
    scale = gamma / std
    fused_kernel = kernel.detach().double() * scale.reshape(-1, 1, 1, 1)
    shift = mean.double() if bias is None else mean.double() - bias.double()
    return fused_kernel, beta - shift * scale


def identity_kernel(channels, groups, kernel_size=3, device=None):
    """A ``kernel_size`` kernel whose grouped convolution is the identity.

    Args:
        channels (int): Input and output channels.
        groups (int): Convolution groups.
        kernel_size (int): Odd kernel size. Defaults to 3.
        device (torch.device, optional): Device of the kernel.

    Returns:
        Tensor: float64 kernel of shape
        ``(channels, channels // groups, k, k)``.
    """
    shape = (channels, channels // groups, kernel_size, kernel_size)
    kernel = torch.zeros(shape, dtype=torch.float64, device=device)
    center = kernel_size // 2
    index = torch.arange(channels, device=device)
    kernel[index, index % shape[1], center, center] = 1
    return kernel


def add_centered(kernel, small):
    """Add a smaller centred square kernel into ``kernel``, in place.

    Both kernels keep their centre tap at offset 0, so the sum computes the
    sum of both convolutions at any dilation. Returns ``kernel``.
    """
    start = (kernel.shape[-1] - small.shape[-1]) // 2
    end = start + small.shape[-1]
    kernel[..., start:end, start:end] += small
    return kernel


def _running_stats(norm):
    mean = getattr(norm, 'running_mean', None)
    var = getattr(norm, 'running_var', None)
    if mean is None or var is None:
        raise TypeError(
            f'cannot fuse {type(norm).__name__}: re-parameterization needs a '
            'batch norm that tracks running statistics')
    return mean, var


def _affine(norm, name, default):
    param = getattr(norm, name, None)
    if param is None:
        return torch.full_like(norm.running_mean, default, dtype=torch.float64)
    return param.detach().double()


def is_batch_norm(module):
    """Whether ``module`` normalizes with running statistics that can fuse."""
    return isinstance(module, nn.modules.batchnorm._BatchNorm) or (hasattr(
        module, 'running_mean') and hasattr(module, 'running_var'))
