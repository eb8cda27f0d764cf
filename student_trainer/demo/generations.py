"""What each trained model generates, judged by the live teachers: the demo's measure of on-policy fusion.

Prompts are the first half of held-out blocks of each domain (the trainer's rollout prompts are cut the same
way, ``rollouts.prompt_length``); each model continues them by seeded sampling at the demo's
``--gen-temperature`` (0.7 by default; the same seed for every model, so the comparison is paired); every source
given as a judge (the demo passes the sources, not the target's initial model) scores prompt + continuation in
its own tokens. Per domain: the teachers' NLL of the
continuations per character fused by MinCE's rule (``generation_metrics.min_ce_sums``), the domain expert's
alone, distinct-2, the repeated 4-gram rate and the continuations' mean length. The held-out text's own
continuations give the same numbers as a reference.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from protos.vocabulary import raw_vocab
from student_trainer.experiments.compare import run_dir
from student_trainer.experiments.generation_metrics import (
    continuation_sums,
    distinct_n,
    min_ce_sums,
    repeated_ngram_rate,
)
from student_trainer.experiments.seed_stats import Scores
from student_trainer.trainer.client import TeacherClient
from student_trainer.trainer.config import OnPolicyConfig
from student_trainer.trainer.data.blocks import Block, first_blocks, load_target_tokenizer
from student_trainer.trainer.rollouts import TokenText, prompt_length, rollout_block, sample

EVAL_SEED = 20261221  # the sampling seed of every model's continuations (paired across modes and seeds)


@dataclass(frozen=True)
class Prompts:
    """One domain's held-out prompts: the blocks, each one's prompt length and its own continuation."""

    blocks: list[Block]
    lengths: list[int]

    def reference(self, max_new_tokens: int) -> list[np.ndarray]:
        """The held-out text's own continuations: each block's next ``max_new_tokens`` after its prompt."""
        return [b.ids[p:p + max_new_tokens] for b, p in zip(self.blocks, self.lengths, strict=True)]


def heldout_prompts(texts: list[str], tokenizer, seq_len: int, n_blocks: int, cfg: OnPolicyConfig) -> Prompts:
    blocks = first_blocks(texts, tokenizer, seq_len, 16, n_blocks)
    return Prompts(blocks, [prompt_length(b, cfg) for b in blocks])


def model_text(tokenizer, model) -> TokenText:
    """The text of ``model``'s output ids (its output layer may have more rows than ``tokenizer`` has tokens)."""
    return TokenText(raw_vocab(tokenizer, model.get_output_embeddings().weight.shape[0]), tokenizer.all_special_ids)


def continue_prompts(model, tokenizer, prompts: Prompts, cfg: OnPolicyConfig, text: TokenText) -> list[np.ndarray]:
    """The model's continuation ids of every prompt (seeded, :data:`EVAL_SEED`), up to its first id without text
    (``text``: :func:`model_text`)."""
    new = sample(model, [b.ids[:p] for b, p in zip(prompts.blocks, prompts.lengths, strict=True)], cfg,
                 seed=EVAL_SEED, pad_id=tokenizer.pad_token_id, eos_id=tokenizer.eos_token_id,
                 suppress=text.padded_rows, synced=False)
    return [s.ids[:text.kept(s.ids)] for s in new]


def scored_texts(prompts: Prompts, continuations: Sequence[np.ndarray], text: TokenText) -> tuple[list[str], list[int]]:
    """Prompt + continuation as text, and where each continuation starts (characters)."""
    built = [rollout_block(b, p, c, text)[0] for b, p, c in zip(prompts.blocks, prompts.lengths, continuations,
                                                                 strict=True)]
    return [b.text for b in built], [int(b.offsets[p - 1, 1]) for b, p in zip(built, prompts.lengths, strict=True)]


def continuation_nll(address: str, texts: list[str], starts: list[int]) -> list[tuple[float, float]]:
    """One teacher's (NLL, characters) of each continuation, in its own tokens."""
    with TeacherClient(address, timeout=300) as client:
        scores = client.score(texts, top_k=1, truncate=True)
    return [continuation_sums(s.next_logprobs, s.offsets, start) for s, start in zip(scores, starts, strict=True)]


def generation_scores(continuations: Sequence[np.ndarray], prompts: Prompts, text: TokenText,
                      teachers: Mapping[str, str], expert: str | None) -> dict[str, float]:
    """The continuations' scores: ``gen_nats_per_char`` (MinCE-fused teachers), ``gen_expert_nats_per_char``
    (the domain's expert source; NaN without one), ``distinct2``, ``rep4`` and ``gen_tokens`` (mean length)."""
    texts, starts = scored_texts(prompts, continuations, text)
    per_source = {name: continuation_nll(address, texts, starts) for name, address in teachers.items()}
    nll, chars, _ = min_ce_sums(per_source)
    own = per_source.get(expert or "")
    seqs = [c.tolist() for c in continuations]
    return {"gen_nats_per_char": nll / chars if chars else float("nan"),
            "gen_expert_nats_per_char": sum(n for n, _ in own) / max(sum(c for _, c in own), 1.0) if own
            else float("nan"),
            "distinct2": distinct_n(seqs, 2), "rep4": repeated_ngram_rate(seqs, 4),
            "gen_tokens": float(np.mean([len(s) for s in seqs])) if seqs else float("nan")}


def judge_model(folder: Path | None, prompts: Mapping[str, Prompts], teachers: Mapping[str, str],
                cfg: OnPolicyConfig, tokenizer) -> dict[str, float]:
    """``<domain>_<score>`` of one model's continuations (``folder``; None: the held-out text's own), the target's
    ``tokenizer`` shared by every model."""
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(folder) if folder is not None else None
    text = model_text(tokenizer, model) if model is not None else TokenText(raw_vocab(tokenizer, len(tokenizer)),
                                                                            tokenizer.all_special_ids)
    row = {}
    for domain, p in prompts.items():
        conts = continue_prompts(model, tokenizer, p, cfg, text) if model is not None \
            else p.reference(cfg.max_new_tokens)
        expert = domain if domain in teachers else None
        row.update({f"{domain}_{k}": v for k, v in generation_scores(conts, p, text, teachers, expert).items()})
    return row


def judge_all(runs: Path, modes: Sequence[str], seeds: Sequence[int], initial: Path, texts: Mapping[str, list[str]],
              teachers: Mapping[str, str], seq_len: int, n_prompts: int, cfg: OnPolicyConfig
              ) -> tuple[Scores, dict[str, float], dict[str, float]]:
    """Every run's exported model (``runs/<mode>/seed-<s>/final``), the target's initial model and the held-out
    text itself on the same prompts: (scores per mode and seed, the initial model's, the reference's)."""
    tokenizer = load_target_tokenizer(str(initial))  # the trainer's (EOS pads); every run exports the same one
    prompts = {d: heldout_prompts(t, tokenizer, seq_len, n_prompts, cfg) for d, t in texts.items()}
    scores: Scores = {m: {s: judge_model(run_dir(runs, m, s) / "final", prompts, teachers, cfg, tokenizer)
                          for s in seeds} for m in modes}
    return scores, judge_model(initial, prompts, teachers, cfg, tokenizer), judge_model(None, prompts, teachers, cfg,
                                                                                         tokenizer)
