"""Ctrl+C during ``tuner.fit()``: tell a user's stop from a time budget's."""

from __future__ import annotations

import signal
import threading
from typing import Any


class CtrlC:
    """Context manager; ``pressed`` says whether Ctrl+C stopped ``tuner.fit()``.

    Tune installs its own SIGINT handler for the run; the first Ctrl+C makes it stop the trials,
    save its state and put back the handler it found, this one (a second Ctrl+C then interrupts).
    A time budget also stops running trials, but leaves Tune's handler replaced by nothing of ours.
    """

    def __enter__(self) -> CtrlC:
        self.pressed = False
        self._main = threading.current_thread() is threading.main_thread()
        if self._main:
            self._before = signal.getsignal(signal.SIGINT)
            signal.signal(signal.SIGINT, self._again)
        return self

    def _again(self, signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    def __exit__(self, *exc: Any) -> None:
        if self._main:
            self.pressed = signal.getsignal(signal.SIGINT) == self._again
            signal.signal(signal.SIGINT, self._before)
