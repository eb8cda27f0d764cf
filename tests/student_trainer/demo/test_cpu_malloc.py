"""The demo's glibc malloc settings: a big tensor freed and allocated again reuses its pages (no new page
faults) in a process that has them, and faults them all in again in one that does not."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from student_trainer.demo import cpu_malloc

PROBE = """
import ctypes, json, resource, sys
if sys.argv[1] == "apply":
    from student_trainer.demo.cpu_malloc import apply_here
    assert apply_here()
libc = ctypes.CDLL(None)
libc.malloc.restype, libc.free.argtypes = ctypes.c_void_p, [ctypes.c_void_p]

def touch():  # 50 MB, as PyTorch's CPU allocator gets it: malloc, written, freed
    p = libc.malloc(50_000_000)
    ctypes.memset(p, 1, 50_000_000)
    libc.free(p)

touch()  # above glibc's largest dynamic mmap threshold (32 MB)
before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
for _ in range(4):
    touch()
print(json.dumps((resource.getrusage(resource.RUSAGE_SELF).ru_minflt - before) / 4))
"""


def _faults_per_alloc(env: dict[str, str], how: str = "env") -> float:
    run = subprocess.run([sys.executable, "-c", PROBE, how], env=env, capture_output=True, text=True, check=True)
    return json.loads(run.stdout)


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc settings")
def test_pages_are_reused_with_the_settings_and_faulted_in_again_without():
    plain = {k: v for k, v in os.environ.items() if k not in cpu_malloc.ENV}
    pages = 50_000_000 / os.sysconf("SC_PAGE_SIZE")
    assert _faults_per_alloc(plain) > 0.5 * pages  # every allocation maps fresh pages
    assert _faults_per_alloc(cpu_malloc.child_env(plain)) < 0.05 * pages  # a child started with child_env
    assert _faults_per_alloc(plain, "apply") < 0.05 * pages  # this process, set at run time


def test_child_env_keeps_what_the_user_set():
    env = cpu_malloc.child_env({"MALLOC_MMAP_MAX_": "65536", "PATH": "/bin"})
    assert env["MALLOC_MMAP_MAX_"] == "65536" and env["PATH"] == "/bin"
    assert env["MALLOC_TRIM_THRESHOLD_"] == str(cpu_malloc.TRIM_THRESHOLD)
