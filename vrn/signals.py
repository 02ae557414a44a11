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


def _first_interrupt(signum, frame):
    """Raise for the first Ctrl-C or SIGTERM and ignore every later one: the clean-up
    it starts (finalising a recording, joining threads) must not be cut short."""
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()


@contextlib.contextmanager
def sigterm_as_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM raises :class:`Terminated` in the main thread where
    Ctrl-C raises ``KeyboardInterrupt``, once: after the first of either, both are
    ignored, also after the block (a command that was interrupted is on its way out).
    Without an interrupt the previous handlers come back. (A no-op outside the main
    thread, where signal handlers cannot be set.)"""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, _first_interrupt)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        if signal.getsignal(signal.SIGINT) is _first_interrupt:  # not interrupted
            for sig, handler in previous.items():
                signal.signal(sig, handler)


@contextlib.contextmanager
def interrupts_deferred() -> Iterator[None]:
    """Within the block, Ctrl-C and SIGTERM are ignored (main thread only): the clean-up
    after a first interrupt (joining threads, finalising a recording) must not be cut
    short by a second one, which would lose the recording or abort the process."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    previous = {sig: signal.signal(sig, signal.SIG_IGN)
                for sig in (signal.SIGINT, signal.SIGTERM)}
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


# The word a command reports an interrupt with, and its exit code.
EXIT_CODES = {"interrupted": INTERRUPT_EXIT, "terminated": TERMINATE_EXIT}


def interrupt_word(exc: BaseException) -> str:
    """``"terminated"`` after SIGTERM, ``"interrupted"`` after Ctrl-C."""
    return "terminated" if isinstance(exc, Terminated) else "interrupted"


def interrupt_exit(exc: BaseException) -> int:
    """The exit code for an interrupt: 143 after SIGTERM, 130 after Ctrl-C."""
    return EXIT_CODES[interrupt_word(exc)]
