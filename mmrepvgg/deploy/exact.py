"""What a model computes from its weights, exactly: the reference of
:mod:`.compare`."""
import copy

import torch

from .compare import tensors_of
from .folded_psp import foldable_psp_head
from .modules import ChunkedFloat64Convs, replace_modules

__all__ = ['exact_outputs', 'fp32_and_exact']


def _in_float64(data):
    if isinstance(data, torch.Tensor):
        return data.double() if data.is_floating_point() else data
    if isinstance(data, dict):
        return {k: _in_float64(v) for k, v in data.items()}
    if isinstance(data, (list, tuple)):
        return type(data)(_in_float64(v) for v in data)
    return data


def _outputs(module, inputs, run=None):
    run = run or (lambda m, x: m(x))
    with torch.no_grad():
        return [t for data in inputs for t in tensors_of(run(module, data))]


def exact_outputs(module, inputs, run=None):
    """What a model computes from its weights, exactly: its outputs computed
    by a float64 copy of it, which folds its PSP heads
    (:func:`~mmrepvgg.deploy.folded_psp.foldable_psp_head`) and sums its
    convolutions' input channels in chunks
    (:class:`~mmrepvgg.deploy.modules.ChunkedFloat64Convs`): the same
    function up to float64 rounding, in a fraction of the memory.

    Args:
        module (nn.Module): The model; left unchanged.
        inputs (Sequence): Its inputs, one call each.
        run (callable, optional): ``run(module, input)`` returns an output;
            defaults to ``module(input)``.

    Returns:
        list[Tensor]: The output tensors of every input, flattened in order.
    """
    exact_module = copy.deepcopy(module).double()
    replace_modules(exact_module, foldable_psp_head)
    with ChunkedFloat64Convs():
        return _outputs(exact_module, [_in_float64(x) for x in inputs], run)


def fp32_and_exact(module, inputs, run=None):
    """A model's fp32 outputs and its exact outputs
    (:func:`exact_outputs`), flattened in order; see there for the
    arguments."""
    return _outputs(module, inputs, run), exact_outputs(module, inputs, run)
