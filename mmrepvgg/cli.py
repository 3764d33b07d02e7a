"""What the command-line tools share: how they run, and their options.

A tool is a thin command line: :func:`tool_parser` makes its parser,
:func:`add_settings` adds one option per field of a typed settings record
(its default, type and help come from the record), :func:`settings_from`
builds the record back, and :func:`run_cli` runs it.
"""
import argparse
import collections.abc
import dataclasses
import logging
import os
import signal
import sys
import traceback
import typing

from .errors import MMRepVGGError
from .fileio import signals_handled
from .logs import quiet

__all__ = [
    'tool_parser', 'add_settings', 'settings_from', 'given_options', 'run_cli',
    'option'
]

_DEBUG = 'MMREPVGG_DEBUG'


def tool_parser(description):
    """An argument parser with the options every tool has: ``--verbose``
    and ``--debug``."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        '--verbose',
        action='store_true',
        help='print more about what was checked, and third-party log lines')
    parser.add_argument(
        '--debug',
        action='store_true',
        help=f'print the traceback of an error too (or set {_DEBUG}=1)')
    return parser


def _option_type(hint):
    """``(type, nargs)`` of an option for a type hint: a tuple of fixed
    length takes that many values, any other sequence any number."""
    if typing.get_origin(hint) is typing.Union:
        hint = next(a for a in typing.get_args(hint) if a is not type(None))
    if typing.get_origin(hint) in (tuple, list, collections.abc.Sequence):
        args = typing.get_args(hint)
        if len(args) == 2 and args[1] is Ellipsis or len(args) == 1:
            return args[0], '*'
        return args[0], len(args)
    return hint, None


def _shown(value):
    if isinstance(value, (tuple, list)):
        return ' '.join(map(str, value)) or 'none'
    return 'none' if value is None else value


def add_settings(parser, settings_cls, title=None, prefix='', exclude=()):
    """Add one option per field of a settings dataclass to ``parser`` (in
    a group named ``title``, if given): ``--[prefix-]field-name``, with the
    field's default, a type from its annotation, and ``help``, ``choices``
    and ``metavar`` from its metadata (``flag`` names another option). A
    field without a default is a positional argument.

    Returns:
        The group (or parser) the options went to.
    """
    group = parser.add_argument_group(title) if title else parser
    hints = typing.get_type_hints(settings_cls)
    for setting in dataclasses.fields(settings_cls):
        if setting.name in exclude:
            continue
        meta = dict(setting.metadata)
        meta.pop('flag', None)
        dest = _dest(prefix, setting.name)
        default = _default(setting)
        if default is dataclasses.MISSING:
            group.add_argument(dest, **meta)
            continue
        help_text = meta.get('help', '')
        if '(default' not in help_text:
            meta['help'] = f'{help_text} (default: {_shown(default)})'
        if hints[setting.name] is bool:
            meta['action'] = 'store_true'
        else:
            meta['type'], meta['nargs'] = _option_type(hints[setting.name])
        group.add_argument(
            _flag(setting, prefix), dest=dest, default=default, **meta)
    return group


def _default(setting):
    """The field's default; ``MISSING`` for a field without one."""
    if setting.default_factory is not dataclasses.MISSING:
        return setting.default_factory()
    return setting.default


def _dest(prefix, name):
    return f'{prefix}_{name}' if prefix else name


def _flag(setting, prefix):
    return setting.metadata.get(
        'flag', '--' + _dest(prefix, setting.name).replace('_', '-'))


def settings_from(args, settings_cls, prefix='', **overrides):
    """The settings record of ``args`` parsed with the options of
    :func:`add_settings` (sequences as tuples), or of any object with
    attributes so named, such as another settings record."""
    values = {}
    for setting in dataclasses.fields(settings_cls):
        dest = _dest(prefix, setting.name)
        if hasattr(args, dest):
            value = getattr(args, dest)
            values[setting.name] = (
                tuple(value) if isinstance(value, list) else value)
    values.update(overrides)
    return settings_cls(**values)


def given_options(args, settings_cls, prefix=''):
    """The flags (``--int8-scheme``) of the :func:`add_settings` options
    that ``args`` gives other values than their defaults."""
    given = settings_from(args, settings_cls, prefix)
    return [
        _flag(setting, prefix) for setting in dataclasses.fields(settings_cls)
        if _default(setting) is not dataclasses.MISSING
        and getattr(given, setting.name) != _default(setting)
    ]


def run_cli(main, build_parser, intermixed=False):
    """Run a tool: parse its command line (a mistake there is argparse's
    usage and exit 2), then ``main(args)``: a user mistake exits 1 with one
    line on stderr; Ctrl-C exits 130 and SIGTERM 143, with one line, at any
    moment.

    Interrupts unwind the stack, and are reported as such even when a
    library turned them into another exception. With ``--debug`` (or
    ``MMREPVGG_DEBUG=1``) an error's traceback is printed above its line.

    Args:
        main (callable): The tool's entry point, given the parsed
            arguments.
        build_parser (callable): Returns the tool's parser, made with
            :func:`tool_parser`.
        intermixed (bool): Parse with ``parse_intermixed_args``, which
            takes positional arguments after options too.
    """
    parser = build_parser()
    args = (
        parser.parse_intermixed_args() if intermixed else parser.parse_args())
    debug = args.debug or os.environ.get(_DEBUG) == '1'
    received = []

    def interrupt(signum):
        received.append(signum)
        raise KeyboardInterrupt

    # Third-party warnings and log lines go to stdout, so that stderr holds
    # the tool's own error line alone.
    level = logging.INFO if args.verbose else logging.WARNING
    try:
        with signals_handled(interrupt), quiet(level=level, to=sys.stdout):
            main(args)
    except BaseException as error:  # reported below, or raised again
        code = _report(error, received, debug)
        if code is None:
            raise
        sys.exit(code)


def _report(error, received, debug):
    """Print an interrupt or a user error (with its traceback if
    ``debug``) as one line on stderr and return the exit status; None for
    anything else."""
    sys.stdout.flush()
    if received or isinstance(error, KeyboardInterrupt):
        signum = received[0] if received else signal.SIGINT
        print(
            'interrupted' if signum == signal.SIGINT else 'terminated',
            file=sys.stderr)
        return 128 + signum
    if isinstance(error, MMRepVGGError):
        if debug:
            traceback.print_exception(
                type(error), error, error.__traceback__, file=sys.stderr)
        print(f'error: {error}', file=sys.stderr)
        return 1
    return None


def option(default, help, **metadata):
    """A field of a settings record that :func:`add_settings` makes an
    option of.

    Args:
        default: The option's default.
        help (str): Its help.
        **metadata: ``choices``, ``metavar``, or ``flag``: another name.
    """
    return dataclasses.field(
        default=default, metadata=dict(metadata, help=help))
