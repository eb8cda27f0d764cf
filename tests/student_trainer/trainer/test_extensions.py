"""A DeepSpeed build lock left by a killed build is removed at start; a live build's lock is kept."""

from __future__ import annotations

import logging
import os
import subprocess
import time
from pathlib import Path

import pytest

from student_trainer.trainer.extensions import builder_alive, clear_stale_locks


def _plant(root: Path, age_s: float, nested: bool = False) -> Path:
    folder = root / ("py311_cpu" if nested else "") / "deepspeed_shm_comm"
    folder.mkdir(parents=True)
    lock = folder / "lock"
    lock.touch()
    os.utime(lock, (time.time() - age_s, time.time() - age_s))
    return lock


@pytest.mark.parametrize("nested", [False, True])
def test_a_stale_lock_is_removed_with_a_warning(tmp_path, caplog, nested):
    lock = _plant(tmp_path, age_s=600, nested=nested)
    with caplog.at_level(logging.WARNING, logger="livefuse"):
        assert clear_stale_locks(tmp_path) == [lock]
    assert not lock.exists()
    assert "removed a stale DeepSpeed build lock" in caplog.text


def test_a_lock_with_a_live_builder_is_kept(tmp_path):
    lock = _plant(tmp_path, age_s=600)
    builder = subprocess.Popen(["sleep", "30"], cwd=lock.parent)  # stands for ninja/the compiler
    try:
        assert builder_alive(lock.parent)
        assert clear_stale_locks(tmp_path) == [] and lock.exists()
    finally:
        builder.kill()
        builder.wait()
    assert clear_stale_locks(tmp_path) == [lock]


def test_a_young_lock_is_kept(tmp_path):
    lock = _plant(tmp_path, age_s=1)  # the moment between taking the lock and starting ninja
    assert clear_stale_locks(tmp_path) == [] and lock.exists()


def test_without_proc_it_asks_the_user_to_delete_the_lock(tmp_path, monkeypatch):
    lock = _plant(tmp_path, age_s=600)
    monkeypatch.setattr("student_trainer.trainer.extensions.builder_alive", lambda _folder: None)
    with pytest.raises(RuntimeError, match=f"{lock} exists"):
        clear_stale_locks(tmp_path)


def test_the_environments_ninja_comes_first_on_path(tmp_path, monkeypatch):
    """Two ninjas (the system's 1.11, the wheel's 1.13) hash build commands differently, and each rebuilt the
    op the other built; inside a virtual environment that holds ninja, PATH finds that one first."""
    from student_trainer.trainer.extensions import prefer_venv_ninja

    venv = tmp_path / "venv"
    (venv / "bin").mkdir(parents=True)
    monkeypatch.setattr("sys.prefix", str(venv))
    monkeypatch.setattr("sys.base_prefix", str(tmp_path / "base"))
    env = {"PATH": f"/usr/bin{os.pathsep}{venv / 'bin'}{os.pathsep}/bin"}
    assert not prefer_venv_ninja(env) and env["PATH"].startswith("/usr/bin")  # no ninja in the environment
    (venv / "bin" / "ninja").touch()
    assert prefer_venv_ninja(env)
    assert env["PATH"].split(os.pathsep) == [str(venv / "bin"), "/usr/bin", "/bin"]
    assert not prefer_venv_ninja(env)  # already first: unchanged
    monkeypatch.setattr("sys.base_prefix", str(venv))
    assert not prefer_venv_ninja({"PATH": "/usr/bin"})  # not a virtual environment
