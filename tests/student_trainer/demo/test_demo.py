"""The main job, shortened: assets, real teacher processes, the default modes' training runs and an on-policy
one, generation scores, the report — and no process left behind, also when the user presses Ctrl-C."""

from __future__ import annotations

import itertools
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from student_trainer.demo.report import DOMAINS, GEN_KEYS, DemoResults
from tests.student_trainer.trainer.helpers import read_metrics

pytestmark = [pytest.mark.integration, pytest.mark.slow]
MODES = ("clm_only", "min_ce", "avg_ce")  # the demo's default modes, clm_only (the baseline) first
ON_POLICY = "on_policy_min_ce"  # run beside them: rollouts, paired against min_ce too
QUICK_DEMO_S = 1000  # a cold cache on a quiet 2-core machine: assets (tiny models pretrained) + 4 short runs
GEN = {f"{d}_{k}" for d in DOMAINS for k in GEN_KEYS}


TAG = "LIVEFUSE_TEST_DEMO"  # set for the demo under test; its children inherit it, others' processes do not


def demo_env(out: Path) -> dict[str, str]:
    return {**os.environ, TAG: str(out)}


def demo_children(out: Path) -> list[str]:
    """Command lines of the teacher and trainer processes started by the demo writing to ``out``: found by the
    environment variable they inherit, so another demo or test on the same machine is not counted."""
    mark = f"{TAG}={out}".encode()
    found = []
    for pid in os.listdir("/proc"):
        if not pid.isdigit() or int(pid) == os.getpid():
            continue
        try:
            cmd = (Path("/proc") / pid / "cmdline").read_bytes().replace(b"\0", b" ").decode()
            env = (Path("/proc") / pid / "environ").read_bytes().split(b"\0")
        except OSError:
            continue
        if ("-m teacher_server" in cmd or "-m student_trainer --config" in cmd) and mark in env:
            found.append(cmd)
    return found


@pytest.mark.timeout(QUICK_DEMO_S + 60)  # pytest's own limit above the demo's
def test_quick_demo_end_to_end(tmp_path):
    run = subprocess.run([sys.executable, "-m", "student_trainer.demo", "--quick", "--out", str(tmp_path),
                          "--modes", *MODES, ON_POLICY], capture_output=True, text=True, timeout=QUICK_DEMO_S,
                         env=demo_env(tmp_path))
    assert run.returncode == 0, run.stdout[-3000:] + run.stderr[-3000:]
    table = (tmp_path / "results.md").read_text()
    for row in ("target (initial)", "target + clm_only", "target + min_ce", "target + avg_ce", "source: code",
                "source: prose"):
        assert f"| {row}" in table
    assert "Paired change against clm_only" in table and "Sample efficiency" in table
    assert "Paired change against min_ce" in table and f"| target + {ON_POLICY} |" in table  # on-policy's 2nd baseline
    assert result_has_generations(tmp_path)
    for plot in ("loss_curves.png", "sample_efficiency.png"):
        assert (tmp_path / plot).stat().st_size > 10_000
    result = DemoResults.read(tmp_path / "results.json")
    for mode in MODES:
        assert (tmp_path / "runs" / mode / "seed-0" / "final" / "model.safetensors").exists()
        curve = result.curves[mode][0]  # the initial model, then the evaluations at steps 2 and 4
        assert len(curve) == 3 and curve[0][0] == 0.0 < curve[1][0] < curve[2][0]
        scores = result.scores[mode][0]
        assert set(scores) == {"code_ppl", "prose_ppl", "code_nats_per_char", "prose_nats_per_char", *GEN}
        held_out = [v for k, v in scores.items() if k not in GEN]  # the generation keys: result_has_generations
        assert all(math.isfinite(v) and v > 0 for v in [*held_out, *(ppl for _, ppl in curve)]), (scores, curve)
        # the target learned (steps 3-4: WarmupDecayLR runs steps 1-2 at lr 0): its last validation point is below
        # the initial model's (measured: -15 to -16%), and so is its held-out perplexity in both domains (-11 to -20%)
        assert curve[-1][1] < 0.97 * curve[0][1], curve
        assert all(scores[k] < result.initial[k] for k in ("code_ppl", "prose_ppl")), (scores, result.initial)
        steps, _ = read_metrics(tmp_path / "runs" / mode / "seed-0")
        assert [r["step"] for r in steps] == [1, 2, 3, 4]
        if mode == "clm_only":  # no teacher is asked
            assert all(r["fusion_loss"] == 0.0 and r["aligned_share"] == 0.0 for r in steps)
        else:  # measured: fusion loss 10.2-10.4, aligned positions 80-100%
            assert all(math.isfinite(r["fusion_loss"]) and r["fusion_loss"] > 0 for r in steps), steps
            assert all(r["aligned_share"] > 0.5 for r in steps), steps
    on_policy, _ = read_metrics(tmp_path / "runs" / ON_POLICY / "seed-0")
    # one corpus + one rollout micro-batch per step: every step samples, and trains on aligned continuation tokens
    assert all(r["rollouts"] == 1 and r["rollout_new_tokens"] > 0 for r in on_policy), on_policy
    assert sum(r["rollout_trained_positions"] for r in on_policy) > 0 and all(r["on_policy_loss"] >= 0 for r in on_policy)
    assert result.on_policy == [ON_POLICY] and set(result.scores[ON_POLICY][0]) >= GEN
    firsts = [_first_clm_loss(tmp_path, mode) for mode in MODES]  # seed 0: the same model, the same blocks
    assert firsts == pytest.approx([firsts[0]] * len(MODES), rel=1e-6)
    assert all(math.isfinite(v) and v > 0 for k, v in result.initial.items() if k not in GEN), result.initial
    for name, row in result.sources.items():  # scored per character only (another tokenizer: no perplexity)
        assert all(math.isfinite(row[f"{d}_nats_per_char"]) and row[f"{d}_nats_per_char"] > 0 for d in DOMAINS), name
    for a, b in itertools.combinations(MODES, 2):  # the modes train differently (measured: the closest 0.38% apart)
        assert max(abs(result.scores[a][0][k] / result.scores[b][0][k] - 1) for k in ("code_ppl", "prose_ppl")) > 1e-3
    for mode in MODES[1:]:  # the paired change in the table is the scores' own
        change = 100 * (result.scores[mode][0]["code_ppl"] / result.scores["clm_only"][0]["code_ppl"] - 1)
        assert f"| {mode} | {change:.2f}% (" in table
    assert not demo_children(tmp_path)  # every teacher and trainer process is gone


def result_has_generations(out: Path) -> bool:
    """Every model's continuations were scored by the teachers: finite, positive NLL per character, the
    degeneration guards within [0, 1], and the held-out text's own continuations as the reference row."""
    result = DemoResults.read(out / "results.json")
    rows = [result.reference, result.initial, *(by[0] for by in result.scores.values())]
    for row in rows:
        for d in DOMAINS:
            assert math.isfinite(row[f"{d}_gen_nats_per_char"]) and row[f"{d}_gen_nats_per_char"] > 0, row
            assert 0 < row[f"{d}_distinct2"] <= 1 and 0 <= row[f"{d}_rep4"] <= 1 and row[f"{d}_gen_tokens"] > 0, row
    return True


def _first_clm_loss(out: Path, mode: str) -> float:
    return read_metrics(out / "runs" / mode / "seed-0")[0][0]["clm_loss"]


def _interruptible() -> None:
    """Ctrl-C reaches the demo as it reaches a user's: a suite started in the background (``cmd &`` in a
    non-interactive shell) runs with SIGINT ignored, which the demo would inherit and so never stop."""
    signal.signal(signal.SIGINT, signal.SIG_DFL)


@pytest.mark.timeout(QUICK_DEMO_S + 60)
def test_ctrl_c_stops_every_child(tmp_path):
    proc = subprocess.Popen([sys.executable, "-m", "student_trainer.demo", "--quick", "--out", str(tmp_path)],
                            stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=demo_env(tmp_path),
                            preexec_fn=_interruptible)
    assert proc.stdout is not None
    deadline = time.monotonic() + QUICK_DEMO_S - 150
    for line in proc.stdout:
        if "3/4 training" in line:
            break
        assert time.monotonic() < deadline
    time.sleep(3)
    assert any("teacher_server" in c for c in demo_children(tmp_path))
    proc.send_signal(signal.SIGINT)
    proc.communicate(timeout=120)
    assert proc.returncode != 0
    time.sleep(1)
    assert not demo_children(tmp_path)
