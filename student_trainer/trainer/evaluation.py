"""Held-out evaluation: the student's perplexity (per token and per character) and each source's CE on
the same held-out text, per character too, since tokenizers differ in granularity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from student_trainer.core.fusion import predicted_chars
from student_trainer.trainer.data.blocks import Block, collate, loss_mask
from student_trainer.trainer.sources import Source


@torch.no_grad()
def nll_sums(model, blocks: Sequence[Block], pad_id: int, micro_batch: int, forwards: int = 0,
             spare: Block | None = None) -> np.ndarray:
    """[summed NLL, predicted tokens, covered characters] of a causal LM over ``blocks``.

    ``model``: a DeepSpeed engine (the trainer's eval) or a plain transformers model (the demo's table);
    anything called as ``model(input_ids=..., attention_mask=...).logits``. The one evaluator of livefuse.
    ``forwards``: run at least this many forward passes, the extra ones on ``spare`` with their result dropped.
    Under ZeRO-3 every forward gathers the parameters from all ranks (a collective), so a rank with fewer
    held-out blocks must run as many forwards as the others, or the ranks hang (or mix up their collectives).
    """
    module = getattr(model, "module", model)
    device = next(module.parameters()).device
    batches = [list(blocks[s:s + micro_batch]) for s in range(0, len(blocks), micro_batch)]
    idle = max(forwards - len(batches), 0)
    assert spare is not None or not idle, "extra forward passes need a spare block"
    sums = np.zeros(3)
    was_training = module.training
    module.eval()
    for i, chunk in enumerate(batches + [[spare]] * idle):
        batch = collate(-1, chunk, pad_id)
        ids = torch.from_numpy(batch.input_ids).to(device)
        logits = model(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask).to(device)).logits
        if i >= len(batches):
            continue  # an idle forward: only its collectives count
        logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = torch.from_numpy(loss_mask(batch.attention_mask)[:, :-1]).to(device)
        sums[0] += float(-(logp * mask).sum())
        sums[1] += float(mask.sum())
        sums[2] += sum(predicted_chars(b.offsets) for b in batch.blocks)
    module.train(was_training)
    return sums


def teacher_sums(next_logprobs: Sequence[np.ndarray], offsets: Sequence[np.ndarray]) -> np.ndarray:
    """[summed NLL, predicted tokens, covered characters] of a teacher from its scores (its own tokens)."""
    sums = np.zeros(3)
    for lp, offs in zip(next_logprobs, offsets, strict=True):
        sums += [-float(np.sum(lp, dtype=np.float64)), len(lp), predicted_chars(offs)]
    return sums


def source_sums(source: Source, blocks: Sequence[Block]) -> np.ndarray | None:
    """:func:`teacher_sums` of a source on the texts of ``blocks``; None when the source was skipped (down,
    policy ``skip``). Raises the source's SourceFailed / SourceChanged."""
    if not blocks:
        return np.zeros(3)
    outputs = source.fetch([b.text for b in blocks])
    if outputs is None:
        return None
    return teacher_sums([o.next_logprobs for o in outputs], [o.tokens.offsets for o in outputs])


def summarise(sums: np.ndarray) -> dict[str, float]:
    nll, tokens, chars = (float(x) for x in sums)
    if not tokens > 0:  # nothing scored, or NaN (a source that was down)
        return {"ce_per_token": float("nan"), "perplexity": float("nan"), "nats_per_char": float("nan")}
    return {"ce_per_token": nll / tokens, "perplexity": math.exp(min(nll / tokens, 50.0)),
            "nats_per_char": nll / max(chars, 1)}
