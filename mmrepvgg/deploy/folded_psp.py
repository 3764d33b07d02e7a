"""PSPNet's pyramid pooling folded into its bottleneck conv, for inference
(docs/user_guides/conversion.md gives the speed-ups).

In eval mode everything between mmseg's ``PSPHead`` branch outputs and its
bottleneck's activation is linear, so the bottleneck conv over the
upsampled maps can run on the tiny pooled maps instead: bilinear
upsampling is a product ``A_h @ u @ A_w.T`` with interpolation matrices,
each conv tap only shifts the rows of ``A_h`` and ``A_w`` (zero rows where
it reads the padding), and adaptive average pooling is one matrix product.
Only the summation order changes: float64 heads agree to about 1e-15.
"""
from functools import partial

import torch
import torch.nn.functional as F
from mmseg.models.decode_heads import PSPHead
from torch import nn
from torch.nn.modules.utils import _pair

from ..models.fusion import fuse_conv_bn, is_batch_norm
from .modules import replace_modules

__all__ = ['FoldedPSPHead', 'fold_psp_heads', 'foldable_psp_head']


def _interpolation_matrix(size, length, align_corners):
    """``(size, length)`` weights of linear interpolation from ``length`` to
    ``size`` samples, as ``F.interpolate`` computes them."""
    basis = torch.eye(length, dtype=torch.float64).unsqueeze(0)
    return F.interpolate(
        basis, size=size, mode='linear', align_corners=align_corners)[0].T


def _pooling_matrix(length, bins):
    """``(bins, length)`` weights of adaptive average pooling."""
    basis = torch.eye(length, dtype=torch.float64).unsqueeze(0)
    return F.adaptive_avg_pool1d(basis, bins)[0].T.contiguous()


def _tap_rows(matrix, conv, axis):
    """The rows of ``matrix`` that each tap of ``conv`` along ``axis``
    reads, zero where it reads padding: ``(taps, rows, columns)``."""
    rows, dilation = matrix.shape[0], conv.dilation[axis]
    padded = F.pad(matrix, (0, 0, conv.padding[axis], conv.padding[axis]))
    return torch.stack([
        padded[t * dilation:t * dilation + rows]
        for t in range(conv.kernel_size[axis])
    ])


def _check_foldable(head):
    if type(head) is not PSPHead:
        # A subclass may compute something else than what is folded here.
        raise ValueError(f'can fold an mmseg PSPHead, not a '
                         f'{type(head).__name__}')
    bottleneck = head.bottleneck
    conv = bottleneck.conv
    if head.training:
        raise ValueError('fold an eval-mode PSPHead: call model.eval() first')
    if type(conv) is not nn.Conv2d or conv.groups != 1 or _pair(
            conv.stride) != (1, 1) or conv.padding_mode != 'zeros':
        raise ValueError('cannot fold a PSPHead whose bottleneck is not a '
                         'plain stride-1, ungrouped, zero-padded nn.Conv2d')
    if any(2 * p != d * (k - 1)
           for p, d, k in zip(conv.padding, conv.dilation, conv.kernel_size)):
        raise ValueError("cannot fold a PSPHead whose bottleneck changes the "
                         "features' size")
    if bottleneck.with_norm and not (is_batch_norm(bottleneck.norm) and
                                     bottleneck.norm.running_var is not None):
        raise ValueError('cannot fold a PSPHead whose bottleneck norm has no '
                         'running statistics')
    if bottleneck.with_norm and conv.bias is not None:
        raise ValueError('cannot fold a PSPHead whose bottleneck conv has a '
                         'bias before its norm')
    if bottleneck.order != ('conv', 'norm', 'act'):
        raise ValueError('cannot fold a PSPHead whose bottleneck does not '
                         'normalize and activate after its conv')
    for branch in head.psp_modules:
        if not (len(branch) == 2
                and isinstance(branch[0], nn.AdaptiveAvgPool2d) and all(
                    isinstance(s, int) for s in _pair(branch[0].output_size))):
            raise ValueError('cannot fold a PSPHead whose pyramid branches '
                             'do not start with adaptive average pooling')


class FoldedPSPHead(nn.Module):
    """An eval-mode mmseg ``PSPHead`` with its pyramid pooling folded into
    the bottleneck conv; it computes the same logits, faster.

    The bottleneck's batch norm is folded into its kernel, from the weights
    and statistics the head has when it is wrapped: wrap a trained head.
    The pyramid branches' own 1x1 ConvModules and the classifier run
    unchanged. Everything else a segmentor asks of its decode head
    (``predict``, ``align_corners``, ...) is the wrapped head's.

    Args:
        head (PSPHead): In eval mode. Kept, not modified.
    """

    def __init__(self, head):
        super().__init__()
        _check_foldable(head)
        self.head = head
        bottleneck = head.bottleneck
        conv = bottleneck.conv
        kernel, bias = conv.weight.detach(), conv.bias
        if bottleneck.with_norm:
            kernel, bias = fuse_conv_bn(kernel, bottleneck.norm)
        bias = kernel.new_zeros(len(kernel)) if bias is None else bias.detach()
        # Input channels of the bottleneck: x first, then one slice per
        # branch, in the order of ``torch.cat`` in PSPHead.
        split = head.in_channels
        buffers = dict(
            feature_kernel=kernel[:, :split],
            branch_kernels=kernel[:, split:],
            bias=bias)
        for name, value in buffers.items():
            self.register_buffer(
                name,
                value.to(conv.weight, copy=True).contiguous(),
                persistent=False)
        self.bins = [
            _pair(branch[0].output_size) for branch in head.psp_modules
        ]
        self._matrices = {}

    def train(self, mode=True):
        if mode:
            raise RuntimeError('FoldedPSPHead is for inference only: '
                               'train the PSPHead it wraps')
        return super().train(False)

    def __getattr__(self, name):
        try:
            return super().__getattr__(name)
        except AttributeError:
            return getattr(super().__getattr__('head'), name)

    def _folding_matrices(self, height, width, dtype, device):
        """Pooling of all branches, ``(H * W, sum of bins)``, and per branch
        the rows ``(k_h, H, bins_h)`` of its upsampling as the bottleneck's
        taps read them; the columns ``(sum of k_w * bins_w, W)`` of all
        branches. Cached per feature size."""
        key = (height, width, dtype, device)
        if key not in self._matrices:
            conv = self.head.bottleneck.conv
            upsampling = partial(
                _interpolation_matrix, align_corners=self.head.align_corners)
            pooling, rows, columns = [], [], []
            for bins_h, bins_w in self.bins:
                pooling.append(
                    torch.kron(
                        _pooling_matrix(height, bins_h),
                        _pooling_matrix(width, bins_w)))
                rows.append(_tap_rows(upsampling(height, bins_h), conv, 0))
                tap_columns = _tap_rows(upsampling(width, bins_w), conv, 1)
                columns.append(tap_columns.transpose(1, 2).flatten(0, 1))
            placed = dict(dtype=dtype, device=device)
            self._matrices[key] = (torch.cat(pooling).T.to(**placed),
                                   [r.to(**placed) for r in rows],
                                   torch.cat(columns).to(**placed))
        return self._matrices[key]

    def forward(self, inputs):
        """Class logits, as ``PSPHead.forward`` computes them."""
        head = self.head
        x = head._transform_inputs(inputs)
        n, c, height, width = x.shape
        pooling, rows, columns = self._folding_matrices(
            height, width, x.dtype, x.device)
        conv = head.bottleneck.conv
        out = F.conv2d(x, self.feature_kernel, self.bias, conv.stride,
                       conv.padding, conv.dilation)
        pooled = x.flatten(2).matmul(pooling).split(
            [bins_h * bins_w for bins_h, bins_w in self.bins], dim=2)
        kernels = self.branch_kernels.split(head.channels, dim=1)
        terms = []
        for branch, bins, kernel, branch_rows, branch_pooled in zip(
                head.psp_modules, self.bins, kernels, rows, pooled):
            features = branch[1](branch_pooled.reshape(n, c, *bins))
            # Each tap (i, j) of the kernel on the tiny map, then the tap's
            # rows of the upsampling; its columns follow in one product.
            per_tap = torch.einsum('ocij,ncab->nijaob', kernel, features)
            terms.append(
                torch.einsum('iya,nijaob->noyjb', branch_rows,
                             per_tap).flatten(3))
        out = out + torch.cat(terms, dim=3).matmul(columns)
        if head.bottleneck.with_activation:
            out = head.bottleneck.activate(out)
        return head.cls_seg(out)

    def predict(self, inputs, batch_img_metas, test_cfg):
        """Segmentation logits resized to the images, as
        ``PSPHead.predict`` computes them."""
        return self.head.predict_by_feat(self(inputs), batch_img_metas)


def fold_psp_heads(model):
    """Replace every ``PSPHead`` in an eval-mode model by a
    :class:`FoldedPSPHead`, in place. Subclasses of ``PSPHead`` are left
    alone: their forward may differ.

    Args:
        model (nn.Module): A segmentor (or any module) in eval mode.

    Returns:
        int: How many heads were folded.
    """
    if isinstance(model, PSPHead):
        raise ValueError('cannot replace the model itself: use '
                         'FoldedPSPHead(head)')
    return replace_modules(
        model, lambda m: FoldedPSPHead(m) if type(m) is PSPHead else None)


def foldable_psp_head(module):
    """For :func:`~mmrepvgg.deploy.modules.replace_modules`: a
    :class:`FoldedPSPHead` of ``module`` if it is an eval-mode mmseg
    ``PSPHead`` that folds; a folded head itself, so that the head inside
    is left alone; else None."""
    if isinstance(module, FoldedPSPHead):
        return module
    if type(module) is not PSPHead:
        return None
    try:
        return FoldedPSPHead(module)
    except ValueError:
        return None
