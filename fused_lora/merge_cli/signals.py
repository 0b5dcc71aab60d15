"""SIGINT, SIGTERM and SIGHUP during a merge: stop cleanly, with exit status 128 + the signal number.

The default SIGTERM/SIGHUP action kills the process on the spot, leaving the temporary folder behind, so
`handled()` turns them (and SIGINT) into a `Stopped` exception. An exception raised from a signal handler can
appear between any two bytecodes, including inside the code that removes the temporary folder or renames the
result into place. So signals are only turned into `Stopped` inside `interruptible()` regions (loading,
writing); anywhere else they are remembered and raised by the next `interruptible()` region, or read with
`pending()`. Only the first signal counts: once stopping, later ones are ignored so the cleanup can finish
(SIGKILL still works, and what it leaves is removed by the next run; see workspace.py).

A signal whose disposition is SIG_IGN when the merge starts (`nohup` ignores SIGHUP; a shell ignores SIGINT
in background jobs) stays ignored. Outside the main thread nothing is installed (Python only allows handlers
there); SIGINT then still arrives as KeyboardInterrupt.
"""

from __future__ import annotations

import signal
import threading
from typing import Optional

STOP_SIGNALS = tuple(getattr(signal, name) for name in ("SIGINT", "SIGTERM", "SIGHUP") if hasattr(signal, name))


class Stopped(BaseException):
    """A stop signal arrived. BaseException, like KeyboardInterrupt, so `except Exception` does not eat it."""

    def __init__(self, signum: int):
        super().__init__(signum)
        self.signum = signum

    @property
    def name(self) -> str:
        return signal.Signals(self.signum).name

    @property
    def exit_status(self) -> int:
        return 128 + self.signum


class _State:
    interruptible = False
    pending: Optional[int] = None  # the first signal received
    raised = False  # Stopped has been raised for it


_state = _State()


def _handler(signum: int, _frame) -> None:
    if _state.pending is None:
        _state.pending = signum
    if _state.interruptible and not _state.raised:
        _state.raised = True
        raise Stopped(signum)


class handled:
    """Install the stop handlers for the duration of the block (restoring the previous ones after)."""

    def __enter__(self) -> "handled":
        self.previous: dict[int, object] = {}
        _state.interruptible, _state.pending, _state.raised = False, None, False
        if threading.current_thread() is threading.main_thread():
            for signum in STOP_SIGNALS:
                if signal.getsignal(signum) is not signal.SIG_IGN:
                    self.previous[signum] = signal.signal(signum, _handler)
        return self

    def __exit__(self, *_exc) -> None:
        for signum, previous in self.previous.items():
            signal.signal(signum, previous)
        _state.interruptible, _state.pending, _state.raised = False, None, False


class interruptible:
    """A region a stop signal may interrupt (raising Stopped); a signal that came earlier is raised on entry."""

    def __enter__(self) -> None:
        _state.interruptible = True  # first: a signal from here on raises in the handler itself
        if _state.pending is not None and not _state.raised:
            _state.raised, _state.interruptible = True, False
            raise Stopped(_state.pending)

    def __exit__(self, *_exc) -> None:
        _state.interruptible = False


def pending() -> Optional[int]:
    """The stop signal received so far, if any (also one that already raised Stopped)."""
    return _state.pending
