"""Writing the tools' outputs: never half a file, never over an input, and
over an existing file only when asked, decided at the moment of writing.

Each file is written in full to a hidden temporary file beside its target
(``.NAME.XXXXXXXX.tmp``), then put in place by a rename, which either
happens whole or not at all. Files written together are put in place
together: if one fails, the others are taken back. Ctrl-C and SIGTERM (see
:func:`mmrepvgg.cli.run_cli`) remove the temporary files; after a SIGKILL
they stay, and with ``force`` so may hidden ``.NAME.XXXXXXXX.old`` copies of
the files being replaced.
"""
import errno
import io
import os
import os.path as osp
import tempfile

import torch

from .errors import UsageError


def check_output_path(out, inputs=(), force=False):
    """Refuse an output path that names a folder, would overwrite one of
    ``inputs`` or, unless ``force``, exists. A quick check before any work;
    :func:`write_files` decides again when it writes.

    Raises:
        UsageError: The path cannot be an output.
    """
    if not out or out.endswith(('/', os.sep)) or osp.isdir(out):
        raise UsageError(f'{out}: is a directory, not a file')
    parent = osp.dirname(osp.abspath(out))
    while not osp.exists(parent):
        parent = osp.dirname(parent)
    if not osp.isdir(parent):
        raise UsageError(f'{out}: {parent} is not a directory')
    for path in inputs:
        if osp.realpath(out) == osp.realpath(path) or (
                osp.exists(out) and osp.exists(path)
                and osp.samefile(out, path)):
            raise UsageError(
                f'{out}: is an input ({path}); choose another output path')
    if osp.lexists(out) and not force:
        raise UsageError(
            f'{out}: already exists; pass --force to overwrite it')


def serialize(obj):
    """``torch.save(obj)`` as bytes."""
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_files(contents, force=False):
    """Write several files all or nothing.

    Args:
        contents (dict[str, bytes]): What to write where.
        force (bool): Replace existing files. Without it, a path that
            exists when its file is put in place (a file, a folder or a
            dangling link) is an error and nothing is written.

    Raises:
        UsageError: A path that exists (without ``force``) or that cannot
            be written, with the system's reason (a full disk, a read-only
            file system, a file where a folder should be, ...).
    """
    temporary = {}
    try:
        for path, data in contents.items():
            _write_temporary(path, data, temporary)
        (_replace if force else _create)(temporary)
    except FileExistsError as error:
        raise UsageError(f'{error.filename2 or error.filename}: already '
                         'exists; pass --force to overwrite it') from None
    except OSError as error:
        raise UsageError(f'{error.filename}: cannot write '
                         f'({error.strerror or error})') from None
    finally:
        for path in temporary.values():
            if osp.lexists(path):
                os.remove(path)


def _write_temporary(path, data, temporary):
    """Write ``data`` to a new temporary file beside ``path``, recorded in
    ``temporary`` as soon as it exists, so the caller can remove it."""
    directory = osp.dirname(osp.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:  # a file stands where a folder should be
        raise NotADirectoryError(
            errno.ENOTDIR, 'a file stands where a '
            'directory should be', path) from None
    fd, temporary[path] = tempfile.mkstemp(
        dir=directory, prefix=f'.{osp.basename(path)}.', suffix='.tmp')
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        error.filename = error.filename or path
        raise
    # mkstemp creates the file for its owner only; give it the mode that
    # open() would have.
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(temporary[path], 0o666 & ~umask)


def _create(temporary):
    # A hard link to a new name fails if the name exists at that moment:
    # the check and the write are one step.
    placed = []
    try:
        for path, source in temporary.items():
            os.link(source, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            os.remove(path)
        raise


def _replace(temporary):
    # The files replaced stay under hidden names until every new file is in
    # place, so that a failure can put them back.
    kept, placed = {}, []
    try:
        for path, source in temporary.items():
            if osp.lexists(path):
                kept[path] = _keep(path)
            os.replace(source, path)
            placed.append(path)
    except BaseException:
        for path in placed:
            if path in kept:
                os.replace(kept.pop(path), path)
            else:
                os.remove(path)
        raise
    finally:
        for path in kept.values():
            os.remove(path)


def _keep(path):
    directory, name = osp.split(osp.abspath(path))
    while True:
        kept = osp.join(directory, f'.{name}.{os.urandom(4).hex()}.old')
        try:
            os.link(path, kept, follow_symlinks=False)
            return kept
        except FileExistsError:
            continue
