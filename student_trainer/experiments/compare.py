"""Paired multi-seed comparison of training modes: one trainer config, run once per mode and seed.

    python -m student_trainer.experiments.compare --config run.yaml --out runs/cmp --seeds 0 1 2 \\
        --mode clm_only method.lambda_clm=1.0 --mode min_ce method.fusion=min_ce --mode avg_ce method.fusion=avg_ce \\
        [--eval code=code_heldout.jsonl --eval prose=prose_heldout.jsonl]

A seed sets ``train.seed`` and ``data.shuffle_seed``, so the runs of one seed share the data order and the
initialisation in every mode. Perplexity moves by several percent from seed to seed, more than a fusion
gain, so what the report compares is the *paired* difference: per seed, each mode against the baseline
mode (the first). Scores are the trainer's own final held-out evaluation, or, with ``--eval``, each run's
exported model on each named held-out set. Runs go to ``OUT/<mode>/seed-<s>/``; the report to
``OUT/comparison.md`` and ``OUT/comparison.json`` (a :class:`ComparisonRecord`, with every run's evaluation
curve).
"""

from __future__ import annotations

import argparse
import logging
import subprocess
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, ValidationError

from protos.logs import setup_logging
from student_trainer.experiments.processes import stop_process
from student_trainer.experiments.seed_stats import (
    Curves,
    Scores,
    comparison_tables,
    curve_points,
    parse_metrics,
)

log = logging.getLogger("livefuse.experiments")


@dataclass(frozen=True)
class Mode:
    """A named variant of the config: its ``key=value`` overrides."""

    name: str
    overrides: tuple[str, ...] = ()


class ComparisonRecord(BaseModel):
    """``comparison.json``: the scores and curves behind ``comparison.md``, versioned (seeds as ints here, as
    strings in the file)."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    version: Literal[1] = 1
    baseline: str
    scores: Scores
    curves: Curves

    @classmethod
    def read(cls, path: Path) -> ComparisonRecord:
        return read_record(cls, path)


def read_record(cls: type[BaseModel], path: Path):  # noqa: ANN201 - an instance of ``cls``
    """A versioned JSON record from ``path``; ValueError naming the file when it is of another version or kind."""
    try:
        return cls.model_validate_json(Path(path).read_text())
    except ValidationError as err:
        first = err.errors()[0]
        raise ValueError(f"{path}: not a {cls.__name__} of this livefuse (version "
                         f"{cls.model_fields['version'].default}): {first['loc']}: {first['msg']}; rerun the "
                         "command that wrote it") from None


STOP_WAIT_S = 30.0  # how long a stopped run may take to checkpoint and exit before it is killed


def run_dir(out: Path, mode: str, seed: int) -> Path:
    return Path(out) / mode / f"seed-{seed}"


def seed_overrides(seed: int) -> list[str]:
    """The settings one seed fixes: model / RNG seed and the order of the training blocks."""
    return [f"train.seed={seed}", f"data.shuffle_seed={seed}"]


def train_once(config: Path, out_dir: Path, overrides: Sequence[str], env: dict[str, str] | None = None) -> None:
    """One ``livefuse-train`` run as a child process; a failure (or Ctrl-C here) stops it and raises."""
    cmd = [sys.executable, "-m", "student_trainer", "--config", str(config), f"run.output_dir={out_dir}", *overrides]
    log.info(f"$ {' '.join(cmd)}")
    with subprocess.Popen(cmd, env=env) as proc:
        try:
            if proc.wait() != 0:
                raise RuntimeError(f"training run {out_dir} failed with exit code {proc.returncode}")
        except BaseException:
            stop_run(proc)
            raise


def stop_run(proc: subprocess.Popen, wait_s: float = STOP_WAIT_S) -> None:
    """Asks a run to stop (SIGTERM: it saves a checkpoint at the next step boundary, so the same command
    resumes) and kills it if it has not stopped within ``wait_s`` — in its start-up (vocabulary maps,
    DeepSpeed) the next step boundary can be minutes away, and the caller must not hang on Ctrl-C."""
    if stop_process(proc, wait_s):
        log.warning(f"the run did not stop within {wait_s:.0f} s: killed (no checkpoint)")


def is_done(out_dir: Path) -> bool:
    """A finished run: exported model and a final evaluation in metrics.jsonl."""
    metrics = out_dir / "metrics.jsonl"
    return (out_dir / "final" / "config.json").exists() and metrics.exists() and bool(
        parse_metrics(metrics.read_text()).evals)


def run_grid(config: Path, out: Path, modes: Sequence[Mode], seeds: Sequence[int], *,
             env: dict[str, str] | None = None, skip_done: bool = False) -> None:
    """Every mode for every seed, seed by seed (so whatever has finished is already paired)."""
    for seed in seeds:
        for mode in modes:
            target = run_dir(out, mode.name, seed)
            if skip_done and is_done(target):
                log.info(f"{target} is done; skipped")
                continue
            train_once(config, target, [*mode.overrides, *seed_overrides(seed)], env)


def trainer_scores(out: Path, modes: Sequence[Mode], seeds: Sequence[int]) -> Scores:
    """Each run's final held-out evaluation by the trainer: ``scores[mode][seed]['ppl' | 'nats_per_char']``."""
    scores: Scores = {}
    for mode in modes:
        for seed in seeds:
            final = parse_metrics((run_dir(out, mode.name, seed) / "metrics.jsonl").read_text()).evals[-1][1]
            scores.setdefault(mode.name, {})[seed] = {"ppl": final["student/perplexity"],
                                                      "nats_per_char": final["student/nats_per_char"]}
    return scores


def model_scores(folder: Path, texts: list[str], seq_len: int, n_blocks: int) -> dict[str, float]:
    """Perplexity per target token and nats per character of a saved model on the first ``n_blocks``
    blocks of ``texts`` (the one evaluator, :func:`evaluation.nll_sums`)."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from student_trainer.trainer.data.blocks import first_blocks
    from student_trainer.trainer.evaluation import nll_sums, summarise

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    blocks = first_blocks(texts, tok, seq_len, 16, n_blocks)
    scores = summarise(nll_sums(model, blocks, tok.pad_token_id or 0, micro_batch=8))
    return {"ppl": scores["perplexity"], "nats_per_char": scores["nats_per_char"]}


def heldout_scores(out: Path, modes: Sequence[Mode], seeds: Sequence[int], eval_sets: dict[str, list[str]],
                   seq_len: int, n_blocks: int) -> Scores:
    """Each run's exported model on each held-out set: ``scores[mode][seed]['<set>_ppl' | '<set>_nats_per_char']``."""
    scores: Scores = {}
    for mode in modes:
        for seed in seeds:
            row: dict[str, float] = {}
            for name, texts in eval_sets.items():
                for key, value in model_scores(run_dir(out, mode.name, seed) / "final", texts, seq_len,
                                               n_blocks).items():
                    row[f"{name}_{key}"] = value
            scores.setdefault(mode.name, {})[seed] = row
    return scores


def eval_curves(out: Path, modes: Sequence[Mode], seeds: Sequence[int], key: str = "student/perplexity") -> Curves:
    """Per mode and seed, the trainer's periodic evaluations as (training tokens so far, ``key``)."""
    return {m.name: {s: curve_points(parse_metrics((run_dir(out, m.name, s) / "metrics.jsonl").read_text()), key)
                     for s in seeds} for m in modes}


def write_comparison(out: Path, scores: Scores, metrics: Sequence[str], baseline: str, curves: Curves) -> str:
    """``comparison.md`` (mean ± sd per mode, paired differences against ``baseline``) and ``comparison.json``."""
    text = comparison_tables(scores, metrics, baseline)
    (Path(out) / "comparison.md").write_text(text)
    record = ComparisonRecord(baseline=baseline, scores=scores, curves=curves)
    (Path(out) / "comparison.json").write_text(record.model_dump_json(indent=2))
    return text


def _mode(item: list[str]) -> Mode:
    return Mode(item[0], tuple(item[1:]))


def _eval_set(item: str) -> tuple[str, str]:
    name, sep, path = item.partition("=")
    if not sep or not name or not path:
        raise argparse.ArgumentTypeError(f"--eval {item!r} is not NAME=FILE (e.g. code=heldout_code.jsonl)")
    return name, path


def parse_args(argv: list[str] | None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m student_trainer.experiments.compare", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--config", type=Path, required=True, help="the trainer config every run starts from")
    p.add_argument("--out", type=Path, required=True, help="folder for the runs and the report")
    p.add_argument("--mode", nargs="+", action="append", required=True, metavar=("NAME", "KEY=VALUE"),
                   help="a mode: its name, then its overrides; repeat for each mode (the first is the baseline)")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="seeds (default: 0 1 2)")
    p.add_argument("--eval", type=_eval_set, action="append", default=[], metavar="NAME=FILE",
                   help="score each run's exported model on this held-out file (repeatable; default: the "
                        "trainer's own final evaluation)")
    p.add_argument("--eval-blocks", type=int, default=48, help="held-out blocks per --eval set (default 48)")
    p.add_argument("--seq-len", type=int, default=None, help="block length of --eval scoring (default: the config's)")
    p.add_argument("--skip-done", action="store_true", help="keep runs that already finished (resume a batch)")
    return p.parse_args(argv)


def main(argv: list[str] | None = None, progress: Callable[[str], None] = print) -> int:
    """Runs the grid and writes the report; ``progress`` gets the report's text (default: stdout)."""
    args = parse_args(argv)
    setup_logging("console", "INFO", prefix="compare")
    from student_trainer.trainer.config import ConfigError, load_trainer_config
    from student_trainer.trainer.data.documents import read_documents

    try:
        config = load_trainer_config(args.config)
    except (ConfigError, OSError) as err:
        print(f"compare: {err}", file=sys.stderr)
        return 2
    modes, out = [_mode(m) for m in args.mode], args.out
    run_grid(args.config, out, modes, args.seeds, skip_done=args.skip_done)
    if args.eval:
        sets = {name: read_documents([path], config.data.text_field) for name, path in args.eval}
        scores = heldout_scores(out, modes, args.seeds, sets, args.seq_len or config.data.seq_len, args.eval_blocks)
        metrics = [f"{name}_ppl" for name in sets]
    else:
        scores, metrics = trainer_scores(out, modes, args.seeds), ["ppl"]
    progress(write_comparison(out, scores, metrics, modes[0].name, eval_curves(out, modes, args.seeds)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
