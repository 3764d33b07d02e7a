"""Reading checkpoints as data, never as code.

Checkpoints are always read with torch's weights-only unpickler: a file that
stores code is refused, and its code never runs.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10
does not say otherwise, so every checkpoint its Runner saved is refused
because the message hub state pickles a few mmengine and numpy classes.
Allow-listing exactly those classes keeps the safe unpickler and makes
``tools/test.py``, ``init_model`` and ``--resume`` work again.
"""
import os.path as osp
import pickle
import zipfile

import numpy as np
import torch
from mmengine.logging import HistoryBuffer

from .errors import CheckpointError, first_keys, first_line


def _numpy_globals():
    # What pickling numpy arrays, dtypes and scalars references: the array
    # reconstructor, and one dtype class per dtype (numpy >= 1.25).
    multiarray = getattr(np, '_core', None) or np.core
    found = [
        np.ndarray, np.dtype, multiarray.multiarray._reconstruct,
        multiarray.multiarray.scalar
    ]
    dtypes = getattr(np, 'dtypes', None)
    if dtypes is not None:
        found += [
            getattr(dtypes, name) for name in dir(dtypes)
            if name.endswith('DType')
        ]
    return found


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
MMENGINE_CHECKPOINT_GLOBALS = [
    HistoryBuffer, *_numpy_globals(),
    (_history_buffer_method, 'builtins.getattr')
]


def allow_mmengine_checkpoints():
    """Let ``torch.load(weights_only=True)`` read mmengine checkpoints."""
    add_safe_globals = getattr(torch.serialization, 'add_safe_globals', None)
    if add_safe_globals is not None:  # torch < 2.4 loads them anyway
        add_safe_globals(MMENGINE_CHECKPOINT_GLOBALS)


def load_checkpoint_file(path):
    """Load a checkpoint without executing code stored in it.

    Args:
        path (str): A file written by ``torch.save``.

    Returns:
        dict: The checkpoint, on the CPU.

    Raises:
        CheckpointError: The file is missing, unreadable, not a checkpoint,
            or stores objects whose loading would run code.
    """
    if not osp.isfile(path):
        raise CheckpointError(f'{path}: no such file')
    try:
        checkpoint = torch.load(path, map_location='cpu', weights_only=True)
    except pickle.UnpicklingError as error:
        message = first_line(error)
        # An unknown opcode means bytes that are no pickle at all (text,
        # garbage), not a pickle of code.
        if 'Unsupported operand' in str(error):
            raise CheckpointError(
                f'{path}: not a readable checkpoint (not a file written by '
                'torch.save)') from None
        if 'Weights only load failed' in message or 'global' in str(
                error).lower():
            raise CheckpointError(
                f'{path}: refused, it stores objects other than weights '
                'whose loading could run code') from None
        raise CheckpointError(
            f'{path}: not a readable checkpoint ({message})') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile,
            ValueError) as error:
        raise CheckpointError(
            f'{path}: not a readable checkpoint, truncated or corrupt '
            f'({first_line(error)})') from None
    if not isinstance(checkpoint, dict):
        raise CheckpointError(
            f'{path}: not a checkpoint (holds a {type(checkpoint).__name__}, '
            'not a dict of weights)')
    return checkpoint


def weights_of(checkpoint, path='checkpoint'):
    """The state dict inside a checkpoint, with a ``module.`` prefix
    removed.

    Accepts mmengine checkpoints (``state_dict``), ``model`` wrappers and
    plain state dicts.
    """
    for key in ('state_dict', 'model'):
        if isinstance(checkpoint.get(key), dict):
            checkpoint = checkpoint[key]
            break
    if not checkpoint or not all(
            isinstance(v, torch.Tensor) for v in checkpoint.values()):
        raise CheckpointError(f'{path}: holds no weights (expected a state '
                              'dict of tensors)')
    if all(k.startswith('module.') for k in checkpoint):
        checkpoint = {k[len('module.'):]: v for k, v in checkpoint.items()}
    return dict(checkpoint)


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
            f'{checkpoint} does not match {config}: {detail}') from None
    problems = [
        f'{name} keys {first_keys(keys)}'
        for name, keys in (('missing', result.missing_keys),
                           ('unexpected', result.unexpected_keys)) if keys
    ]
    if problems:
        raise CheckpointError(f'{checkpoint} does not match {config}: ' +
                              '; '.join(problems))
