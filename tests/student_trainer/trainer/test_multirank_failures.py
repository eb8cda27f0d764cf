"""Exactly one rank's source fails, under two real CPU ranks: every rank exits 3 with the same message, one
checkpoint is written, and the same command (the source back) resumes to the weights of a straight run.

Each rank is started the way a launcher starts it (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``/``PORT`` in its
environment) with a config of its own that differs only in where source ``gpt2`` lives — as on two nodes whose
routes to a teacher differ: rank 1's replica fails (killed, or back with another tokenizer), rank 0's does not.
Before the ranks agreed on failures, rank 1 raised alone and entered the checkpoint's collective while rank 0
sat in the step's all-reduce: a hang until the process group's timeout (this test's timeout catches it)."""

from __future__ import annotations

import subprocess
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from .helpers import (
    Teacher,
    launch_ranks,
    losses_by_step,
    read_metrics,
    source,
    trainer_config,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
WORLD, STEPS = 2, 5
# rank 1's gpt2 replica serves micro-batches 0 and 1, holds the forward of micro-batch 2 and is then killed:
# step 3 fails on rank 1 only (each step is one micro-batch per rank), so the checkpoint is step 2's
HOLD_AFTER, FAILED_STEP = 2, 3


@pytest.fixture(scope="module")
def mpt(tiny_model_dirs):
    teacher = Teacher(tiny_model_dirs["mpt"])
    yield teacher
    teacher.stop()


@pytest.fixture
def healthy_gpt2(tiny_model_dirs):
    teacher = Teacher(tiny_model_dirs["gpt2"])
    yield teacher
    teacher.stop()


def _configs(tmp_path: Path, name: str, target: Path, gpt2: list[Teacher], mpt: Teacher, **gpt2_policy) -> list[Path]:
    """One config per rank: the same run, source gpt2 at ``gpt2[rank]``. SGD at a constant lr: every step
    moves the weights (no warm-up at lr 0), by an amount that follows the gradient's scale."""
    out = []
    for rank, teacher in enumerate(gpt2):
        config = trainer_config(target, tmp_path / name, [source("gpt2", teacher, **gpt2_policy), source("mpt", mpt)],
                                train={"max_steps": STEPS, "seed": 0, "deepspeed": {
                                    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 1,
                                    "optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "scheduler": None}},
                                run={"output_dir": str(tmp_path / name), "eval_blocks": 4, "progress": False,
                                     "prefetch_depth": 1, "connect_timeout_s": 30})  # depth 1: forwards in order
        out.append(write_config(config, tmp_path / f"{name}-rank{rank}.yaml"))
    return out


def _last_line(done: subprocess.CompletedProcess) -> str:
    return [line for line in done.stderr.splitlines() if line.startswith("livefuse-train: ")][-1]


def _assert_all_exit_3_alike(done: list[subprocess.CompletedProcess], expected: str, out: Path) -> None:
    for d in done:
        assert d.returncode == 3, d.stderr[-4000:]
    lines = {_last_line(d) for d in done}
    assert len(lines) == 1, lines  # the same message on every rank
    (line,) = lines
    assert expected in line and "(on rank 1 of 2)" in line, line
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{FAILED_STEP - 1}"
    assert [r["step"] for r in read_metrics(out)[0]] == list(range(1, FAILED_STEP))


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


def test_fail_on_one_rank_stops_every_rank_and_the_rerun_resumes_bit_identically(tmp_path, target, mpt,
                                                                                  healthy_gpt2, tiny_model_dirs):
    straight = launch_ranks(_configs(tmp_path, "straight", target, [healthy_gpt2, healthy_gpt2], mpt, failure="fail"))
    assert all(d.returncode == 0 for d in straight), straight[0].stderr[-3000:] + straight[1].stderr[-3000:]
    flaky = Teacher(tiny_model_dirs["gpt2"], hold_after=HOLD_AFTER)
    try:
        chaos = flaky.kill_when_held()
        configs = _configs(tmp_path, "failed", target, [healthy_gpt2, flaky], mpt, failure="fail")
        _assert_all_exit_3_alike(launch_ranks(configs), "source 'gpt2' failed: ", tmp_path / "failed")
        chaos.join(60)
        flaky.start(tiny_model_dirs["gpt2"])  # back on the same port: the same commands go on
        rerun = launch_ranks(configs)
    finally:
        flaky.stop()
    assert all(d.returncode == 0 for d in rerun), rerun[0].stderr[-3000:] + rerun[1].stderr[-3000:]
    assert f"resumed from step {FAILED_STEP - 1}" in rerun[0].stderr
    assert losses_by_step(tmp_path / "failed") == losses_by_step(tmp_path / "straight")  # exactly
    got, expected, initial = _weights(tmp_path / "failed"), _weights(tmp_path / "straight"), load_file(
        target / "model.safetensors")
    assert got.keys() == expected.keys()
    assert all(torch.equal(got[k], expected[k]) for k in got)  # bit-identical
    assert any(not torch.equal(expected[k], initial[k]) for k in expected)  # and the run did train


@pytest.mark.parametrize("case", ["wait past wait_max_s", "another tokenizer"])
def test_wait_timeout_or_a_changed_tokenizer_on_one_rank_stops_every_rank_alike(case, tmp_path, target, mpt,
                                                                                 healthy_gpt2, tiny_model_dirs):
    flaky = Teacher(tiny_model_dirs["gpt2"], hold_after=HOLD_AFTER)
    try:
        back = tiny_model_dirs["llama"] if case == "another tokenizer" else None  # llama-spm on gpt2's port
        chaos = flaky.kill_when_held(then_start=back)
        configs = _configs(tmp_path, "run", target, [healthy_gpt2, flaky], mpt, failure="wait", wait_max_s=3)
        expected = ("did not come back within wait_max_s=3" if back is None else "came back with tokenizer")
        _assert_all_exit_3_alike(launch_ranks(configs), expected, tmp_path / "run")
        chaos.join(60)
    finally:
        flaky.stop()
