"""Multi-seed comparison: the statistics by hand, and the CLI on real trainer runs (one mode with live
teachers), paired by seed."""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time

import numpy as np
import pytest

from student_trainer.experiments.compare import ComparisonRecord, Mode, run_dir, seed_overrides, stop_run
from student_trainer.experiments.seed_stats import (
    Gain,
    comparison_tables,
    curve_points,
    gains,
    mean_curve,
    mean_sd,
    paired_changes,
    parse_metrics,
    share_to_reach,
    tokens_to_reach,
)
from tests.student_trainer.trainer.helpers import (
    read_metrics,
    source,
    subprocess_env,
    trainer_config,
    write_config,
)

DIFFER = 1e-5  # the modes apart, relative (measured: step 2 CLM loss 4.7e-5 and 5.4e-5, final ppl 5e-4 and 9e-4)
METRICS = "\n".join(json.dumps(r) for r in [
    {"step": 1, "loss": 3.0, "tokens": 100.0}, {"step": 2, "loss": 2.5, "tokens": 120.0},
    {"step": 2, "eval": {"student/perplexity": 50.0}}, {"step": 3, "loss": 2.0, "tokens": 80.0},
    {"step": 4, "loss": 1.9, "tokens": 100.0}, {"step": 4, "eval": {"student/perplexity": 40.0, "x": 1.0}}])


def test_curve_points_pair_each_evaluation_with_the_tokens_seen_so_far():
    metrics = parse_metrics(METRICS + "\n")
    assert len(metrics.steps) == 4 and [s for s, _ in metrics.evals] == [2, 4]
    assert curve_points(metrics, "student/perplexity") == [(220.0, 50.0), (400.0, 40.0)]
    assert curve_points(metrics, "x") == [(400.0, 1.0)]


def test_paired_changes_and_the_two_sd_rule():
    base = {0: 100.0, 1: 110.0, 2: 90.0}
    assert paired_changes(base, {0: 95.0, 1: 99.0, 2: 90.0, 5: 1.0}) == pytest.approx([-5.0, -10.0, 0.0])
    assert mean_sd([1.0, 2.0, 3.0]) == (2.0, 1.0) and mean_sd([4.0]) == (4.0, 0.0)
    clear = Gain([-3.0, -2.5, -3.5])  # mean -3, sd 0.5: beyond 2 sd, every seed lower
    assert clear.wins == 3 and clear.beyond_two_sd
    assert not Gain([-6.0, -0.5, -2.5]).beyond_two_sd  # every seed lower, but sd 2.75 > 3 / 2
    assert not Gain([-3.0, -3.1, 0.1]).beyond_two_sd  # one seed not lower
    scores = {"clm": {0: {"ppl": 100.0}, 1: {"ppl": 200.0}}, "fuse": {0: {"ppl": 97.0}, 1: {"ppl": 196.0}}}
    assert gains(scores, "ppl", "clm")["fuse"].changes == pytest.approx([-3.0, -2.0])
    table = comparison_tables(scores, ["ppl"], "clm")
    assert "| clm | 150.0 ± 70.7 |" in table and "| fuse | -2.50 ± 0.71% (2/2) ✓ |" in table


def test_tokens_to_reach_interpolates_between_evaluations():
    curve = [(0.0, 100.0), (10.0, 60.0), (20.0, 40.0), (30.0, 35.0)]
    assert tokens_to_reach(curve, 50.0) == pytest.approx(15.0)
    assert tokens_to_reach(curve, 100.0) == 0.0 and tokens_to_reach(curve, 30.0) is None
    tokens, mean, low, high = mean_curve({0: curve, 1: [(0.0, 80.0), (10.0, 40.0), (20.0, 30.0)]})
    assert np.allclose(mean, [90.0, 50.0, 35.0]) and np.allclose(low, [80, 40, 30]) and np.allclose(high, [100, 60, 40])
    base = {0: [(0.0, 100.0), (10.0, 60.0), (20.0, 50.0)]}
    assert share_to_reach({0: curve[:3]}, base) == pytest.approx(0.75)  # 50 reached at 15 of 20 tokens
    assert math.isnan(share_to_reach({0: [(0.0, 100.0), (20.0, 55.0)]}, base))


@pytest.mark.integration
@pytest.mark.slow
def test_cli_runs_every_mode_and_seed_and_pairs_them(tmp_path, target, teachers):
    """Two modes × two seeds of real trainer runs (2 steps each at a constant lr from step 1): per-seed runs
    differ, the same seed is the same data order and start in both modes, the modes' updates differ (so do
    their evaluations), and the report pairs each run's own final evaluation."""
    cfg = trainer_config(target, tmp_path / "unused", [source(n, t) for n, t in teachers.items()],
                         train={"max_steps": 2, "seed": 0, "deepspeed": {
                             "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                             "optimizer": {"params": {"lr": 1e-3}}, "scheduler": None}},
                         run={**trainer_config(target, tmp_path, [])["run"], "eval_every": 1, "resume": False})
    path = write_config(cfg, tmp_path / "base.yaml")
    out = tmp_path / "cmp"
    cmd = [sys.executable, "-m", "student_trainer.experiments.compare", "--config", str(path), "--out", str(out),
           "--seeds", "0", "1", "--mode", "clm_only", "method.lambda_clm=1.0", "--mode", "min_ce"]
    done = subprocess.run(cmd, env=subprocess_env(), capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    report = ComparisonRecord.read(out / "comparison.json")
    assert set(report.scores) == {"clm_only", "min_ce"} and set(report.scores["min_ce"]) == {0, 1}
    clm, final = {}, {}
    for mode in ("clm_only", "min_ce"):
        for seed in (0, 1):
            folder = run_dir(out, mode, seed)
            config = json.loads((folder / "config.json").read_text())
            assert (config["train"]["seed"], config["data"]["shuffle_seed"]) == (seed, seed)
            steps, evals = read_metrics(folder)
            assert [r["lr"] for r in steps] == [1e-3, 1e-3] and [e["step"] for e in evals] == [1, 2]
            assert [ppl for _, ppl in report.curves[mode][seed]] == [e["eval"]["student/perplexity"] for e in evals]
            clm[mode, seed] = [r["clm_loss"] for r in steps]
            final[mode, seed] = evals[-1]["eval"]["student/perplexity"]
            assert report.scores[mode][seed]["ppl"] == final[mode, seed]  # the run's own final evaluation
    for seed in (0, 1):
        assert clm["clm_only", seed][0] == pytest.approx(clm["min_ce", seed][0], rel=1e-6)  # same blocks, same start
        # after one update the modes part: min_ce's gradient has the fusion term, clm_only's not
        assert abs(clm["min_ce", seed][1] / clm["clm_only", seed][1] - 1) > DIFFER, clm
        assert abs(final["min_ce", seed] / final["clm_only", seed] - 1) > DIFFER, final
    assert clm["clm_only", 0][0] != pytest.approx(clm["clm_only", 1][0], rel=1e-5)  # another data order
    changes = [100 * (final["min_ce", s] / final["clm_only", s] - 1) for s in (0, 1)]
    assert gains(report.scores, "ppl", "clm_only")["min_ce"].changes == pytest.approx(changes)
    mean, sd = mean_sd(changes)
    assert "Paired change against clm_only" in done.stdout
    assert f"| min_ce | {mean:.2f} ± {sd:.2f}% ({sum(c < 0 for c in changes)}/2)" in done.stdout
    assert seed_overrides(3) == ["train.seed=3", "data.shuffle_seed=3"] and Mode("a").overrides == ()


def test_a_run_that_does_not_stop_on_sigterm_is_killed_after_the_wait():
    """Ctrl-C in the demo/compare stops its training child: SIGTERM first (checkpoint at a step boundary), a
    kill when that does not come in time — the caller never hangs on a run still starting up."""
    code = "import signal, sys, time; signal.signal(signal.SIGTERM, signal.SIG_IGN); print('ready', flush=True); time.sleep(60)"
    stubborn = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, text=True)
    assert stubborn.stdout.readline().strip() == "ready"
    start = time.monotonic()
    stop_run(stubborn, wait_s=1.0)
    assert stubborn.returncode == -9 and time.monotonic() - start < 10
    polite = subprocess.Popen([sys.executable, "-c", "import time; print('ready', flush=True); time.sleep(60)"],
                              stdout=subprocess.PIPE, text=True)
    assert polite.stdout.readline().strip() == "ready"
    stop_run(polite, wait_s=30.0)
    assert polite.returncode == -15  # stopped by SIGTERM, not killed
