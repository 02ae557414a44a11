"""SIGTERM handled like Ctrl-C: ``timeout``, systemd and docker stop a command with
SIGTERM, and it must then finish or discard the current item, finalise what it writes
and exit with 143, as Ctrl-C does with 130."""

from __future__ import annotations

import contextlib
import signal
import threading
from collections.abc import Iterator

INTERRUPT_EXIT, TERMINATE_EXIT = 130, 143


class Terminated(KeyboardInterrupt):
    """SIGTERM, raised in the main thread where Ctrl-C raises ``KeyboardInterrupt``."""


def _raise_terminated(signum, frame):
    raise Terminated()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread (a no-op
    outside the main thread, where signal handlers cannot be set)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = signal.signal(signal.SIGTERM, _raise_terminated)
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


# The word a command reports an interrupt with, and its exit code.
EXIT_CODES = {"interrupted": INTERRUPT_EXIT, "terminated": TERMINATE_EXIT}


def interrupt_word(exc: BaseException) -> str:
    """``"terminated"`` after SIGTERM, ``"interrupted"`` after Ctrl-C."""
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


def interrupt_exit(exc: BaseException) -> int:
    """The exit code for an interrupt: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_CODES[interrupt_word(exc)]
