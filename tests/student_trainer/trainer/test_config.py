"""Bad configs and unreachable teachers fail before any training step, with a message that names the
problem (CLI exit 2 for the config, 3 for a source)."""

from __future__ import annotations

import socket
import subprocess
import sys
import typing
from pathlib import Path

import pytest

from student_trainer.__main__ import main
from student_trainer.trainer.config import MethodConfig, load_trainer_config

from .helpers import Teacher, source, trainer_config, write_config


def _argv(tmp_path: Path, target: Path, sources: list, *overrides: str) -> list[str]:
    config = write_config(trainer_config(target, tmp_path / "out", sources), tmp_path / "run.yaml")
    return ["--config", str(config), *overrides]


@pytest.mark.parametrize(("override", "message"), [
    ("method.fusion=max_ce", "method.fusion: Input should be 'min_ce' or 'avg_ce' (got 'max_ce')"),
    ("method.aligner=dtw", "method.aligner: Input should be 'mined' or 'offsets' (got 'dtw')"),
    ("sources.0.failure=retry", "sources.0.failure: Input should be 'wait', 'skip' or 'fail' (got 'retry')"),
    ("sources.0.endpoints=[localhost]", "endpoint 'localhost' is not host:port"),
    ("train.max_step=3", "train.max_step: Extra inputs are not permitted"),
    ("method.lambda_clm=1.5", "method.lambda_clm: Input should be less than or equal to 1 (got 1.5)"),
    ("sources=[]", "method.lambda_clm < 1 needs at least one source; set lambda_clm=1 for CLM only"),
    ("sources=[{name: a, endpoints: ['h:1']}, {name: a, endpoints: ['h:2']}]", "sources: duplicate names ['a']"),
    ("sources.2={name: b, endpoints: ['h:1']}", "cannot set sources.2: list index 2 is out of range; the list has 1"),
    ("run.output_dir", "override 'run.output_dir' is not key=value"),
])
def test_bad_config_exits_2_naming_the_field(override, message, tmp_path, target, capsys):
    argv = _argv(tmp_path, target, [{"name": "a", "endpoints": ["127.0.0.1:1"]}], override)
    assert main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("livefuse-train: ") and message in err
    assert not (tmp_path / "out").exists()  # nothing started


def test_a_bug_is_a_traceback_and_exit_1_only_a_setting_is_exit_2(tmp_path, target, monkeypatch, capsys):
    """A ValueError from a bug (a shape, zip(strict=True)) is not a bad config: it propagates (Python prints the
    traceback, exit 1); a ConfigError found when the run starts is one line and exit 2."""
    from student_trainer.trainer import loop
    from student_trainer.trainer.config import ConfigError

    argv = _argv(tmp_path, target, [], "method.lambda_clm=1")

    def bug(_config):
        raise ValueError("operands could not be broadcast together with shapes (4,) (3,)")

    monkeypatch.setattr(loop, "train", bug)
    with pytest.raises(ValueError, match="could not be broadcast"):
        main(argv)

    def too_little_data(_config):
        raise ConfigError("5 blocks are too few for 2 rank(s) x micro batch 4")

    monkeypatch.setattr(loop, "train", too_little_data)
    assert main(argv) == 2 and "livefuse-train: 5 blocks are too few" in capsys.readouterr().err


def test_missing_data_file_exits_2(tmp_path, target, capsys):
    assert main(_argv(tmp_path, target, [], "method.lambda_clm=1", f"data.train_files=[{tmp_path}/nope.txt]")) == 2
    assert f"data.train_files: data file '{tmp_path}/nope.txt' does not exist or is not readable" \
        in capsys.readouterr().err


@pytest.mark.integration
def test_unreachable_teacher_exits_3_within_the_connect_timeout(tmp_path, target, capsys):
    with socket.socket() as held:  # bound, never listening: connections are refused, and while the test runs no
        held.bind(("127.0.0.1", 0))  # other process (a second test worker, a process group's store) can take it
        port = held.getsockname()[1]
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


def test_override_appends_a_list_item_at_index_len(tmp_path, target):
    path = write_config(trainer_config(target, tmp_path / "out", [{"name": "a", "endpoints": ["h:1"]}]),
                        tmp_path / "run.yaml")
    config = load_trainer_config(path, ["sources.1={name: b, endpoints: ['h:2']}", "sources.1.top_k=5",
                                        "sources.0.endpoints.1=h:3"])
    assert [s.name for s in config.sources] == ["a", "b"] and config.sources[1].top_k == 5
    assert config.sources[0].endpoints == ["h:1", "h:3"]


def test_method_names_are_the_core_registries():
    """The config spells the method names out (no torch import); they must be the registries' keys."""
    from student_trainer.core.alignment import ALIGNERS
    from student_trainer.core.fusion import AVG_WEIGHTS, FUSIONS, SEQUENCE_CE
    from student_trainer.core.losses import FUSION_LOSSES

    fields = MethodConfig.model_fields
    for name, registry in [("aligner", ALIGNERS), ("fusion", FUSIONS), ("ce_normalization", SEQUENCE_CE),
                           ("avg_weighting", AVG_WEIGHTS), ("fusion_loss", FUSION_LOSSES)]:
        assert set(typing.get_args(fields[name].annotation)) == set(registry), name


def test_reading_a_config_does_not_import_torch(tmp_path, target):
    path = write_config(trainer_config(target, tmp_path / "out", [{"name": "a", "endpoints": ["h:1"]}]),
                        tmp_path / "run.yaml")
    code = (f"import sys; from student_trainer.trainer.config import load_trainer_config; "
            f"load_trainer_config({str(path)!r}); import student_trainer.__main__; "
            "assert 'torch' not in sys.modules, 'torch was imported'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=60)
