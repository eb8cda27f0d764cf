"""Held-out evaluation: the student's perplexity (per token and per character) and each source's CE on
the same held-out text, per character too, since tokenizers differ in granularity."""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch

from student_trainer.data import Block, collate, loss_mask
from student_trainer.fusion import predicted_chars
from student_trainer.teachers import Source


@torch.no_grad()
def student_sums(engine, blocks: Sequence[Block], pad_id: int, micro_batch: int) -> np.ndarray:
    """[summed NLL, predicted tokens, covered characters] of the student over ``blocks``."""
    sums = np.zeros(3)
    was_training = engine.module.training
    engine.module.eval()
    for s in range(0, len(blocks), micro_batch):
        batch = collate(-1, list(blocks[s:s + micro_batch]), pad_id)
        ids = torch.from_numpy(batch.input_ids).to(engine.device)
        logits = engine(input_ids=ids, attention_mask=torch.from_numpy(batch.attention_mask).to(engine.device)).logits
        logp = torch.log_softmax(logits.float(), -1)[:, :-1].gather(-1, ids[:, 1:, None]).squeeze(-1)
        mask = torch.from_numpy(loss_mask(batch.attention_mask)[:, :-1]).to(engine.device)
        sums[0] += float(-(logp * mask).sum())
        sums[1] += float(mask.sum())
        sums[2] += sum(predicted_chars(b.offsets) for b in batch.blocks)
    engine.module.train(was_training)
    return sums


def source_sums(source: Source, blocks: Sequence[Block]) -> np.ndarray:
    """[summed NLL, predicted tokens, covered characters] of a source on the same texts (its own tokens)."""
    outputs = source.fetch([b.text for b in blocks]) or []
    sums = np.zeros(3)
    for out in outputs:
        sums += [-float(np.sum(out.next_logprobs, dtype=np.float64)), len(out.next_logprobs),
                 predicted_chars(out.tokens.offsets)]
    return sums


def summarise(sums: np.ndarray) -> dict[str, float]:
    nll, tokens, chars = (float(x) for x in sums)
    if tokens == 0:
        return {"ce_per_token": float("nan"), "perplexity": float("nan"), "nats_per_char": float("nan")}
    return {"ce_per_token": nll / tokens, "perplexity": math.exp(min(nll / tokens, 50.0)),
            "nats_per_char": nll / max(chars, 1)}
