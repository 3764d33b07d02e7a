"""Segmentors as ONNX graphs: the form that exports well, the exporter's
call, and the metadata the graph carries."""
import copy
import os.path as osp

import torch
from torch import nn
from torch.nn.modules.utils import _pair

from ..errors import ConfigError, VerificationError
from ..logs import quiet
from ..runtime.metadata import MAX_SIZE, MIN_SIZE
from .loading import dataset_meta
from .logits import ImageSegmentor
from .model_info import INPUT, OUTPUTS, ExportedModelInfo, set_info
from .modules import replace_modules
from .test_settings import test_mode, test_resize

__all__ = [
    'OPSET', 'SlicedAdaptiveAvgPool2d', 'exportable', 'to_onnx',
    'exported_model_info'
]

OPSET = 18


class SlicedAdaptiveAvgPool2d(nn.Module):
    """``nn.AdaptiveAvgPool2d`` with integer bins, computed as ONNX exports
    it well: each bin's rows averaged, then each bin's columns, over
    PyTorch's own windows.

    The exporter unrolls adaptive pooling whose bins do not divide the
    input into one gather per window element (about 10,000 nodes and two
    minutes for PSPNet at 1024x2048) and fixes the windows to the example's
    size; slices and means stay small and follow the input's size.
    """

    def __init__(self, output_size):
        super().__init__()
        self.output_size = _pair(output_size)

    def forward(self, x):
        rows, columns = self.output_size
        return _pool(_pool(x, rows, 2), columns, 3)


def _pool(x, bins, dim):
    length = x.shape[dim]
    if bins == 1:
        return x.mean(dim, keepdim=True)
    windows = []
    for i in range(bins):
        start = i * length // bins
        # A ceiling without negative floor division, which ONNX's integer
        # Div (rounding towards zero) would get wrong.
        end = ((i + 1) * length + bins - 1) // bins
        windows.append(
            x.narrow(dim, start, end - start).mean(dim, keepdim=True))
    return torch.cat(windows, dim)


def _sliced_pool(module):
    if type(module) is nn.AdaptiveAvgPool2d and all(
            isinstance(s, int) for s in _pair(module.output_size)):
        return SlicedAdaptiveAvgPool2d(module.output_size)
    return None


def exportable(segmentor):
    """An eval-mode :class:`ImageSegmentor` of a copy of ``segmentor``,
    with its adaptive pools sliced, as :func:`to_onnx` takes it."""
    module = ImageSegmentor(copy.deepcopy(segmentor)).eval()
    replace_modules(module, _sliced_pool)
    return module


def to_onnx(module, size, dynamic=False, info=None):
    """Export an :class:`ImageSegmentor` to ONNX bytes.

    Args:
        module (ImageSegmentor): The model, with its adaptive pools sliced
            (:func:`exportable`).
        size (tuple[int]): ``(height, width)`` of the example input.
        dynamic (bool): Let height and width vary. The batch size always
            may.
        info (ExportedModelInfo, optional): Metadata to store.

    Returns:
        bytes: The model, with no trace of the exporting machine in it.
    """
    shapes = {0: torch.export.Dim('batch', min=1, max=1024)}
    if dynamic:
        shapes.update({
            2: torch.export.Dim('height', min=MIN_SIZE, max=MAX_SIZE),
            3: torch.export.Dim('width', min=MIN_SIZE, max=MAX_SIZE)
        })
    # Two images: a batch of one would be specialized to one.
    example = torch.zeros(2, 3, *size)
    with quiet('torch.onnx', ignore_warnings=True), torch.no_grad():
        program = torch.onnx.export(
            module, (example, ),
            dynamo=True,
            opset_version=OPSET,
            input_names=[INPUT],
            output_names=list(OUTPUTS),
            dynamic_shapes={INPUT: shapes},
            verbose=False)
    proto = program.model_proto
    _check_dynamic_dims(proto, dynamic)
    for node in proto.graph.node:
        # Source paths and stack traces of the exporting machine.
        del node.metadata_props[:]
    if info is not None:
        set_info(proto, info)
    return proto.SerializeToString()


def _check_dynamic_dims(proto, dynamic):
    # The exporter may fall back to static sizes with a log line only.
    dims = proto.graph.input[0].type.tensor_type.shape.dim
    wanted = [0, 2, 3] if dynamic else [0]
    fixed = [i for i in wanted if not dims[i].dim_param]
    if fixed:
        names = ', '.join(('batch', '', 'height', 'width')[i] for i in fixed)
        raise VerificationError(
            f'the model did not export with a free {names}: some operation '
            'of it depends on the input size')


def exported_model_info(cfg, loaded, config, size):
    """The metadata of ``loaded``'s exported model.

    Args:
        cfg (Config): Its config.
        loaded (LoadedModel): The model and its checkpoint.
        config (str): The config's file.
        size (tuple[int], optional): Its input size; None for any.

    Returns:
        ExportedModelInfo: Classes and palette (from the checkpoint's meta,
        or the config's test dataset), input size, the test pipeline's
        resize and the test mode, and source.

    Raises:
        ConfigError: Neither names the classes, or the test pipeline or
            mode is one the runtime does not reproduce.
    """
    dataset = dataset_meta(cfg, loaded.checkpoint)
    if dataset is None:
        raise ConfigError(f'{config}: names no classes (neither the '
                          "checkpoint's meta nor the config's test dataset)")
    return ExportedModelInfo(
        classes=list(dataset.classes),
        palette=[list(c) for c in dataset.palette],
        input_size=list(size) if size else None,
        align_corners=bool(loaded.model.align_corners),
        resize=test_resize(cfg),
        test_mode=test_mode(cfg),
        source=osp.basename(loaded.checkpoint.path),
        source_sha256=loaded.checkpoint.sha256,
        config=osp.basename(config))
