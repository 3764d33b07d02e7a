"""Loading mmengine checkpoints under torch's safe (weights-only) unpickler.

torch >= 2.6 loads with ``weights_only=True`` by default, and mmengine 0.10
does not say otherwise, so every checkpoint its Runner saved is refused
because the message hub state pickles a few mmengine and numpy classes.
Allow-listing exactly those classes keeps the safe unpickler, which never
runs code stored in a file, and makes ``tools/test.py``, ``init_model`` and
``--resume`` work again.
"""
import pickle

import numpy as np
import torch
from mmengine.logging import HistoryBuffer


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
