"""The demo's evaluation and report: held-out perplexity per domain (mean ± sd over seeds), the paired gain
of fusion over CLM-only, the sample-efficiency curve, a Markdown table and two plots; ``results.json`` is a
:class:`DemoResults` record."""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from pathlib import Path
from typing import Literal

import numpy as np
from pydantic import BaseModel, ConfigDict

from student_trainer.demo.corpus import read_jsonl
from student_trainer.experiments.compare import (
    Mode,
    eval_curves,
    heldout_scores,
    model_scores,
    read_record,
    run_dir,
)
from student_trainer.experiments.seed_stats import (
    Curves,
    Scores,
    mean_curve,
    mean_sd,
    paired_table,
    share_to_reach,
)
from student_trainer.trainer.client import TeacherClient
from student_trainer.trainer.config import TrainerConfig
from student_trainer.trainer.data.blocks import first_blocks
from student_trainer.trainer.evaluation import summarise, teacher_sums

DOMAINS = ("code", "prose")
BASELINE = "clm_only"
OFF_POLICY = ("min_ce", "min_ce_2x")  # the on-policy modes' other baselines: the same fusion without rollouts
GEN_KEYS = ("gen_nats_per_char", "gen_expert_nats_per_char", "distinct2", "rep4", "gen_tokens")


class DemoResults(BaseModel):
    """``results.json``: every score of the report (seeds as ints here, as strings in the file), versioned."""

    model_config = ConfigDict(extra="forbid", ser_json_inf_nan="constants")
    version: Literal[2] = 2
    scores: Scores                          # mode -> seed -> "<domain>_ppl" / "<domain>_nats_per_char", and the
                                            # generation scores "<domain>_gen_nats_per_char" etc. (GEN_KEYS)
    initial: dict[str, float]               # the target's initial model, same keys
    sources: dict[str, dict[str, float]]    # source -> ppl / nats_per_char keys (ppl is NaN: another tokenizer)
    curves: Curves = {}                     # mode -> seed -> (training tokens, validation perplexity)
    reference: dict[str, float] = {}        # the held-out text's own continuations: the generation keys
    on_policy: list[str] = []               # the modes with rollouts (paired against OFF_POLICY too)

    def write(self, path: Path) -> None:
        path.write_text(self.model_dump_json(indent=2))

    @classmethod
    def read(cls, path: Path) -> DemoResults:
        return read_record(cls, path)


def teacher_scores(address: str, block_texts: list[str]) -> dict[str, float]:
    """A source's nats per character on the same held-out texts (its own tokens)."""
    with TeacherClient(address, timeout=300) as client:
        scores = client.score(block_texts, top_k=1, truncate=True)
    sums = teacher_sums([s.next_logprobs for s in scores], [s.offsets.astype(np.int64) for s in scores])
    return {"ppl": float("nan"), "nats_per_char": summarise(sums)["nats_per_char"]}


def evaluate_all(out: Path, models: dict[str, Path], teachers: dict[str, str], corpus: dict[str, Path],
                 modes: Sequence[Mode], seeds: Sequence[int], seq_len: int, n_blocks: int) -> DemoResults:
    """Every run, the target's initial model and every source on the held-out text of both domains."""
    texts = {d: read_jsonl(corpus[f"{d}_heldout"]) for d in DOMAINS}
    scores = heldout_scores(out / "runs", modes, seeds, texts, seq_len, n_blocks)
    initial = {f"{d}_{k}": v for d in DOMAINS for k, v in model_scores(models["target_init"], texts[d], seq_len,
                                                                        n_blocks).items()}
    from transformers import AutoTokenizer

    target_tok = AutoTokenizer.from_pretrained(models["target_init"])
    block_texts = {d: [b.text for b in first_blocks(texts[d], target_tok, seq_len, 16, n_blocks)] for d in DOMAINS}
    sources = {name: {f"{d}_{k}": v for d in DOMAINS for k, v in teacher_scores(address, block_texts[d]).items()}
               for name, address in teachers.items()}
    return DemoResults(scores=scores, initial=initial, sources=sources)


def sample_efficiency(out: Path, modes: Sequence[Mode], seeds: Sequence[int], initial_model: Path, curve_file: Path,
                      seq_len: int) -> Curves:
    """The trainer's periodic validation perplexity per mode and seed against training tokens, each curve
    starting from the initial model's perplexity on the same blocks (same evaluator)."""
    config = TrainerConfig.model_validate_json((run_dir(out / "runs", modes[0].name, seeds[0]) / "config.json").read_text())
    start = model_scores(initial_model, read_jsonl(curve_file), seq_len, config.run.eval_blocks)["ppl"]
    curves = eval_curves(out / "runs", modes, seeds)
    return {m: {s: [(0.0, start), *pts] for s, pts in by_seed.items()} for m, by_seed in curves.items()}


def _fmt(values: Sequence[float], digits: int = 3) -> str:
    if not values or any(isinstance(v, float) and math.isnan(v) for v in values):
        return "–"
    mean, sd = mean_sd(values)
    return f"{mean:.{digits}f}" if len(values) == 1 else f"{mean:.{digits}f} ± {sd:.{digits}f}"


def _row(label: str, cells: dict[str, Sequence[float]]) -> str:
    keys = [f"{d}_{k}" for k in ("ppl", "nats_per_char") for d in DOMAINS]
    return f"| {label} | " + " | ".join(_fmt(cells[k]) for k in keys) + " |\n"


_GEN_COLUMNS = (("gen_nats_per_char", "teachers nats/char", 3), ("gen_expert_nats_per_char", "expert nats/char", 3),
                ("distinct2", "distinct-2", 3), ("rep4", "rep-4", 3), ("gen_tokens", "new tokens", 1))


def generation_table(result: DemoResults, n_prompts: int, temperature: float) -> str:
    """What each model generates on the held-out prompts (mean ± sd over seeds), beside the held-out text's own
    continuations: the teachers' NLL per character (MinCE-fused; the domain's expert alone), distinct-2, the
    repeated 4-gram rate and the mean continuation length."""
    if not result.reference:
        return ""
    cols = [(f"{d}_{key}", f"{d} {label}", digits) for key, label, digits in _GEN_COLUMNS for d in DOMAINS]
    head = "| model | " + " | ".join(c[1] for c in cols) + " |\n| --- |" + " ---: |" * len(cols) + "\n"
    rows = [("held-out text (reference)", {k: [v] for k, v in result.reference.items()}),
            ("target (initial)", {k: [v] for k, v in result.initial.items()})]
    rows += [(f"target + {mode}", {k: [r[k] for r in runs.values() if k in r] for k in next(iter(runs.values()))})
             for mode, runs in result.scores.items()]
    body = "".join(f"| {label} | " + " | ".join(_fmt(cells.get(k, []), digits) for k, _, digits in cols) + " |\n"
                   for label, cells in rows)
    return ("What the models generate: the first half of each of " + f"{n_prompts} held-out blocks per domain is "
            f"the prompt; each model continues it by sampling at temperature {temperature:g} (one fixed seed for every "
            "model); "
            "every source scores prompt + continuation in its own tokens. teachers nats/char = the continuations' "
            "NLL per character, per continuation from the source with the lowest (MinCE's rule; the target's "
            "initial model is no judge: it would favour text like its own); expert = the domain's own source; distinct-2 = distinct token bigrams / all (higher: more "
            "varied); rep-4 = share of 4-grams repeating an earlier one in the same continuation (lower: less "
            "looping); lower teachers' NLL counts only where distinct-2 and rep-4 stay near the reference.\n\n"
            + head + body)


def efficiency_sentences(curves: Curves) -> str:
    """"<mode> reaches clm_only's final perplexity after X% of the tokens", from the seed-mean curves."""
    if BASELINE not in curves:
        return ""
    lines = []
    for mode, by_seed in curves.items():
        if mode != BASELINE:
            share = share_to_reach(by_seed, curves[BASELINE])
            lines.append(f"{mode} never reaches {BASELINE}'s final validation perplexity" if math.isnan(share) else
                         f"{mode} reaches {BASELINE}'s final validation perplexity after {100 * share:.0f}% of the "
                         "training tokens")
    return "Sample efficiency (seed-mean validation curves, both domains): " + "; ".join(lines) + ".\n"


def validation_line(curves: Curves) -> str:
    """Each mode's final perplexity on the validation file (the trainer's last evaluation): where settings
    are compared and chosen, never on the held-out text of the table."""
    cells = []
    for mode, by_seed in curves.items():
        final = [pts[-1][1] for pts in by_seed.values()]
        mean, sd = mean_sd(final)
        cells.append(f"{mode} {mean:.1f}" + (f" ± {sd:.1f}" if len(final) > 1 else ""))
    return ("Validation perplexity (mixed code + prose validation file, final evaluation; settings are chosen on "
            "this, not on the table's held-out text): " + ", ".join(cells) + ".\n") if cells else ""


def write_report(out: Path, result: DemoResults, args) -> str:
    """results.md: the per-domain table (mean ± sd over seeds), the paired gains, the sample-efficiency line."""
    scores, n = result.scores, args.seeds
    head = ("| model | code ppl | prose ppl | code nats/char | prose nats/char |\n"
            "| --- | ---: | ---: | ---: | ---: |\n")
    body = _row("target (initial)", {k: [v] for k, v in result.initial.items()})
    for mode, runs in scores.items():
        body += _row(f"target + {mode}", {k: [r[k] for r in runs.values()] for k in next(iter(runs.values()))})
    for name, row in result.sources.items():
        label = f"source: {name}" + (" (= target initial)" if name == "target_init" else "")
        body += _row(label, {k: [v] for k, v in row.items()})
    note = (f"\nHeld-out: {args.eval_blocks} blocks of {args.seq_len} target tokens per domain. ppl = perplexity per "
            "target token (targets share one tokenizer); nats/char compares models across tokenizers. "
            f"{args.steps} training steps per run; target rows are the mean"
            + (f" ± sd over {n} seeds (seed = train seed and data order)" if n > 1 else " of 1 seed") + ".\n")
    table = head + body + note
    generated = bool(result.reference)
    metrics = ["code_ppl", "prose_ppl", *(["code_gen_nats_per_char", "prose_gen_nats_per_char"] if generated else [])]
    if generated:
        table += "\n" + generation_table(result, args.gen_prompts, args.gen_temperature)
    if BASELINE in scores and len(scores) > 1:
        table += "\n" + paired_table(scores, metrics, BASELINE)
    on_policy = {m: scores[m] for m in result.on_policy if m in scores}
    for base in (b for b in OFF_POLICY if b in scores and on_policy):
        table += "\n" + paired_table({base: scores[base], **on_policy}, metrics, base)
    table += "\n" + efficiency_sentences(result.curves) + validation_line(result.curves)
    (out / "results.md").write_text(table)
    plot_sample_efficiency(out, result.curves)
    return table


def _smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (the per-step loss jumps with each batch's code/prose mix)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_losses(out: Path, modes: list[str], seed: int = 0) -> None:
    """Training CLM (and fusion) loss per mode, seed ``seed``."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mode in enumerate(modes):
        lines = (run_dir(out / "runs", mode, seed) / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(x) for x in lines if '"loss"' in x]
        xs = [s["step"] for s in steps]
        color = f"C{i}"
        ax.plot(xs, _smooth([s["clm_loss"] for s in steps]), color=color, label=f"{mode}: CLM loss")
        if mode != BASELINE:
            ax.plot(xs, _smooth([s["fusion_loss"] for s in steps]), "--", color=color, label=f"{mode}: fusion loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token, 10-step mean)")
    ax.set_title(f"livefuse demo: training loss (seed {seed})")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)


_LINES = ("-", "--", "-.", ":")


def plot_sample_efficiency(out: Path, curves: Curves) -> None:
    """Validation perplexity (both domains) against training tokens per mode: seed mean, band = min..max."""
    if not curves:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(7, 4))
    for i, (mode, by_seed) in enumerate(curves.items()):
        tokens, mean, low, high = mean_curve(by_seed)
        ax.plot(tokens / 1000, mean, color=f"C{i}", marker=".o^sv"[i % 5], markersize=5, linestyle=_LINES[i % 4],
                label=f"{mode} ({len(by_seed)} seed(s))")  # styles differ: close modes stay visible
        if len(by_seed) > 1:
            ax.fill_between(tokens / 1000, low, high, color=f"C{i}", alpha=0.2)
    if BASELINE in curves:
        final = mean_curve(curves[BASELINE])[1][-1]
        ax.axhline(final, color="grey", linestyle=":", label=f"{BASELINE} final")
    ax.set_yscale("log")
    ax.set_xlabel("training tokens (thousands)")
    ax.set_ylabel("validation perplexity (code + prose)")
    ax.set_title("livefuse demo: sample efficiency (mean, band = min..max over seeds)")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "sample_efficiency.png", dpi=120)
    plt.close(fig)
