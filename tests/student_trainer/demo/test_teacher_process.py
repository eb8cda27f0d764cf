"""The demo's teacher child process: its log pump finds the port and the 'serving' line and keeps reading
whatever else the child writes, so the child never blocks on a full pipe."""

from __future__ import annotations

import json
import sys
import time

from student_trainer.demo.teacher_process import TeacherProcess

_CHILD = """
import json, sys
print("{ not JSON: a line that only starts like one", file=sys.stderr, flush=True)
print("[1, 2]", file=sys.stderr, flush=True)
print("{}", file=sys.stderr, flush=True)
print(json.dumps({"msg": "listening", "port": 43210}), file=sys.stderr, flush=True)
print(json.dumps({"msg": "serving"}), file=sys.stderr, flush=True)
for i in range(20_000):  # ~1.4 MB: blocks on the pipe unless someone reads it
    print("{ more log " + str(i), file=sys.stderr)
print(json.dumps({"msg": "done"}), file=sys.stderr, flush=True)
"""


def test_a_line_that_is_not_json_does_not_stop_the_log_pump(tmp_path):
    """Defect: every stderr line starting with '{' was parsed; one that was not JSON killed the pump thread,
    the pipe filled and the teacher blocked on its next log write (here: never reported serving)."""
    proc = TeacherProcess("unused", name="fake", startup_timeout=60, log_path=tmp_path / "teacher.log")
    proc.cmd = [sys.executable, "-c", _CHILD]
    proc.launch()
    try:
        proc.wait_ready()
        assert proc.port == 43210
        assert proc.proc is not None and proc.proc.wait(timeout=60) == 0  # wrote all of its log: nothing blocked
    finally:
        proc.stop()
    log, deadline = tmp_path / "teacher.log", time.monotonic() + 60  # the pump copies the rest after the exit
    while not log.read_text().endswith('{"msg": "done"}\n'):
        assert time.monotonic() < deadline, "the pump stopped copying the child's log"
        time.sleep(0.05)
    lines = log.read_text().splitlines()
    assert lines[0].startswith("{ not JSON") and json.loads(lines[-1]) == {"msg": "done"} and len(lines) == 20_006
