"""Calibrated post-training INT8 of exported segmentors
(``docs/deployment/int8.md`` says how, and why these choices).

An fp32 model exported and checked by
:func:`mmrepvgg.deploy.export.export_fp32` becomes a QDQ model with
per-channel 8-bit weights in one of :data:`~.model_info.INT8_SCHEMES`,
calibrated on images of the config's training set; its agreement with the
fp32 model is measured on images of the validation set. When too few labels
agree, the RepVGG backbone is equalized, then the convs whose outputs
int8 moves most are kept in fp32, fewest first, up to a limit.
"""
import os.path as osp
import tempfile
from contextlib import contextmanager
from dataclasses import asdict, dataclass, replace
from functools import cached_property, partial

from ..cli import option
from ..deploy.compare import Fp32Tolerance
from ..deploy.export import export_fp32
from ..deploy.images import split_images
from ..deploy.model_info import INPUT, INT8_SCHEMES, set_info
from ..errors import UsageError
from ..logs import quiet
from ..models.equalization import equalizable
from .agreement import Agreement, check_agreement, measure_agreement, run_onnx
from .mixed_precision import convs_of, sensitivities, transplant

__all__ = [
    'EQUALIZE_MODES', 'Int8Settings', 'quantize_int8', 'int8_model',
    'export_int8'
]

# When the backbone is equalized before int8: when full int8 of the model
# as it is misses the agreement asked (and the backbone is a RepVGG), on
# every export, or never.
EQUALIZE_MODES = ('auto', 'always', 'never')


@dataclass
class Int8Settings:
    """How :func:`export_int8` quantizes to int8. Each field is an option
    of ``tools/export.py``, whose help says what it sets. Labels that agree
    less than ``min_agreement`` with ``max_float`` convs in fp32 write
    nothing; the model that ``equalize`` gives
    (:mod:`mmrepvgg.models.equalization`) computes the same function with
    other weights, and is exported and checked on the engines as the model
    is."""
    calib_num: int = option(16, 'training images to calibrate on')
    eval_num: int = option(8, 'validation images to measure the agreement on')
    min_agreement: float = option(
        0.99, "share of pixels whose int8 label must equal the fp32 one")
    max_float: int = option(
        3, 'the most convs kept in fp32, the most sensitive first, if full '
        'int8 misses --min-agreement')
    scheme: str = option(
        'cpu', 'cpu: unsigned activations with zero points (ONNX Runtime, '
        'OpenVINO); tensorrt: signed symmetric activations, zero point 0 '
        "(TensorRT's explicit quantization)",
        flag='--int8-scheme')
    equalize: str = option(
        'auto',
        "equalize the ranges of the channels between the RepVGG backbone's "
        'blocks, as the calibration images activate them, before '
        'calibrating (for models whose BN statistics made a few channels '
        'far wider than the rest): auto, when full int8 misses '
        '--min-agreement, before any conv is kept in fp32; always; never',
        flag='--int8-equalize',
        metavar='{' + ','.join(EQUALIZE_MODES) + '}')
    report: bool = option(
        False,
        'rank every conv by how far its output moves when it alone computes '
        'in int8, print the ranking and keep it in the metadata (measured '
        'anyway when a conv is kept in fp32)',
        flag='--int8-report')

    def check(self):
        """Raise UsageError for settings that cannot be met."""
        if self.calib_num < 1 or self.eval_num < 1:
            raise UsageError('--calib-num and --eval-num must be at least 1')
        if not 0 <= self.min_agreement <= 1:
            raise UsageError(f'--min-agreement is a share of pixels, from 0 '
                             f'to 1; got {self.min_agreement}')
        if self.max_float < 0:
            raise UsageError(f'--max-float is a number of convs, at least 0; '
                             f'got {self.max_float}')
        if self.equalize not in EQUALIZE_MODES:
            raise UsageError(f'--int8-equalize must be one of '
                             f'{", ".join(EQUALIZE_MODES)}; got '
                             f'{self.equalize!r}')
        if self.scheme not in INT8_SCHEMES:
            raise UsageError(f'--int8-scheme must be one of '
                             f'{", ".join(INT8_SCHEMES)}; got {self.scheme!r}')


class _Batches:
    """An ONNX Runtime calibration data reader over image batches."""

    def __init__(self, batches):
        self._batches = iter(batches)

    def get_next(self):
        batch = next(self._batches, None)
        return None if batch is None else {INPUT: batch.numpy()}

    def rewind(self):
        raise NotImplementedError('calibration reads its images once')


def _outer_nodes(proto):
    # The normalization before the first conv and the resize and argmax
    # after the last one.
    nodes = list(proto.graph.node)
    convs = [i for i, n in enumerate(nodes) if n.op_type == 'Conv']
    return [n.name for n in nodes[:convs[0]] + nodes[convs[-1] + 1:]]


# quantize_static's options of each scheme; weights are per-channel,
# symmetric int8 in both. In the cpu scheme a ReLU before an unsigned
# activation is dropped (its zero point at the bottom of the range clamps
# as it did), so that ONNX Runtime fuses conv, ReLU and requantization.
_SCHEMES = dict(
    cpu=dict(activation_type='QUInt8', extra_options={}),
    tensorrt=dict(
        activation_type='QInt8', extra_options=dict(ActivationSymmetric=True)))


def quantize_int8(model, calibration, scheme='cpu', outer_fp32=True):
    """An int8 QDQ model of an fp32 one.

    Args:
        model (bytes): The fp32 ONNX model.
        calibration (Sequence[Tensor]): Image batches the activation ranges
            are calibrated on.
        scheme (str): One of :data:`~.model_info.INT8_SCHEMES`.
        outer_fp32 (bool): Keep the operators before the first conv and
            after the last in fp32 (a segmentor's normalization, resize and
            argmax).

    Returns:
        onnx.ModelProto: The int8 model, with the fp32 model's metadata.
    """
    import onnx
    from onnxruntime.quantization import (CalibrationMethod, QuantFormat,
                                          QuantType, quantize_static)
    proto = onnx.load_from_string(model)
    options = _SCHEMES[scheme]
    # ONNX Runtime writes the model, and its calibration copy, to files.
    with _quiet_quantizer(), tempfile.TemporaryDirectory(
            prefix='mmrepvgg_int8_') as folder:
        out = osp.join(folder, 'int8.onnx')
        quantize_static(
            proto,
            out,
            _Batches(calibration),
            quant_format=QuantFormat.QDQ,
            per_channel=True,
            activation_type=QuantType[options['activation_type']],
            weight_type=QuantType.QInt8,
            calibrate_method=CalibrationMethod.MinMax,
            nodes_to_exclude=_outer_nodes(proto) if outer_fp32 else [],
            extra_options=dict(options['extra_options']))
        return onnx.load(out)


@contextmanager
def _quiet_quantizer():
    """ONNX Runtime's quantizer logs advice on every run; a full temporary
    folder becomes one line."""
    import onnxruntime
    onnxruntime.set_default_logger_severity(3)
    try:
        with quiet():
            yield
    except OSError as error:
        raise UsageError(f'cannot quantize in {tempfile.gettempdir()} '
                         f'({error.strerror or error})') from error
    finally:
        onnxruntime.set_default_logger_severity(2)  # its default


@dataclass(frozen=True)
class _Candidate:
    """An fp32 model to quantize: the model, its full int8 model (every
    conv in int8) and that model's :class:`Agreement`, the conv pairs
    equalized in it, and how its int8 models are checked. :meth:`keep`
    gives its int8 models with its most sensitive convs in fp32; the convs'
    sensitivity is measured only for a conv to keep (or the metadata of the
    model written)."""
    fp32: object  # onnx.ModelProto
    int8: object
    agreement: Agreement
    equalized_pairs: int
    measure: '_Measure'

    @cached_property
    def ranking(self):
        """:func:`~.mixed_precision.sensitivities` of its convs."""
        return sensitivities(self.int8, self.fp32, self.measure.calibration)

    def __len__(self):
        """The convs it can keep in fp32."""
        return len(convs_of(self.fp32))

    def keep(self, count):
        """The :class:`_Int8` with the ``count`` most sensitive convs in
        fp32 (none: the full int8 model)."""
        if not count:
            return _Int8(self.int8, self.agreement, [], self)
        kept = [s.conv for s in self.ranking[:count]]
        nodes = {c.node for c in convs_of(self.fp32) if c.name in kept}
        model = transplant(self.int8, self.fp32, nodes, 'fp32')
        agreement = replace(
            self.measure.agreement(model),
            all_int8_labels=self.agreement.labels,
            unequalized_labels=self.agreement.unequalized_labels,
            equalized_labels=self.agreement.equalized_labels)
        return _Int8(model, agreement, kept, self)


@dataclass(frozen=True)
class _Int8:
    """The int8 model of a candidate with convs kept in fp32, its
    agreement, those convs, and the candidate."""
    model: object
    agreement: Agreement
    kept: list
    candidate: _Candidate


@dataclass(frozen=True)
class _Measure:
    """The images an int8 model is calibrated and checked on, and the fp32
    model's outputs on the checked ones."""
    calibration: list
    held_out: list
    reference: list
    scheme: str

    def candidate(self, fp32):
        """The :class:`_Candidate` of an :class:`Fp32Export`."""
        import onnx
        int8 = quantize_int8(fp32.data, self.calibration, self.scheme)
        return _Candidate(
            onnx.load_from_string(fp32.data), int8, self.agreement(int8),
            fp32.result.info.equalized_pairs, self)

    def agreement(self, int8):
        return measure_agreement(int8.SerializeToString(), self.reference,
                                 self.held_out, 'val')


def _candidates(measure, fp32, equalize, min_agreement):
    """The models to quantize, the one whose full int8 keeps more labels
    first: the fp32 model and, if its full int8 misses ``min_agreement``
    and ``equalize``, the equalized one."""
    plain = measure.candidate(fp32)
    if plain.agreement.labels >= min_agreement or not equalize:
        return [plain]
    equalized = measure.candidate(fp32.equalized(lambda: measure.calibration))
    equalized = replace(
        equalized,
        agreement=replace(
            equalized.agreement, unequalized_labels=plain.agreement.labels))
    plain = replace(
        plain,
        agreement=replace(
            plain.agreement, equalized_labels=equalized.agreement.labels))
    return sorted([plain, equalized], key=lambda c: -c.agreement.labels)


def _fewest_float(candidates, min_agreement, max_float):
    """The first :class:`_Int8` whose labels agree as asked, with the fewest
    convs in fp32 (at most ``max_float``) and, at equal count, from the
    first candidate; else, of each candidate's model with the most convs in
    fp32, the one that agreed most."""
    last = {}
    for count in range(max_float + 1):
        for index, candidate in enumerate(candidates):
            if count <= len(candidate):
                last[index] = candidate.keep(count)
                if last[index].agreement.labels >= min_agreement:
                    return last[index]
    return max(last.values(), key=lambda t: t.agreement.labels)


def int8_model(fp32, settings, equalize=False):
    """An int8 model of an fp32 one, calibrated and checked as ``settings``
    say, with its calibration, the convs kept in fp32, their sensitivity
    (measured only to keep a conv or for ``settings.report``) and its
    agreement in its metadata.

    When full int8 misses ``settings.min_agreement``, the equalized model
    (:meth:`~mmrepvgg.deploy.export.Fp32Export.equalized`, if
    ``equalize``) is quantized too; then the most sensitive convs are put
    in fp32, fewest first, each count tried in the model whose full int8
    kept more labels, then in the other.

    Args:
        fp32 (Fp32Export): The fp32 model; its config's training set
            calibrates and its validation set checks the int8 model. Its
            ``result.info`` is updated.
        settings (Int8Settings): How to quantize.
        equalize (bool): Whether to try the equalized model too.

    Returns:
        bytes: The int8 model.

    Raises:
        VerificationError: Its labels agree less than asked, with as many
            convs in fp32 as allowed.
    """
    cfg, size = fp32.job.cfg, fp32.job.size
    held_out = split_images(cfg, 'val', settings.eval_num, size)
    measure = _Measure(
        split_images(cfg, 'train', settings.calib_num, size), held_out,
        run_onnx(fp32.data, held_out), settings.scheme)
    candidates = _candidates(measure, fp32, equalize, settings.min_agreement)
    best = _fewest_float(candidates, settings.min_agreement,
                         settings.max_float)
    check_agreement(best.agreement, settings.min_agreement, len(best.kept))
    info = fp32.result.info
    info.precision = 'int8'
    info.int8_scheme = settings.scheme
    info.calibration = dict(split='train', images=len(measure.calibration))
    info.agreement = asdict(best.agreement)
    info.float_convs = best.kept
    # A run with an int8 copy of every conv: measured when needed or asked.
    info.sensitivity = (
        best.candidate.ranking if best.kept or settings.report else [])
    info.equalized_pairs = best.candidate.equalized_pairs
    set_info(best.model, info)
    return best.model.SerializeToString()


def export_int8(job, settings, tolerance=Fp32Tolerance()):
    """Export a segmentor in int8 and write it: its fp32 model exported and
    checked on the engines (:func:`~mmrepvgg.deploy.export.export_fp32`),
    equalized first if ``settings`` say so, then quantized
    (:func:`int8_model`).

    Args:
        job (ExportJob): What to export; a trained or deploy checkpoint.
        settings (Int8Settings): How to quantize.
        tolerance (Fp32Tolerance): How close the fp32 model's logits must
            be to the exact ones on the engines.

    Returns:
        ExportResult: What was written; ``check`` is the fp32 model's.

    Raises:
        MMRepVGGError: Bad input, an fp32 model that an engine does not
            compute as PyTorch does, or int8 labels that agree less than
            asked; nothing is written.
    """
    settings.check()
    calibration = partial(split_images, job.cfg, 'train', settings.calib_num,
                          job.size)
    fp32 = export_fp32(job, tolerance,
                       calibration if settings.equalize == 'always' else None)
    auto = settings.equalize == 'auto' and equalizable(fp32.model)
    job.write(int8_model(fp32, settings, auto))
    return fp32.result
