"""Every benchmark in bench/ runs at HEAD: each script once, at tiny sizes and one round, must complete and
print its comparison (the ratio or side-by-side line its docs/BENCHMARKS.md numbers come from). No timing is
asserted — only that a refactor did not break a benchmark (one did, unnoticed: online_overhead.py died on the
typed step record)."""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO
from tests.student_trainer.trainer.helpers import subprocess_env

pytestmark = [pytest.mark.slow, pytest.mark.bench]

# script (and its tiny arguments) -> a pattern its output must contain
SMOKE = {
    "alignment.py": (["--tokens", "128", "--repeats", "1", "--pairs", "mpt:llama-spm", "--teachers", "mpt",
                      "--skip-map-timing"],
                     r"mpt -> llama-spm code .* certified / band [\d.]+x(.|\n)*mined/plain \d+x  same path: True"
                     r"(.|\n)*trainer terms: 1 sources(.|\n)*parallel speed-up [\d.]+x"),
    "online_overhead.py": (["--steps", "1", "--warmup", "0", "--rounds", "1", "--depths", "1", "--seq-len", "32"],
                           r"\| 1 \| [\d.]+ \| [\d.]+ \| [\d.]+ \|.*\n(.|\n)*fusion extra peak, whole DeepSpeed step: "),
    "teacher_throughput.py": (["--shape", "tiny", "--device", "cpu", "--seq-len", "32", "--batch-texts", "2",
                               "--requests", "1", "--warmup", "0", "--rounds", "1"],
                              r"ratio +[\d.]+ +\(server / raw"),
    "cpu_malloc.py": (["--models", "llama", "--batch", "2", "--seq-len", "16", "--steps", "1", "--rounds", "1"],
                      r"llama: median default/tuned [\d.]+x"),
    "load.py": (["--clients", "2", "--seconds", "1", "--capacity-seconds", "1", "--overload", "2"],
                r"\| early refusal off \| \d+ (.|\n)*\| early refusal on \| \d+ "),
    "on_policy.py": (["--steps", "1", "--warmup", "0", "--rounds", "1", "--seq-len", "32", "--max-new-tokens", "4"],
                     r"on-policy / off-policy step time: [\d.]+x (.|\n)*teachers' wait share: on-policy [\d.]+%"),
    # the corpus and prepare phases, new against old (the first-step and rss phases start trainers: the trainer's
    # start is the trainer tests' business, and 2-rank runs cost a minute here)
    "data_pipeline.py": (["--sizes", "1e5", "--old-max", "1e5", "--both-max", "1e5", "--repeats", "1",
                          "--phases", "corpus", "prepare"],
                         r"\| [\d,]+ \| new \| 1 \|.*\n\| [\d,]+ \| new \| 2 \|.*\n\| [\d,]+ \| old \| 1 \|"),
}


def test_every_script_in_bench_has_a_smoke_run():
    scripts = {p.name for p in (REPO / "bench").glob("*.py")} | {p.name for p in (REPO / "bench").glob("*.sh")}
    assert scripts == set(SMOKE) | {"gpu_check.sh"}, "a bench script without a smoke run"


@pytest.mark.parametrize("script", sorted(SMOKE))
def test_the_benchmark_runs_and_prints_its_comparison(script, tmp_path):
    args, pattern = SMOKE[script]
    if script == "data_pipeline.py":
        args = [*args, "--workdir", str(tmp_path)]
    done = subprocess.run([sys.executable, str(REPO / "bench" / script), *args], cwd=tmp_path, env=subprocess_env(),
                          capture_output=True, text=True, timeout=600)
    out = done.stdout + done.stderr
    assert done.returncode == 0, out[-4000:]
    assert re.search(pattern, done.stdout), done.stdout[-4000:]


def test_gpu_check_gets_through_its_preflight_and_says_what_is_missing(tmp_path):
    """Without CUDA the script stops after its import checks: every module it needs imports at HEAD."""
    import torch

    if torch.cuda.is_available():
        pytest.skip("a GPU is here: run bench/gpu_check.sh itself")
    env = subprocess_env() | {"OUT": str(tmp_path), "PYTHON": sys.executable}
    done = subprocess.run(["bash", str(REPO / "bench" / "gpu_check.sh"), "plain"], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=300)
    report = (Path(tmp_path) / "env.txt").read_text()
    assert not re.search(r"^MISSING", report, re.MULTILINE), report
    assert "cuda False" in report and "gpu_check: not runnable here: needs CUDA" in report
    assert done.returncode == 1
