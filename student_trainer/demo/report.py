"""The demo's evaluation and report: held-out perplexity per domain, a Markdown table, a loss plot."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from student_trainer.demo.corpus import read_jsonl
from student_trainer.trainer.client import TeacherClient
from student_trainer.trainer.data import make_blocks
from student_trainer.trainer.evaluation import nll_sums, summarise, teacher_sums

DOMAINS = ("code", "prose")


def model_scores(folder: Path, texts: list[str], seq_len: int, n_blocks: int) -> dict[str, float]:
    """Perplexity per target token and nats per character of a saved model on held-out texts."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(folder)
    model = AutoModelForCausalLM.from_pretrained(folder)
    blocks = make_blocks(texts, tok, seq_len, 16)[:n_blocks]
    scores = summarise(nll_sums(model, blocks, tok.pad_token_id or 0, micro_batch=8))
    return {"ppl": scores["perplexity"], "nats_per_char": scores["nats_per_char"]}


def teacher_scores(address: str, block_texts: list[str]) -> dict[str, float]:
    """A source's nats per character on the same held-out texts (its own tokens)."""
    with TeacherClient(address, timeout=300) as client:
        scores = client.score(block_texts, top_k=1, truncate=True)
    sums = teacher_sums([s.next_logprobs for s in scores], [s.offsets.astype(np.int64) for s in scores])
    return {"ppl": float("nan"), "nats_per_char": summarise(sums)["nats_per_char"]}


def evaluate_all(out: Path, models: dict[str, Path], teachers: dict[str, str], corpus: dict[str, Path],
                 modes: list[str], seq_len: int, n_blocks: int) -> list[dict[str, object]]:
    texts = {d: read_jsonl(corpus[f"{d}_heldout"]) for d in DOMAINS}
    targets = {"target (initial)": models["target_init"],
               **{f"target + {m}": out / "runs" / m / "final" for m in modes}}
    rows: list[dict[str, object]] = []
    for label, folder in targets.items():
        row: dict[str, object] = {"model": label}
        for d in DOMAINS:
            for k, v in model_scores(folder, texts[d], seq_len, n_blocks).items():
                row[f"{d}_{k}"] = v
        rows.append(row)
    from transformers import AutoTokenizer

    target_tok = AutoTokenizer.from_pretrained(models["target_init"])
    block_texts = {d: [b.text for b in make_blocks(texts[d], target_tok, seq_len, 16)[:n_blocks]] for d in DOMAINS}
    for name, address in teachers.items():
        row = {"model": f"source: {name}" + (" (= target initial)" if name == "target_init" else "")}
        for d in DOMAINS:
            for k, v in teacher_scores(address, block_texts[d]).items():
                row[f"{d}_{k}"] = v
        rows.append(row)
    return rows


def _fmt(v: object) -> str:
    return "–" if isinstance(v, float) and math.isnan(v) else f"{v:.3f}" if isinstance(v, float) else str(v)


def write_table(out: Path, rows: list[dict[str, object]], args) -> str:
    head = ("| model | code ppl | prose ppl | code nats/char | prose nats/char |\n"
            "| --- | ---: | ---: | ---: | ---: |\n")
    body = "".join(f"| {r['model']} | {_fmt(r['code_ppl'])} | {_fmt(r['prose_ppl'])} | "
                   f"{_fmt(r['code_nats_per_char'])} | {_fmt(r['prose_nats_per_char'])} |\n" for r in rows)
    note = (f"\nHeld-out: {args.eval_blocks} blocks of {args.seq_len} target tokens per domain. ppl = perplexity per "
            "target token (targets share one tokenizer); nats/char compares models across tokenizers. "
            f"{args.steps} training steps per run, same data and seed.\n")
    table = head + body + note
    (out / "results.md").write_text(table)
    return table


def _smooth(values: list[float], window: int = 10) -> list[float]:
    """Trailing moving average (the per-step loss jumps with each batch's code/prose mix)."""
    out, acc = [], 0.0
    for i, v in enumerate(values):
        acc += v - (values[i - window] if i >= window else 0.0)
        out.append(acc / min(i + 1, window))
    return out


def plot_losses(out: Path, modes: list[str]) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(7, 4))
    for i, mode in enumerate(modes):
        lines = (out / "runs" / mode / "metrics.jsonl").read_text().splitlines()
        steps = [json.loads(x) for x in lines if '"loss"' in x]
        xs = [s["step"] for s in steps]
        color = f"C{i}"
        ax.plot(xs, _smooth([s["clm_loss"] for s in steps]), color=color, label=f"{mode}: CLM loss")
        if mode != "clm_only":
            ax.plot(xs, _smooth([s["fusion_loss"] for s in steps]), "--", color=color, label=f"{mode}: fusion loss")
    ax.set_xlabel("step")
    ax.set_ylabel("loss (nats/token, 10-step mean)")
    ax.set_title("livefuse demo: training loss")
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(out / "loss_curves.png", dpi=120)
    plt.close(fig)
