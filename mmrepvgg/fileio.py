"""Writing the tools' outputs: never half a file, never over an input, and
over an existing file only when asked, decided at the moment of writing.

Each file is written to a hidden temporary file beside its target, then put
in place by a rename; files written together are put in place together or
not at all (the design page on safety says what stays after a SIGKILL).
"""
import errno
import io
import os
import os.path as osp
import signal
import threading
from contextlib import contextmanager

from .errors import UsageError

__all__ = ['check_output_path', 'serialize', 'write_files']


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
    # Imported here: the runtime writes its files with this module, and
    # has no torch.
    import torch
    buffer = io.BytesIO()
    torch.save(obj, buffer)
    return buffer.getvalue()


def write_files(contents, force=False):
    """Write several files all or nothing.

    Ctrl-C and SIGTERM are held back while the files are written and put in
    place (in the main thread), then delivered as usual.

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
    with _signals_held() as received:
        temporary = {}
        try:
            for path, data in contents.items():
                _write_temporary(path, data, temporary)
                if received:
                    name = signal.Signals(received[0]).name
                    raise UsageError(f'interrupted by {name}; nothing '
                                     'written')
            _place(temporary, force)
        except FileExistsError as error:
            raise UsageError(f'{error.filename2 or error.filename}: already '
                             'exists; pass --force to overwrite it') from error
        except OSError as error:
            raise UsageError(f'{error.filename}: cannot write '
                             f'({error.strerror or error})') from error
        finally:
            for path in temporary.values():
                if osp.lexists(path):
                    os.remove(path)


_HELD_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextmanager
def signals_handled(handler):
    """Call ``handler(signum)`` on Ctrl-C and SIGTERM instead of their
    handlers (in the main thread, which alone receives Python signals; an
    ignored signal stays ignored), and put those back on the way out.
    Yields the handlers replaced, by signal."""
    if threading.current_thread() is not threading.main_thread():
        yield {}
        return
    handlers = {
        signum: signal.signal(signum, lambda s, frame: handler(s))
        for signum in _HELD_SIGNALS
        if signal.getsignal(signum) is not signal.SIG_IGN
    }
    try:
        yield handlers
    finally:
        for signum, replaced in handlers.items():
            signal.signal(signum, replaced)


@contextmanager
def _signals_held():
    """Record Ctrl-C and SIGTERM instead of acting on them, and deliver the
    first one recorded to its own handler on the way out (which usually
    exits). Yields the list of signals received so far."""
    received = []
    try:
        with signals_handled(received.append) as handlers:
            yield received
    finally:
        if received:
            signum, handler = received[0], handlers[received[0]]
            if callable(handler):
                handler(signum, None)
            elif handler == signal.SIG_DFL:
                signal.raise_signal(signum)


def _hidden_name(path, suffix):
    """A new hidden name beside ``path``, ``.NAME.XXXXXXXXXXXXXXXX<suffix>``,
    with NAME shortened as the file system's name limit requires."""
    directory, name = osp.split(osp.abspath(path))
    tag = f'.{os.urandom(8).hex()}{suffix}'
    room = _name_max(directory) - len(tag.encode()) - 1
    short = name.encode()[:room].decode(errors='ignore')
    return osp.join(directory, f'.{short}{tag}')


def _name_max(directory):
    try:
        return os.pathconf(directory, 'PC_NAME_MAX')
    except (OSError, ValueError):
        return 255


def _write_temporary(path, data, temporary):
    """Write ``data`` to a new temporary file beside ``path``. Its name is
    recorded in ``temporary`` before the file exists, so the caller removes
    it whenever the writing stops."""
    directory = osp.dirname(osp.abspath(path))
    try:
        os.makedirs(directory, exist_ok=True)
    except FileExistsError:  # a file stands where a folder should be
        raise NotADirectoryError(
            errno.ENOTDIR, 'a file stands where a '
            'directory should be', path) from None
    while True:
        temporary[path] = _hidden_name(path, '.tmp')
        try:
            # Created with the mode that open() gives, under the umask.
            fd = os.open(temporary[path], os.O_WRONLY | os.O_CREAT | os.O_EXCL,
                         0o666)
            break
        except FileExistsError:  # another file's name: never remove it
            del temporary[path]
    try:
        with os.fdopen(fd, 'wb') as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
    except OSError as error:
        error.filename = error.filename or path
        raise


def _place(temporary, force):
    # Without force, a hard link to a new name fails if the name exists at
    # that moment: the check and the write are one step. With it, the files
    # replaced stay under hidden names until every new file is in place, so
    # that a failure can put them back.
    kept, placed = {}, []
    try:
        for path, source in temporary.items():
            if force and osp.lexists(path):
                kept[path] = _keep(path)
            (os.replace if force else os.link)(source, path)
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
    while True:
        kept = _hidden_name(path, '.old')
        try:
            os.link(path, kept, follow_symlinks=False)
            return kept
        except FileExistsError:
            continue
