"""Writing the tools' outputs without losing or half-writing files.

Files are written to a temporary name beside the target and renamed into
place, so a failure never leaves a half-written file behind.
"""
import os
import os.path as osp
import tempfile

import torch

from .errors import UsageError


def check_output_path(out, inputs=(), force=False):
    """Refuse an output path that would overwrite inputs or, unless
    ``force``, any existing file."""
    for path in inputs:
        if osp.realpath(out) == osp.realpath(path) or (
                osp.exists(out) and osp.exists(path)
                and osp.samefile(out, path)):
            raise UsageError(
                f'{out}: is an input ({path}); choose another output path')
    if osp.exists(out) and not force:
        raise UsageError(
            f'{out}: already exists; pass --force to overwrite it')
    if osp.isdir(out):
        raise UsageError(f'{out}: is a directory')


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
