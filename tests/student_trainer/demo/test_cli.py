"""The demo's command line: the defaults the README's table was measured with, --quick, and clear errors."""

from __future__ import annotations

import pytest

from student_trainer.demo.__main__ import TEACHER_MAX_TOP_K, parse_args
from teacher_server.config import TeacherConfig


def test_defaults_are_the_measured_configuration():
    args = parse_args([])
    assert (args.steps, args.seeds, args.top_k, args.lambda_clm, args.avg_tau) == (80, 1, 50, 0.7, 0.1)
    assert args.eval_every == 20  # steps / 4: the points of the sample-efficiency curve


def test_quick_shortens_every_stage():
    args = parse_args(["--quick"])
    assert (args.steps, args.pretrain_scale, args.eval_blocks, args.seq_len, args.eval_every) == (4, 0.025, 4, 64, 2)


def test_top_k_is_bounded_by_what_the_demo_teachers_allow(capsys):
    assert TeacherConfig.model_fields["max_top_k"].default == TEACHER_MAX_TOP_K
    assert parse_args(["--top-k", str(TEACHER_MAX_TOP_K)]).top_k == TEACHER_MAX_TOP_K
    for bad in ("0", str(TEACHER_MAX_TOP_K + 1)):
        with pytest.raises(SystemExit):
            parse_args(["--top-k", bad])
        assert f"--top-k must be between 1 and {TEACHER_MAX_TOP_K}" in capsys.readouterr().err


def test_seeds_and_steps_must_be_positive(capsys):
    with pytest.raises(SystemExit):
        parse_args(["--seeds", "0"])
    assert "--seeds and --steps must be at least 1 (got 0, 80)" in capsys.readouterr().err


def test_extra_modes_are_named_runs_with_trainer_overrides(capsys):
    args = parse_args(["--extra-mode", "tau_1", "method.fusion=avg_ce", "method.avg_tau=1", "--extra-mode", "plain"])
    assert args.extra_mode == [["tau_1", "method.fusion=avg_ce", "method.avg_tau=1"], ["plain"]]
    for bad, message in ((["min_ce", "method.avg_tau=1"], "--extra-mode name 'min_ce' is taken"),
                         (["a/b"], "names its run folder"),
                         (["tau", "method.avg_tau"], "overrides are KEY=VALUE (e.g. method.avg_tau=0.5), got method.avg_tau")):
        with pytest.raises(SystemExit):
            parse_args(["--extra-mode", *bad])
        assert message in capsys.readouterr().err
    with pytest.raises(SystemExit):
        parse_args(["--extra-mode", "x", "--extra-mode", "x"])
    assert "'x' is taken" in capsys.readouterr().err
