"""Start a teacher server as a child process on a free local port and stop it reliably.

    with TeacherProcess(model_dir) as teacher:      # SERVING when the block starts
        client = TeacherClient(teacher.address)

The child is stopped with SIGTERM (graceful drain), then SIGKILL if it lingers, on normal exit, on an
exception and on Ctrl-C; it also gets SIGKILL from the kernel if this process dies (Linux PR_SET_PDEATHSIG).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
from collections import deque
from pathlib import Path

from student_trainer.demo.cpu_malloc import child_env
from student_trainer.experiments.processes import stop_process

_DIST_VARS = {"RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"}


def clean_env() -> dict[str, str]:
    """This process's environment without a launcher's rendezvous variables: a child (a teacher, a new
    training run) is not part of this process's torch.distributed group; with the glibc malloc settings of
    ``cpu_malloc`` (unless the environment sets them)."""
    return child_env({k: v for k, v in os.environ.items() if k not in _DIST_VARS})


def _die_with_parent() -> None:
    """In the child: ask Linux to SIGKILL us when the parent dies (no orphans after a crash)."""
    try:
        import ctypes

        ctypes.CDLL("libc.so.6", use_errno=True).prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


def _json_record(line: str) -> dict | None:
    """A teacher's JSON log line as a dict; None for anything else (a library's plain line, a traceback, a
    line that only starts like JSON): the pump must go on reading, or the child blocks on a full pipe."""
    if not line.startswith("{"):
        return None
    try:
        record = json.loads(line)
    except ValueError:
        return None
    return record if isinstance(record, dict) else None


class TeacherProcess:
    def __init__(self, model: str | Path, *args: str, name: str = "teacher", startup_timeout: float = 300.0,
                 log_path: Path | None = None, env: dict[str, str] | None = None) -> None:
        """``args`` are more ``livefuse-teacher`` flags; ``env`` adds environment variables for the child."""
        self.cmd = [sys.executable, "-m", "teacher_server", "--model", str(model), "--host", "127.0.0.1",
                    "--port", "0", "--metrics-port", "none", "--log-format", "json", *args]
        self.name, self.startup_timeout, self.log_path = name, startup_timeout, log_path
        self.extra_env = env or {}
        self.proc: subprocess.Popen | None = None
        self.port: int | None = None
        self.recent: deque[str] = deque(maxlen=20)
        self._ready = threading.Event()

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def _pump(self) -> None:
        """Reads the child's log: finds the port and the 'serving' line, keeps the tail, copies to a file."""
        assert self.proc is not None and self.proc.stderr is not None
        sink = open(self.log_path, "a") if self.log_path else None  # noqa: SIM115
        for line in self.proc.stderr:
            self.recent.append(line.rstrip())
            if sink:
                sink.write(line)
                sink.flush()
            record = _json_record(line)
            if record is not None:
                self.port = record.get("port", self.port)
                if record.get("msg") == "serving":
                    self._ready.set()
        if sink:
            sink.close()

    def start(self) -> TeacherProcess:
        """Starts the child and waits until it serves."""
        return self.launch().wait_ready()

    def launch(self) -> TeacherProcess:
        """Starts the child without waiting (start several, then ``wait_ready`` each: they load in parallel)."""
        env = clean_env() | {"PYTHONUNBUFFERED": "1"} | self.extra_env
        self.proc = subprocess.Popen(self.cmd, stderr=subprocess.PIPE, stdout=subprocess.DEVNULL, text=True, env=env,
                                     preexec_fn=_die_with_parent if sys.platform == "linux" else None)
        self._started = time.monotonic()
        threading.Thread(target=self._pump, name=f"{self.name}-log", daemon=True).start()
        return self

    def wait_ready(self) -> TeacherProcess:
        """Waits until the launched child serves; stops it and raises if it exits or ``startup_timeout``
        (counted from the launch) passes first."""
        assert self.proc is not None, "launch() first"
        deadline = self._started + self.startup_timeout
        while not self._ready.wait(0.2):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                tail = "\n  ".join(self.recent)
                raise RuntimeError(f"{self.name} did not start ({' '.join(self.cmd)}):\n  {tail}")
        return self

    def stop(self, grace: float = 10.0) -> None:
        if self.proc is not None:
            stop_process(self.proc, grace)

    def __enter__(self) -> TeacherProcess:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()
