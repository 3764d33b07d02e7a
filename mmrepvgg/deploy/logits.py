"""A segmentor as a tensor-to-tensor function, for timing and export."""
import torch.nn.functional as F
from torch import nn


class SegmentorLogits(nn.Module):
    """Class logits at the input resolution, as mmseg's whole-image
    inference computes them from preprocessed inputs.

    Args:
        segmentor (nn.Module): An mmseg ``EncoderDecoder``.
    """

    def __init__(self, segmentor):
        super().__init__()
        self.segmentor = segmentor

    def forward(self, inputs):
        logits = self.segmentor(inputs, mode='tensor')
        return F.interpolate(
            logits,
            size=inputs.shape[2:],
            mode='bilinear',
            align_corners=self.segmentor.align_corners)
