"""Teachers killed mid-run: a second replica takes over under every policy; with one replica ``skip`` trains
on without it and counts the skipped sequences, ``wait`` continues when it is back on its port, ``fail``
saves a checkpoint and stops (CLI exit 3) and the same command resumes; a source that comes back with
another tokenizer stops the run (exit 3)."""

from __future__ import annotations

from pathlib import Path

import pytest

from student_trainer.__main__ import main
from student_trainer.trainer.config import load_trainer_config
from student_trainer.trainer.loop import train

from .helpers import Teacher, read_metrics, source, trainer_config, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]

STEPS = 4  # x 2 micro-batches; a killed teacher serves its first 2 forwards, then dies on the third


@pytest.fixture(scope="module")
def mpt(tiny_model_dirs):
    teacher = Teacher(tiny_model_dirs["mpt"])
    yield teacher
    teacher.stop()


@pytest.fixture
def stop_after():
    started: list[Teacher] = []
    yield started
    for t in started:
        t.stop()


def _config(tmp_path: Path, target: Path, sources: list, **sections) -> Path:
    config = trainer_config(target, tmp_path / "out", sources, train={"max_steps": STEPS, "seed": 0, "deepspeed": {
        "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2}}, **sections)
    return write_config(config, tmp_path / "run.yaml")


@pytest.mark.parametrize("policy", ["wait", "skip", "fail"])
def test_second_replica_takes_over_with_no_failed_step(policy, tmp_path, target, mpt, tiny_model_dirs, stop_after):
    dying, spare = Teacher(tiny_model_dirs["gpt2"], hold_after=1), Teacher(tiny_model_dirs["gpt2"])
    stop_after += [dying, spare]
    dying.kill_when_held()
    train(load_trainer_config(_config(tmp_path, target, [source("gpt2", dying, spare, failure=policy),
                                                          source("mpt", mpt)])))
    steps, evals = read_metrics(tmp_path / "out")
    assert dying.server is None and dying.backend.held.is_set()  # it was killed while serving the run
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and len(evals) == 1
    assert all(r["skipped/gpt2"] == 0 and r["no_teacher_sequences"] == 0 for r in steps)
    assert spare.backend.calls > 0


def test_skip_trains_on_without_the_dead_source_and_counts_it(tmp_path, target, mpt, tiny_model_dirs, stop_after):
    dying = Teacher(tiny_model_dirs["gpt2"], hold_after=2)
    stop_after.append(dying)
    dying.kill_when_held()
    train(load_trainer_config(_config(tmp_path, target, [source("gpt2", dying, failure="skip"),
                                                          source("mpt", mpt, failure="skip")])))
    steps, (final,) = read_metrics(tmp_path / "out")
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert steps[0]["skipped/gpt2"] == 0 and steps[-1]["skipped/gpt2"] == 1.0  # a rate: all its sequences
    assert all(r["skipped/mpt"] == 0 for r in steps)
    skipped = [r for r in steps if r["skipped/gpt2"] == 1.0]
    assert all(r["selected/mpt"] == 1.0 and r["fusion_loss"] > 0 for r in skipped)  # fused from mpt alone
    assert final["eval"]["gpt2/ce_per_token"] != final["eval"]["gpt2/ce_per_token"]  # NaN: no gpt2 to score
    assert final["eval"]["mpt/ce_per_token"] > 0


def test_wait_continues_once_the_teacher_is_back(tmp_path, target, mpt, tiny_model_dirs, stop_after):
    teacher = Teacher(tiny_model_dirs["gpt2"], hold_after=2)
    stop_after.append(teacher)
    first = teacher.backend
    chaos = teacher.kill_when_held(then_start=tiny_model_dirs["gpt2"])
    train(load_trainer_config(_config(tmp_path, target, [source("gpt2", teacher, failure="wait"),
                                                          source("mpt", mpt)])))
    chaos.join(60)
    steps, _ = read_metrics(tmp_path / "out")
    assert first.held.is_set() and teacher.backend is not first and teacher.backend.calls > 0
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert all(r["skipped/gpt2"] == 0 and r["no_teacher_sequences"] == 0 for r in steps)


def test_fail_saves_a_checkpoint_and_the_same_command_resumes(tmp_path, target, mpt, tiny_model_dirs, stop_after,
                                                              capsys):
    teacher = Teacher(tiny_model_dirs["gpt2"], hold_after=2)
    stop_after.append(teacher)
    chaos = teacher.kill_when_held()
    argv = ["--config", str(_config(tmp_path, target, [source("gpt2", teacher, failure="fail"),
                                                        source("mpt", mpt)]))]
    assert main(argv) == 3
    chaos.join(60)
    err = capsys.readouterr().err
    assert "livefuse-train: source 'gpt2' failed: " in err and "rerun the same command to resume" in err
    out = tmp_path / "out"
    stopped_at = [r["step"] for r in read_metrics(out)[0]]
    assert stopped_at == list(range(1, len(stopped_at) + 1)) and len(stopped_at) < STEPS
    assert (out / "checkpoints" / "latest").read_text().strip() == f"step{len(stopped_at)}"

    teacher.start(tiny_model_dirs["gpt2"])  # back on the same port: the same command goes on
    assert main(argv) == 0
    assert f"resumed from step {len(stopped_at)}" in capsys.readouterr().err
    steps, evals = read_metrics(out)
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1)) and len(evals) == 1  # no step twice
    assert (out / "final" / "config.json").exists()


def test_a_source_back_with_another_tokenizer_stops_the_run(tmp_path, target, mpt, tiny_model_dirs, stop_after,
                                                             capsys):
    teacher = Teacher(tiny_model_dirs["gpt2"], hold_after=2)
    stop_after.append(teacher)
    chaos = teacher.kill_when_held(then_start=tiny_model_dirs["llama"])  # llama-spm on gpt2's port
    argv = ["--config", str(_config(tmp_path, target, [source("gpt2", teacher, failure="wait"),
                                                        source("mpt", mpt)]))]
    assert main(argv) == 3
    chaos.join(60)
    err = capsys.readouterr().err
    assert "livefuse-train: source 'gpt2' came back with tokenizer" in err
    steps, _ = read_metrics(tmp_path / "out")
    assert len(steps) < STEPS
    assert (tmp_path / "out" / "checkpoints" / "latest").read_text().strip() == f"step{len(steps)}"
