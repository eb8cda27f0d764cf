"""Bad configs and unreachable teachers fail before any training step, with a message that names the
problem (CLI exit 2 for the config, 3 for a source)."""

from __future__ import annotations

from pathlib import Path

import pytest

from student_trainer.__main__ import main

from .trainer_helpers import Teacher, free_port, source, trainer_config, write_config


def _argv(tmp_path: Path, target: Path, sources: list, *overrides: str) -> list[str]:
    config = write_config(trainer_config(target, tmp_path / "out", sources), tmp_path / "run.yaml")
    return ["--config", str(config), *overrides]


@pytest.mark.parametrize(("override", "message"), [
    ("method.fusion=max_ce", "method.fusion: Value error, unknown fusion 'max_ce'; accepted: avg_ce, min_ce"),
    ("method.aligner=dtw", "unknown aligner 'dtw'; accepted: mined, offsets"),
    ("sources.0.failure=retry", "sources.0.failure: Value error, unknown failure policy 'retry'; accepted: fail, "
                                "skip, wait"),
    ("sources.0.endpoints=[localhost]", "endpoint 'localhost' is not host:port"),
    ("train.max_step=3", "train.max_step: Extra inputs are not permitted"),
    ("method.lambda_clm=1.5", "method.lambda_clm: Input should be less than or equal to 1 (got 1.5)"),
    ("sources=[]", "method.lambda_clm < 1 needs at least one source; set lambda_clm=1 for CLM only"),
    ("sources=[{name: a, endpoints: ['h:1']}, {name: a, endpoints: ['h:2']}]", "sources: duplicate names ['a']"),
    ("sources.1={name: b, endpoints: ['h:1']}", "cannot set sources.1: list assignment index out of range"),
    ("run.output_dir", "override 'run.output_dir' is not key=value"),
])
def test_bad_config_exits_2_naming_the_field(override, message, tmp_path, target, capsys):
    argv = _argv(tmp_path, target, [{"name": "a", "endpoints": ["127.0.0.1:1"]}], override)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("livefuse-train: ") and message in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_missing_data_file_exits_2(tmp_path, target, capsys):
    assert main(_argv(tmp_path, target, [], "method.lambda_clm=1", f"data.train_files=[{tmp_path}/nope.txt]")) == 2
    assert f"data file {tmp_path}/nope.txt does not exist" in capsys.readouterr().err


@pytest.mark.integration
def test_unreachable_teacher_exits_3_within_the_connect_timeout(tmp_path, target, capsys):
    port = free_port()  # nobody listens there
    argv = _argv(tmp_path, target, [{"name": "ghost", "endpoints": [f"127.0.0.1:{port}"]}],
                 "run.connect_timeout_s=1")
    assert main(argv) == 3
    err = capsys.readouterr().err
    assert f"source 'ghost' at 127.0.0.1:{port} is not reachable (DEADLINE_EXCEEDED" in err
    assert "is the teacher running?" in err


@pytest.mark.integration
def test_top_k_over_the_teachers_limit_exits_2(tmp_path, target, tiny_model_dirs, capsys):
    teacher = Teacher(tiny_model_dirs["gpt2"])
    try:
        assert main(_argv(tmp_path, target, [source("gpt2", teacher, top_k=100_000)])) == 2
    finally:
        teacher.stop()
    assert "sources[gpt2].top_k=100000 exceeds the teacher's max_top_k=" in capsys.readouterr().err
