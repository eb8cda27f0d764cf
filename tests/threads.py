"""Threads in tests whose failures reach the test: an exception raised on a worker thread fails the test
(instead of being printed and lost), and a thread still running after the join's timeout is a failure too."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from typing import Any


class Workers:
    """Starts functions on threads; ``join`` waits for all of them, then re-raises the first exception."""

    def __init__(self) -> None:
        self.threads: list[threading.Thread] = []
        self.errors: list[BaseException] = []
        self._lock = threading.Lock()

    def start(self, fn: Callable[..., Any], *args: Any, name: str | None = None) -> threading.Thread:
        def run() -> None:
            try:
                fn(*args)
            except BaseException as err:  # noqa: BLE001 - handed to the test by join
                with self._lock:
                    self.errors.append(err)

        thread = threading.Thread(target=run, name=name, daemon=True)
        self.threads.append(thread)
        thread.start()
        return thread

    def join(self, timeout: float = 120.0) -> None:
        """Every thread must end within ``timeout`` seconds in all (a guard against a hang, not a speed
        claim); the first exception any of them raised is raised here."""
        deadline = time.monotonic() + timeout
        for thread in self.threads:
            thread.join(max(deadline - time.monotonic(), 0.0))
        alive = [t.name for t in self.threads if t.is_alive()]
        assert not alive, f"{len(alive)} worker thread(s) still running after {timeout:.0f} s: {alive}"
        if self.errors:
            raise self.errors[0]


def wait_until(condition: Callable[[], bool], timeout: float = 60.0, what: str = "the condition") -> None:
    """Polls ``condition`` until it holds; failing after ``timeout`` seconds only guards against a hang."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, f"{what} did not happen within {timeout:.0f} s"
        time.sleep(0.01)
