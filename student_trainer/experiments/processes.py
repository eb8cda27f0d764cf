"""Stopping a child process cleanly (a training run, a teacher): SIGTERM, then SIGKILL after a grace."""

from __future__ import annotations

import subprocess


def stop_process(proc: subprocess.Popen, grace_s: float) -> bool:
    """SIGTERM to a child, SIGKILL if it has not exited within ``grace_s``; True when it had to be killed."""
    if proc.poll() is not None:
        return False
    proc.terminate()
    try:
        proc.wait(grace_s)
        return False
    except subprocess.TimeoutExpired:
        proc.kill()
        proc.wait()
        return True
