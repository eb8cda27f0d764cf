"""The trainer as a user runs it: the CLI killed with SIGKILL after a checkpoint and rerun resumes exactly;
two CPU ranks under the ``deepspeed`` launcher each train on their own shard."""

from __future__ import annotations

import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from student_trainer.trainer.config import load_trainer_config
from student_trainer.trainer.extensions import default_extensions_dir
from student_trainer.trainer.loop import train
from tests import REPO

from .helpers import (
    free_port,
    losses_by_step,
    read_metrics,
    source,
    subprocess_env,
    trainer_config,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def _config(tmp_path: Path, name: str, target: Path, teachers, steps: int, micro: int, gas: int, **run) -> Path:
    config = trainer_config(target, tmp_path / name, [source(n, t) for n, t in teachers.items()],
                            train={"max_steps": steps, "seed": 0, "deepspeed": {
                                "train_micro_batch_size_per_gpu": micro, "gradient_accumulation_steps": gas,
                                "optimizer": {"params": {"lr": 1e-3}}}},
                            run={**trainer_config(target, tmp_path / name, [])["run"], **run})
    return write_config(config, tmp_path / f"{name}.yaml")


def _cli(*args: str) -> list[str]:
    return [sys.executable, "-m", "student_trainer", *args]


def _start(cmd: list[str]) -> subprocess.Popen:
    return subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                            text=True)


def test_ctrl_c_then_sigkill_then_rerun_equals_a_straight_run(tmp_path, target, teachers):
    """One command, stopped twice: Ctrl-C while it waits on a teacher (exit 130, the checkpoint Ctrl-C writes),
    the same command resumes and is SIGKILLed after a periodic checkpoint, the same command again finishes —
    each step logged once, and the losses of a straight run. (One test for both: each trainer start costs
    ~12 s of imports on a 2-core machine.)"""
    run = {"checkpoint_every": 4, "prefetch_depth": 1}  # depth 1: each teacher sees micro-batches in order
    straight = tmp_path / "straight"
    train(load_trainer_config(_config(tmp_path, "straight", target, teachers, 6, 2, 2, **run)))
    cmd = _cli("--config", str(_config(tmp_path, "stopped", target, teachers, 6, 2, 2, **run)))
    stopped, gpt2 = tmp_path / "stopped", teachers["gpt2"].backend

    gpt2.hold_after_more(4)  # serves steps 1-2 (2 micro-batches each), holds step 3's first fetch
    proc = _start(cmd)
    try:
        assert gpt2.held.wait(240), "the run never reached step 3"
        proc.send_signal(signal.SIGINT)  # while the trainer waits for the held teacher
        _, err = proc.communicate(timeout=120)
    finally:
        proc.kill()
        gpt2.stop_holding()
    assert proc.returncode == 130, err[-3000:]
    assert "checkpoint saved, rerun the same command to resume" in err
    assert (stopped / "checkpoints" / "latest").read_text().strip() == "step2"  # no periodic one before step 4
    assert [r["step"] for r in read_metrics(stopped)[0]] == [1, 2]

    gpt2.hold_after_more(4)  # serves steps 3-4, holds step 5's first fetch
    proc = _start(cmd)
    try:
        latest, deadline = stopped / "checkpoints" / "latest", time.monotonic() + 240
        while not (latest.exists() and latest.read_text().strip() == "step4"):
            assert proc.poll() is None, f"trainer exited early:\n{proc.stderr.read()[-3000:]}"
            assert time.monotonic() < deadline, "no step4 checkpoint"
            time.sleep(0.1)
        assert gpt2.held.wait(120)  # the run is waiting for step 5's teacher outputs
        proc.kill()
        proc.wait(60)
        err = proc.stderr.read()
    finally:
        proc.kill()
        gpt2.stop_holding()
    assert "resumed from step 2 (micro-batch 4)" in err
    assert [r["step"] for r in read_metrics(stopped)[0]] == [1, 2, 3, 4]

    rerun = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert rerun.returncode == 0, rerun.stderr[-3000:]
    assert "resumed from step 4 (micro-batch 8)" in rerun.stderr
    assert [r["step"] for r in read_metrics(stopped)[0]] == list(range(1, 7))  # each step once
    expected, got = losses_by_step(straight), losses_by_step(stopped)
    assert [got[s] for s in range(1, 7)] == pytest.approx([expected[s] for s in range(1, 7)], rel=1e-5)
    assert expected[6] != expected[3]


def test_two_ranks_under_the_deepspeed_launcher_each_train_their_own_shard(tmp_path, target, teachers):
    # 1 rank x 2 micro-batches of 2 blocks = 2 ranks x 1 micro-batch of 2: the same 4 blocks per step (rank r
    # takes every 2nd block of the seeded order), the same global token count, hence the same losses.
    one = tmp_path / "one"
    train(load_trainer_config(_config(tmp_path, "one", target, teachers, 3, 2, 2)))
    cfg = _config(tmp_path, "two", target, teachers, 3, 2, 1)
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "student_trainer", "--config", str(cfg)]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    assert '"world": 2' in done.stdout + done.stderr
    two_steps, two_evals = read_metrics(tmp_path / "two")
    one_steps, _ = read_metrics(one)
    assert [r["step"] for r in two_steps] == [1, 2, 3] and len(two_evals) == 1  # rank 0 alone writes metrics
    for a, b in zip(one_steps, two_steps, strict=True):
        assert b["tokens"] == a["tokens"]
        for key in ("loss", "clm_loss", "fusion_loss"):
            assert b[key] == pytest.approx(a[key], rel=1e-4), key
    assert (tmp_path / "two" / "final" / "model.safetensors").exists()


def test_a_stale_build_lock_does_not_hang_the_next_run(tmp_path, target):
    """A first run killed while DeepSpeed built its op left ``deepspeed_shm_comm/lock``: the next run removes
    it with a warning and trains (before the fix it slept forever in DeepSpeed's start-up)."""
    built = Path(os.environ.get("TORCH_EXTENSIONS_DIR") or default_extensions_dir() or tmp_path / "none")
    extensions = tmp_path / "torch_extensions"
    if built.is_dir():
        shutil.copytree(built, extensions)  # the prebuilt op, so only the lock is at stake
    lock = extensions / "deepspeed_shm_comm" / "lock"
    lock.parent.mkdir(parents=True, exist_ok=True)
    lock.touch()
    os.utime(lock, (time.time() - 3600, time.time() - 3600))
    cfg = write_config(trainer_config(target, tmp_path / "out", [], method={"lambda_clm": 1.0},
                                      train={"max_steps": 1}, run={"export": False, "output_dir": str(tmp_path / "out"),
                                                                   "progress": False, "eval_blocks": 2}),
                       tmp_path / "run.yaml")
    env = subprocess_env() | {"TORCH_EXTENSIONS_DIR": str(extensions)}
    done = subprocess.run(_cli("--config", str(cfg)), cwd=REPO, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "removed a stale DeepSpeed build lock" in done.stderr and not lock.exists()
