"""The errors mmrepvgg raises for what a user gave it: the command-line
tools print one as a single line (:func:`mmrepvgg.cli.run_cli`); anything
else is a bug and keeps its traceback.
"""

__all__ = [
    'MMRepVGGError', 'CheckpointError', 'ConfigError', 'UsageError',
    'MetadataError', 'VerificationError', 'first_keys', 'first_line'
]


class MMRepVGGError(Exception):
    """A file, config or argument that mmrepvgg cannot use."""


class CheckpointError(MMRepVGGError, ValueError):
    """A checkpoint or weights file that cannot be used as asked."""


class ConfigError(MMRepVGGError, ValueError):
    """A config that cannot be read, or whose model cannot be built."""


class UsageError(MMRepVGGError, ValueError):
    """An argument, an input image or an output path that cannot be used."""


class MetadataError(MMRepVGGError, ValueError):
    """Metadata of a checkpoint or an exported model that cannot be used."""


class VerificationError(MMRepVGGError):
    """A converted or exported model that does not compute what its source
    did."""


def first_keys(keys, count=3):
    """The first ``count`` of ``keys``, and how many more there are, for a
    one-line message."""
    keys = list(keys)
    more = f' (+{len(keys) - count} more)' if len(keys) > count else ''
    return ', '.join(map(str, keys[:count])) + more


def first_line(error):
    """The first non-blank line of an exception's message, or its type."""
    lines = [line.strip() for line in str(error).splitlines() if line.strip()]
    return lines[0] if lines else type(error).__name__
