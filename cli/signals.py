"""SIGTERM and SIGHUP stop a command the way Ctrl-C does: the same cleanup, then exit 128 + the signal number.

``kill``, a closed terminal or a service manager sends these instead of SIGINT; by default they end the
process at once, skipping the cleanup a KeyboardInterrupt runs (a half-written output would stay behind).
Raising ``Stopped``, a KeyboardInterrupt, sends them down every path Ctrl-C already takes.
"""

from __future__ import annotations

import signal
import threading
from collections.abc import Iterator
from contextlib import contextmanager

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(KeyboardInterrupt):
    """A stop signal other than Ctrl-C, raised where the program was."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name


def exit_code(interrupt: KeyboardInterrupt) -> int:
    """The shell's convention: 128 + the signal number (130 for Ctrl-C)."""
    return 128 + (interrupt.signum if isinstance(interrupt, Stopped) else signal.SIGINT)


@contextmanager
def stop_signals_interrupt() -> Iterator[None]:
    """Within the block, SIGTERM and SIGHUP raise ``Stopped`` (handlers can be set only in the main thread)."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return

    def stop(signum: int, _frame: object) -> None:
        raise Stopped(signum)

    # a signal already ignored (``nohup`` ignores SIGHUP) stays ignored: the user asked for that
    previous = {signum: signal.signal(signum, stop) for signum in STOP_SIGNALS
                if signal.getsignal(signum) == signal.SIG_DFL}
    try:
        yield
    finally:
        for signum, handler in previous.items():
            signal.signal(signum, handler if handler is not None else signal.SIG_DFL)
