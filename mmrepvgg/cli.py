"""Shared behaviour of the command-line tools."""
import signal
import sys
import warnings

from .deploy.runtime import BACKENDS, PRECISIONS
from .errors import MMRepVGGError


def _show_on_stdout(message, category, filename, lineno, file=None, line=None):
    sys.stdout.write(
        warnings.formatwarning(message, category, filename, lineno, line))


def _exit_on_sigterm(signum, frame):
    # SystemExit unwinds the stack, so temporary files are removed on the
    # way out, as for Ctrl-C.
    sys.exit(128 + signum)


def run_cli(main):
    """Run a tool's ``main()``; a user mistake exits 1 with one line on
    stderr.

    Third-party warnings go to stdout, so that stderr holds the error line
    alone; Ctrl-C and SIGTERM unwind the stack, so that no temporary file
    stays.

    Args:
        main (callable): The tool's entry point.
    """
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    warnings.showwarning = _show_on_stdout
    try:
        main()
    except MMRepVGGError as error:
        sys.stdout.flush()
        print(f'error: {error}', file=sys.stderr)
        sys.exit(1)
    except KeyboardInterrupt:
        print('interrupted', file=sys.stderr)
        sys.exit(130)


def add_engine_arguments(parser):
    """``--backend``, ``--precision`` and ``--threads``: the options of the
    tools that run an exported model."""
    parser.add_argument(
        '--backend',
        choices=BACKENDS,
        default='onnxruntime',
        help='inference engine of an ONNX model (default: onnxruntime)')
    parser.add_argument(
        '--precision',
        choices=PRECISIONS,
        default='fp32',
        help='bf16 runs on OpenVINO only (default: fp32)')
    parser.add_argument(
        '--threads', type=int, help='engine threads (default: its own)')
    return parser
