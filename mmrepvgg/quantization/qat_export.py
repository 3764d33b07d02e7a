"""Exporting a QAT checkpoint: each fake quantizer becomes a
QuantizeLinear/DequantizeLinear pair with the scale and zero point it
trained."""
from dataclasses import asdict, dataclass

import onnx
import torch
import torch.nn.functional as F
from torch import nn
from torch.ao.quantization import FakeQuantizeBase
# Defines the quantized_decomposed ops that FrozenFakeQuantize calls.
from torch.ao.quantization.fx import _decomposed  # noqa: F401

from ..cli import option
from ..deploy.export import ExportResult
from ..deploy.graph import exportable, to_onnx
from ..deploy.images import split_images
from ..deploy.loading import LoadedModel
from ..deploy.logits import ImageSegmentor
from ..deploy.model_info import set_info
from ..deploy.modules import replace_modules
from ..errors import UsageError
from .agreement import check_agreement, measure_agreement
from .fake_quant import QATConv2d
from .training import QAT_META_KEY, QAT_SCHEME, load_qat_model

__all__ = [
    'MIN_QAT_AGREEMENT', 'QATExportSettings', 'FrozenFakeQuantize',
    'FrozenQATConv2d', 'frozen_for_export', 'export_qat'
]

# The share of pixels whose exported labels must equal the QAT model's own.
MIN_QAT_AGREEMENT = 0.999


@dataclass
class QATExportSettings:
    """How :func:`export_qat` checks an exported QAT model (each field is
    an option of ``tools/export.py``, whose help says what it sets); labels
    that agree less than ``min_agreement`` write nothing."""
    eval_num: int = option(
        8, 'validation images to compare the exported QAT model with the '
        'QAT model on')
    min_agreement: float = option(
        MIN_QAT_AGREEMENT, 'share of pixels whose ONNX Runtime label must '
        "equal the QAT model's own")

    def check(self):
        """Raise UsageError for settings that cannot be met."""
        if self.eval_num < 1:
            raise UsageError('--qat-eval-num must be at least 1')
        if not 0 <= self.min_agreement <= 1:
            raise UsageError('--qat-min-agreement is a share of pixels, from '
                             f'0 to 1; got {self.min_agreement}')


class FrozenFakeQuantize(nn.Module):
    """A fake quantizer's eval-mode computation with its scale and zero
    point fixed, in PyTorch's ``quantized_decomposed`` ops, which the ONNX
    exporter writes as QuantizeLinear and DequantizeLinear (``torch.export``
    traces neither ``FakeQuantize``'s switches nor its kernel at a free
    batch size).

    Args:
        quantizer (FakeQuantizeBase): The trained fake quantizer.
    """

    def __init__(self, quantizer):
        super().__init__()
        self.bounds = (quantizer.quant_min, quantizer.quant_max,
                       torch.uint8 if quantizer.quant_min == 0 else torch.int8)
        self.axis = quantizer.ch_axis if quantizer.is_per_channel else None
        scale, zero_point = quantizer.scale.detach(), quantizer.zero_point
        if self.axis is None:
            # Python numbers: constants to the exporter.
            self.qparams = (float(scale), int(zero_point))
        else:
            self.register_buffer('scale', scale.float().clone())
            self.register_buffer('zero_point', zero_point.int().clone())

    def _call(self, name, x):
        ops = torch.ops.quantized_decomposed
        if self.axis is None:
            op, qparams = f'{name}_per_tensor', self.qparams
        else:
            op = f'{name}_per_channel'
            qparams = (self.scale, self.zero_point, self.axis)
        return getattr(ops, op)(x, *qparams, *self.bounds)

    def quantize(self, x):
        """The integers ``x`` rounds to."""
        return self._call('quantize', x)

    def dequantize(self, q):
        """The values of integers ``q``."""
        return self._call('dequantize', q)

    def forward(self, x):
        return self.dequantize(self.quantize(x))


class FrozenQATConv2d(nn.Module):
    """A trained :class:`QATConv2d` for export: its input fake-quantized
    with fixed parameters, its weights stored as the int8 values they round
    to, behind a DequantizeLinear, as OpenVINO and ONNX Runtime take them.

    Args:
        conv (QATConv2d): The trained conv.
    """

    def __init__(self, conv):
        super().__init__()
        if conv.padding_mode != 'zeros':
            raise UsageError(f'cannot export a conv with {conv.padding_mode} '
                             'padding in int8')
        self.input_fake_quant = FrozenFakeQuantize(conv.input_fake_quant)
        self.weight_fake_quant = FrozenFakeQuantize(conv.weight_fake_quant)
        self.register_buffer(
            'int_weight',
            self.weight_fake_quant.quantize(conv.weight.detach()))
        self.register_buffer(
            'bias', None if conv.bias is None else conv.bias.detach().clone())
        self.conv_args = (conv.stride, conv.padding, conv.dilation,
                          conv.groups)

    def forward(self, x):
        weight = self.weight_fake_quant.dequantize(self.int_weight)
        return F.conv2d(
            self.input_fake_quant(x), weight, self.bias, *self.conv_args)


def frozen_for_export(module):
    """The export form of a trained :class:`QATConv2d` or fake quantizer,
    or None for another module (for
    :func:`~mmrepvgg.deploy.modules.replace_modules`)."""
    if isinstance(module, QATConv2d):
        return FrozenQATConv2d(module)
    if isinstance(module, FakeQuantizeBase):
        return FrozenFakeQuantize(module)
    return None


def export_qat(job, settings=QATExportSettings()):
    """Export a QAT checkpoint as a QDQ ONNX model in the cpu int8 scheme,
    its labels on ONNX Runtime checked against the QAT model's own
    (PyTorch, fake-quantized) on images of the config's validation set, and
    write it.

    Args:
        job (ExportJob): What to export: the config QAT trained (its own,
            or the one written to the work dir) and a QAT checkpoint.
        settings (QATExportSettings): How it is checked.

    Returns:
        ExportResult: What was written; ``info.agreement`` is the check.

    Raises:
        UsageError: Images to check on, or not a QAT checkpoint.
        VerificationError: Fewer labels agree than asked; nothing is
            written.
    """
    settings.check()
    if job.imgs:
        raise UsageError(f'{job.checkpoint}: is a QAT checkpoint, checked '
                         "on the config's validation images, not on --img")
    model, loaded = load_qat_model(job.cfg, job.checkpoint, job.config)
    module = exportable(model)
    replace_modules(module, frozen_for_export)
    info = job.info(LoadedModel(model, loaded, True))
    info.precision, info.int8_scheme = 'int8', QAT_SCHEME
    info.calibration = dict(qat=loaded.meta[QAT_META_KEY])
    data = to_onnx(module, job.size, job.dynamic)
    images = split_images(job.cfg, 'val', settings.eval_num, job.size)
    with torch.no_grad():
        reference = ImageSegmentor(model).eval()
        outputs = [[t.numpy() for t in reference(b)] for b in images]
    agreement = measure_agreement(data, outputs, images, 'val')
    check_agreement(
        agreement, settings.min_agreement, reference='the QAT model')
    info.agreement = dict(asdict(agreement), reference='qat')
    proto = onnx.load_from_string(data)
    set_info(proto, info)
    job.write(proto.SerializeToString())
    return ExportResult(job.out, job.size, job.dynamic, None, 0,
                        agreement.images, ['onnxruntime'], None, info)
