"""Stopping a run cleanly: Ctrl-C / SIGTERM become a request honoured at the next step boundary.

The first SIGINT or SIGTERM sets the flag; the loop sees it before any update of the next step (all ranks
agree on it in the step's all-reduce), saves a checkpoint and raises :class:`Interrupted`; the CLI exits
130. A second Ctrl-C raises ``KeyboardInterrupt`` at once (no checkpoint). ``docker stop`` and Kubernetes
send SIGTERM, so a preempted trainer keeps its last step too.
"""

from __future__ import annotations

import signal
import threading
from dataclasses import dataclass
from types import FrameType


class Interrupted(RuntimeError):
    """The run was asked to stop (Ctrl-C or SIGTERM); a checkpoint was saved."""


@dataclass
class RunPosition:
    """The last completed optimizer step and the index of the next micro-batch to train on."""

    step: int = 0
    micro_index: int = 0


class StopFlag:
    """While entered (main thread only), SIGINT/SIGTERM request a stop instead of killing the process."""

    def __init__(self) -> None:
        self._event = threading.Event()
        self._previous: dict[int, object] = {}

    @property
    def requested(self) -> bool:
        return self._event.is_set()

    def request(self) -> None:
        self._event.set()

    def wait(self, timeout: float) -> bool:
        return self._event.wait(timeout)

    def _handle(self, signum: int, _frame: FrameType | None) -> None:
        if self._event.is_set() and signum == signal.SIGINT:
            raise KeyboardInterrupt
        self._event.set()

    def __enter__(self) -> StopFlag:
        if threading.current_thread() is threading.main_thread():
            for sig in (signal.SIGINT, signal.SIGTERM):
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc: object) -> None:
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)  # type: ignore[arg-type]
        self._previous.clear()
