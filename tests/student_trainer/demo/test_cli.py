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


def test_every_built_in_mode_is_a_valid_trainer_config(tmp_path):
    """The modes' overrides are applied to the demo's own config template and validated as the trainer does."""
    import argparse

    from student_trainer.demo.__main__ import MODES, train_config
    from student_trainer.trainer.config import load_trainer_config

    corpus = {f"{d}_train": tmp_path / f"{d}.jsonl" for d in ("code", "prose")}
    config = train_config(tmp_path / "runs" / "template", corpus, tmp_path / "valid.jsonl", tmp_path / "target",
                          {"code": "127.0.0.1:1"}, argparse.Namespace(**vars(parse_args([]))))
    loaded = {name: load_trainer_config(config, overrides) for name, overrides in MODES.items()}
    on_policy, control = loaded["on_policy_min_ce"], loaded["min_ce_2x"]
    assert on_policy.on_policy.share == 0.5 and on_policy.method.fusion == "min_ce"
    assert on_policy.on_policy.divergence == "forward_kl" and on_policy.on_policy.temperature == 1.0
    for two in (on_policy, control):  # one corpus micro-batch (as min_ce's step) + one rollout, or + one more corpus
        assert two.train.deepspeed["gradient_accumulation_steps"] == 2
        assert two.train.deepspeed["train_micro_batch_size_per_gpu"] == 4
    assert control.on_policy.share == 0 and loaded["min_ce"].on_policy.share == 0


def test_on_policy_modes_are_the_ones_with_rollouts():
    from student_trainer.demo.__main__ import MODES, is_on_policy
    from student_trainer.experiments.compare import Mode

    assert [m for m, o in MODES.items() if is_on_policy(Mode(m, tuple(o)))] == ["on_policy_min_ce"]
    assert is_on_policy(Mode("x", ("on_policy.share=0.25",))) and not is_on_policy(Mode("x", ("on_policy.share=0",)))


def test_generation_defaults_and_quick():
    args, quick = parse_args([]), parse_args(["--quick"])
    assert (args.gen_prompts, args.gen_tokens, args.gen_temperature) == (48, 64, 0.7)
    assert (quick.gen_prompts, quick.gen_tokens) == (4, 16)
