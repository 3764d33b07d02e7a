"""A segmentor as a tensor-to-tensor function, for timing and export."""
import torch
import torch.nn.functional as F
from torch import nn

__all__ = ['SegmentorLogits', 'ImageSegmentor', 'run_on_images']


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


class ImageSegmentor(nn.Module):
    """A segmentor from images to logits and labels, self-contained.

    Its input is what ``mmcv.imread`` gives, as a float32 batch: pixel
    values 0-255 in BGR order, ``(N, 3, H, W)``. The segmentor's data
    preprocessor (channel order, mean and std) runs inside, then
    :class:`SegmentorLogits`; the outputs are the logits ``(N, C, H, W)``
    and the labels ``(N, H, W)``, their argmax.

    Args:
        segmentor (nn.Module): An mmseg ``EncoderDecoder``.
    """

    def __init__(self, segmentor):
        super().__init__()
        preprocessor = segmentor.data_preprocessor
        self.to_rgb = bool(getattr(preprocessor, 'channel_conversion', False))
        normalize = getattr(preprocessor, '_enable_normalize', False)
        # Named so that no traced op's output can clash with them.
        self.register_buffer(
            'pixel_mean',
            preprocessor.mean.reshape(1, -1, 1, 1).clone().float()
            if normalize else torch.zeros(1, 1, 1, 1))
        self.register_buffer(
            'pixel_std',
            preprocessor.std.reshape(1, -1, 1, 1).clone().float()
            if normalize else torch.ones(1, 1, 1, 1))
        self.logits = SegmentorLogits(segmentor)

    def normalize(self, images):
        """The segmentor's own input for ``images``."""
        inputs = images.flip(1) if self.to_rgb else images
        return (inputs - self.pixel_mean) / self.pixel_std

    def forward(self, images):
        logits = self.logits(self.normalize(images))
        return logits, logits.argmax(dim=1)


@torch.no_grad()
def run_on_images(segmentor, images):
    """Run a segmentor from images to logits over image batches (as
    :class:`ImageSegmentor` takes them), for what hooks observe: the
    activations that calibration measures."""
    model = ImageSegmentor(segmentor)
    for batch in images:
        model(batch)
