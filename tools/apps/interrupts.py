"""Ctrl-C and SIGTERM as one line from the first moment a tool runs.

A tool imports this module before anything else of its own: torch and the
toolboxes take seconds to import, and an interrupt then would end in a long
traceback. Nothing is written yet at that point, so the process just ends.
:func:`mmrepvgg.cli.run_cli` takes over once the tool's ``main`` runs.
"""
import os
import signal
import sys


def _quit(signum, frame):
    sys.stderr.write('interrupted\n' if signum ==
                     signal.SIGINT else 'terminated\n')
    os._exit(128 + signum)


for _signum in (signal.SIGINT, signal.SIGTERM):
    signal.signal(_signum, _quit)
