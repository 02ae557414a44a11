"""The one error policy of every ``vrn-*`` command.

- our errors (:class:`~vrn.errors.VRNError`, a file that cannot be read or written) print
  one line, ``<prog>: <message>``, and exit 1;
- usage errors (argparse, or a bad option value the command finds) exit 2;
- Ctrl-C exits 130 and SIGTERM 143, after the command has finalised what it writes;
- anything unexpected prints one line saying where the full traceback was written, and
  exits 1; ``--debug`` prints the traceback instead.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from collections.abc import Callable

from ..errors import UsageError, VRNError
from ..signals import interrupt_exit, interrupt_word, sigterm_as_interrupt

ERROR_EXIT, USAGE_EXIT = 1, 2


def describe_error(exc: BaseException) -> str:
    """One line for an error: our own errors' messages as they are, others prefixed with
    their type (``OSError: [Errno 28] No space left on device``)."""
    text = " ".join(str(exc).split())
    return text if isinstance(exc, VRNError) else f"{type(exc).__name__}: {text}"


def run_command(prog: str, parser: argparse.ArgumentParser,
                body: Callable[[argparse.Namespace], int], argv: list[str] | None) -> int:
    """Parse ``argv`` with ``parser`` (plus ``--debug``) and run ``body(args)`` under the
    policy above; returns the exit code."""
    parser.add_argument("--debug", action="store_true",
                        help="print the full traceback of an unexpected error")
    args = parser.parse_args(argv)
    with sigterm_as_interrupt():
        try:
            return body(args)
        except UsageError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return USAGE_EXIT
        except VRNError as exc:
            print(f"{prog}: {exc}", file=sys.stderr)
            return ERROR_EXIT
        except OSError as exc:
            where = f"{exc.filename}: " if exc.filename else ""
            print(f"{prog}: {where}{exc.strerror or exc}", file=sys.stderr)
            return ERROR_EXIT
        except KeyboardInterrupt as exc:
            print(f"{prog}: {interrupt_word(exc)}", file=sys.stderr)
            return interrupt_exit(exc)
        except Exception as exc:
            if args.debug:
                traceback.print_exc()
                return ERROR_EXIT
            log = _write_traceback(prog)
            print(f"{prog}: unexpected {describe_error(exc)} (traceback in {log}; --debug "
                  "prints it)", file=sys.stderr)
            return ERROR_EXIT


def _write_traceback(prog: str) -> Path | str:
    """Write the current exception's traceback to a new file; its path (or a note)."""
    try:
        folder = Path(tempfile.gettempdir())
        fd, path = tempfile.mkstemp(prefix=f"{prog}-{time.strftime('%Y%m%d-%H%M%S')}-",
                                    suffix=".txt", dir=folder)
        with os.fdopen(fd, "w") as f:
            traceback.print_exc(file=f)
        return path
    except OSError:
        return "nowhere: the temporary folder is not writable"
