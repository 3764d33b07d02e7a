"""Reading checkpoints as data, never as code.

Checkpoints are read with torch's weights-only unpickler; importing
mmrepvgg allow-lists what mmengine's Runner writes besides tensors
(:func:`allow_mmengine_checkpoints`), so that its checkpoints load too.
"""
import hashlib
import io
import os.path as osp
import pickle
from dataclasses import dataclass
from functools import cached_property

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from .errors import CheckpointError, first_keys, first_line
from .runtime.metadata import plain_data_problem

__all__ = [
    'allow_mmengine_checkpoints', 'Checkpoint', 'load_checkpoint',
    'read_checkpoint', 'weights_of', 'checkpoint_meta', 'load_weights',
    'MMENGINE_CHECKPOINT_GLOBALS'
]

_MULTIARRAY = getattr(np, '_core', None) or np.core
_MULTIARRAY_MODULES = ('numpy.core.multiarray', 'numpy._core.multiarray')
# Booleans, signed and unsigned integers, floats and complex numbers.
_NUMERIC_KINDS = 'biufc'


def _numeric(spec, align=False, copy=False):
    # numpy.dtype as pickles call it, and the check of the dtype that an
    # array or a scalar is built with: only numpy's shared dtypes of numbers
    # pass. numpy ignores a pickled state on those, so a file cannot turn
    # one into a dtype that holds objects.
    try:
        dtype = np.dtype(spec)
    except TypeError:
        dtype = None
    if not (dtype is not None and dtype.isbuiltin == 1
            and dtype.kind in _NUMERIC_KINDS):
        raise pickle.UnpicklingError(
            f'refused numpy data of dtype {spec!r} in a checkpoint: only '
            'numbers are loaded')
    return dtype


class _LoadedArray(np.ndarray):
    """The only numpy array a checkpoint can build: numbers, as many as
    its bytes hold. It pickles as a plain ``numpy.ndarray`` again, and
    ``numpy.ndarray`` resolves to it: array pickles name it only as the
    first argument of ``_reconstruct``, never to call it."""

    def __new__(cls, *args, **kwargs):
        # ndarray's own constructor would build an array over raw bytes of
        # any dtype.
        raise pickle.UnpicklingError(
            'refused a direct numpy array construction in a checkpoint')

    def __setstate__(self, state):
        if not (isinstance(state, tuple) and len(state) == 5):
            raise pickle.UnpicklingError(
                'refused a malformed numpy array in a checkpoint')
        _numeric(state[2])
        super().__setstate__(state)

    def __reduce__(self):
        return self.view(np.ndarray).__reduce__()

    def __repr__(self):
        return repr(self.view(np.ndarray))


def _reconstruct(subtype, shape, dtype):
    # An empty array; the pickle's next step sets its shape, dtype and
    # bytes, which numpy checks against each other.
    if subtype is not _LoadedArray:
        raise pickle.UnpicklingError(
            'refused a numpy array of another type in a checkpoint')
    return np.ndarray.__new__(_LoadedArray, (0, ), np.uint8)


def _scalar(dtype, data):
    return _MULTIARRAY.multiarray.scalar(_numeric(dtype), data)


def _numeric_dtype_classes():
    # numpy >= 1.25 gives every dtype a class, which the pickle's state step
    # of a dtype of numbers needs allowed.
    if not hasattr(np, 'dtypes'):
        return []
    dtypes = map(np.dtype, np.typecodes['All'])
    classes = {type(d) for d in dtypes if d.kind in _NUMERIC_KINDS}
    return [(c, f'numpy.dtypes.{c.__name__}') for c in classes]


def _history_buffer_method(owner, name):
    # Pickle protocol 2 stores HistoryBuffer's statistics methods as
    # ``getattr(HistoryBuffer, name)``. Allowing the real getattr would let a
    # file reach any attribute (and from there, code); this resolves only
    # those methods.
    if owner is not HistoryBuffer or name not in _HISTORY_BUFFER_METHODS:
        raise pickle.UnpicklingError(
            f'refused getattr({owner!r}, {name!r}) in a checkpoint')
    return getattr(owner, name)


_HISTORY_BUFFER_METHODS = ('min', 'max', 'current', 'mean')
# What mmengine's Runner writes besides tensors: the message hub's
# HistoryBuffers, holding numpy arrays and scalars of numbers. Each numpy
# name resolves to a checked stand-in.
MMENGINE_CHECKPOINT_GLOBALS = [
    HistoryBuffer, (_LoadedArray, 'numpy.ndarray'),
    (_history_buffer_method, 'builtins.getattr'), (_numeric, 'numpy.dtype'),
    *[(_reconstruct, f'{m}._reconstruct') for m in _MULTIARRAY_MODULES],
    *[(_scalar, f'{m}.scalar')
      for m in _MULTIARRAY_MODULES], *_numeric_dtype_classes()
]


def allow_mmengine_checkpoints():
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints."""
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:  # torch < 2.4 loads them anyway
        add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS)


@dataclass
class Checkpoint:
    """A checkpoint file as it was read, once.

    Attributes:
        path (str): The file.
        contents (dict): What it holds, on the CPU.
        sha256 (str): The SHA-256 of the bytes that were loaded.
    """
    path: str
    contents: dict
    sha256: str

    @cached_property
    def weights(self):
        """Its state dict (:func:`weights_of`)."""
        return weights_of(self.contents, self.path)

    @cached_property
    def meta(self):
        """Its checked ``meta`` (:func:`checkpoint_meta`)."""
        return checkpoint_meta(self.contents, self.path)


def load_checkpoint(path):
    """Load a checkpoint file without executing code stored in it.

    Args:
        path (str): A file written by ``torch.save``.

    Returns:
        Checkpoint: Its contents and the hash of the bytes they came from.

    Raises:
        CheckpointError: The file is missing, unreadable, not a checkpoint,
            or stores objects other than weights and numbers.
    """
    if not osp.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    try:
        with open(path, 'rb') as f:
            data = f.read()
    except OSError as error:
        raise CheckpointError(
            f'{path}: cannot read ({error.strerror or error})') from error
    return Checkpoint(path, read_checkpoint(io.BytesIO(data), path),
                      hashlib.sha256(data).hexdigest())


def read_checkpoint(file, name):
    """The contents of a checkpoint in an open file (or at a path), read as
    :func:`load_checkpoint` does; ``name`` names it in messages."""
    try:
        checkpoint = torch.load(file, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        raise CheckpointError(f'{name}: {_refusal(error)}') from error
    except Exception as error:
        # Bytes that are no checkpoint can fail the unpickler in any way.
        raise CheckpointError(
            f'{name}: not a readable checkpoint, truncated or corrupt '
            f'({type(error).__name__}: {first_line(error)})') from error
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'{name}: not a checkpoint (holds a {type(checkpoint).__name__}, '
            'not a dict of weights)')
    return checkpoint


def _refusal(error):
    # An unknown opcode means bytes that are no pickle at all (text,
    # garbage), not a pickle of code.
    if 'Unsupported operand' in str(error):
        return 'not a readable checkpoint (not a file written by torch.save)'
    if 'Weights only load failed' in str(error):
        return ('refused, it stores objects other than weights and numbers '
                '(loading them could run code or crash)')
    return f'not a readable checkpoint ({first_line(error)})'


def weights_of(checkpoint, path='checkpoint'):
    """The state dict inside a checkpoint, with a ``module.`` prefix
    removed.

    Accepts mmengine checkpoints (``state_dict``), ``model`` wrappers and
    plain state dicts.

    Raises:
        CheckpointError: No dict of tensors under names.
    """
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(
            isinstance(k, str) and isinstance(v, torch.Tensor)
            for k, v in checkpoint.items()):
        raise CheckpointError(f'{path}: holds no weights (expected a state '
                              'dict of tensors under names)')
    if all(k.startswith('module.') for k in checkpoint):
        checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


# Deep enough for any metadata mmengine writes; a deeper nest is refused
# before anything walks it recursively.
_MAX_META_DEPTH = 32
_PLAIN_VALUES = (str, bytes, int, float, bool, type(None), np.generic,
                 np.ndarray, torch.Tensor)


def checkpoint_meta(checkpoint, path='checkpoint'):
    """The checkpoint's ``meta`` ({} without one), checked to be plain data:
    dicts with string keys, lists and tuples of numbers, strings and
    arrays, nested at most 32 deep.

    Raises:
        CheckpointError: ``meta`` is not such a dict.
    """
    meta = checkpoint.get('meta')
    if meta is None:
        return {}
    if not isinstance(meta, dict):
        raise CheckpointError(f'{path}: its meta is a {type(meta).__name__}, '
                              'not a dict')
    problem = plain_data_problem(meta, _MAX_META_DEPTH, _PLAIN_VALUES)
    if problem:
        raise CheckpointError(f'{path}: its meta {problem}')
    return meta


def load_weights(model, weights, checkpoint='checkpoint', config='config'):
    """Load a state dict, naming the first keys that do not match.

    Args:
        model (nn.Module): The model.
        weights (dict): Its weights, as :func:`weights_of` returns.
        checkpoint (str): Name of the weights' file, for messages.
        config (str): Name of the model's config, for messages.

    Raises:
        CheckpointError: The weights do not fit the model.
    """
    try:
        result = model.load_state_dict(weights, strict=False)
    except (RuntimeError, ValueError) as error:
        # torch lists size mismatches under a header line.
        lines = str(error).splitlines()
        detail = next(
            (line.strip() for line in lines if 'size mismatch' in line),
            first_line(error))
        raise CheckpointError(
            f'{checkpoint} does not match {config}: {detail}') from error
    problems = [
        f'{name} keys {first_keys(keys)}'
        for name, keys in (('missing', result.missing_keys),
                           ('unexpected', result.unexpected_keys)) if keys
    ]
    if problems:
        raise CheckpointError(f'{checkpoint} does not match {config}: ' +
                              '; '.join(problems))
