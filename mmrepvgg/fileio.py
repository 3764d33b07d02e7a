"""Reading and writing checkpoint files for the command-line tools.

Checkpoints are always read with torch's weights-only unpickler: a file
that stores code is refused, and its code never runs. Files are written to
a temporary name beside the target and renamed into place, so a failure
never leaves a half-written file behind.
"""
import os
import os.path as osp
import pickle
import tempfile
import zipfile

import torch

from .errors import CheckpointError


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
        first_line = str(error).strip().splitlines()[0]
        # An unknown opcode means bytes that are no pickle at all (text,
        # garbage), not a pickle of code.
        if 'Unsupported operand' in str(error):
            raise CheckpointError(
                f'{path}: not a readable checkpoint (not a file written by '
                'torch.save)') from None
        if 'Weights only load failed' in first_line or 'global' in str(
                error).lower():
            raise CheckpointError(
                f'{path}: refused, it stores objects other than weights '
                'whose loading could run code') from None
        raise CheckpointError(
            f'{path}: not a readable checkpoint ({first_line})') from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile,
            ValueError) as error:
        first_line = str(error).strip().splitlines()[0] if str(
            error).strip() else type(error).__name__
        raise CheckpointError(
            f'{path}: not a readable checkpoint, truncated or corrupt '
            f'({first_line})') from None
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


def check_output_path(out, inputs=(), force=False):
    """Refuse an output path that would overwrite inputs or, unless
    ``force``, any existing file."""
    for path in inputs:
        if osp.realpath(out) == osp.realpath(path) or (
                osp.exists(out) and osp.exists(path)
                and osp.samefile(out, path)):
            raise CheckpointError(
                f'{out}: is an input ({path}); choose another output path')
    if osp.exists(out) and not force:
        raise CheckpointError(
            f'{out}: already exists; pass --force to overwrite it')
    if osp.isdir(out):
        raise CheckpointError(f'{out}: is a directory')


def save_atomic(obj, path):
    """``torch.save`` to a temporary file beside ``path``, then rename."""
    write_atomic(path, lambda f: torch.save(obj, f))


def write_atomic(path, write):
    """Call ``write(file)`` on a temporary file, then rename it to
    ``path``."""
    directory = osp.dirname(osp.abspath(path))
    os.makedirs(directory, exist_ok=True)
    fd, tmp = tempfile.mkstemp(
        dir=directory, prefix=f'.{osp.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            write(f)
        # mkstemp creates the file for its owner only; give it the mode that
        # open() would have.
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)
        os.replace(tmp, path)
    except BaseException:
        if osp.exists(tmp):
            os.remove(tmp)
        raise
