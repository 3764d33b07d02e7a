"""Shared behaviour of the command-line tools."""
import sys

from .errors import MMRepVGGError


def run_cli(main, user_errors=(MMRepVGGError, FileNotFoundError)):
    """Run ``main()``; a user mistake exits 1 with a one-line message.

    Args:
        main (callable): The tool's entry point.
        user_errors (tuple[type]): Exceptions that report a user mistake
            rather than a bug.
    """
    try:
        main()
    except user_errors as error:
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
