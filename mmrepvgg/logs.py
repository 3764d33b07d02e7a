"""Third-party libraries' log lines and warnings, kept out of the way: one
context manager for the tools' output and the exporter's and quantizer's
chatter alike."""
import functools
import logging
import warnings
from contextlib import contextmanager

__all__ = ['quiet']


def _show(stream, message, category, filename, lineno, file=None, line=None):
    stream.write(
        warnings.formatwarning(message, category, filename, lineno, line))


@contextmanager
def quiet(logger='', level=logging.ERROR, ignore_warnings=False, to=None):
    """For the duration: only lines of ``level`` and above from ``logger``
    (and the loggers below it), warnings ignored if asked, and with ``to``,
    its lines and the warnings shown written to that stream.

    Args:
        logger (str): A logger's name; the root logger by default.
        level (int): The least level shown.
        ignore_warnings (bool): Show no warnings.
        to (TextIO, optional): Where the logger's lines and the warnings
            go, e.g. ``sys.stdout`` so that stderr holds a tool's own
            error line alone.
    """
    log = logging.getLogger(logger)
    saved = log.level
    handler = logging.StreamHandler(to) if to is not None else None
    log.setLevel(level)
    if handler is not None:
        log.addHandler(handler)
    try:
        with warnings.catch_warnings():
            if ignore_warnings:
                warnings.simplefilter('ignore')
            elif to is not None:
                warnings.showwarning = functools.partial(_show, to)
            yield
    finally:
        if handler is not None:
            log.removeHandler(handler)
        log.setLevel(saved)
