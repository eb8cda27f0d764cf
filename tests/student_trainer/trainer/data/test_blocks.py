"""Blocks that carry their exact text, and deterministic, disjoint per-rank micro-batches."""

from __future__ import annotations

import numpy as np
import pytest

from student_trainer.demo.assets import named_tokenizer
from student_trainer.trainer.data.blocks import BlockSampler, loss_mask, make_blocks, split_documents

DOCS = ["def f(x):\n    return x + 1\n" * 20, "Plain prose about tokenizers, offsets and blocks. " * 30,
        "Ünïcödé — mixed text 😀 with tabs\tand  double spaces.\n" * 15]


@pytest.mark.parametrize("name", ["llama-spm", "gpt-2", "mistral-spm"])
def test_blocks_carry_the_exact_text_their_tokens_cover(name):
    tok = named_tokenizer(name)
    blocks = make_blocks(DOCS, tok, seq_len=48, min_tokens=4)
    assert blocks and all(len(b.ids) <= 48 for b in blocks)
    for b in blocks:
        assert b.offsets[0, 0] == 0 and b.offsets[:, 1].max() == len(b.text)
        assert any(b.text in d for d in DOCS)  # a verbatim slice of its document
        for tid, (start, end) in zip(b.ids.tolist(), b.offsets.tolist(), strict=True):
            piece = tok.decode([tid])
            if "\ufffd" not in piece:  # whole characters: the offsets slice the token's text out of the block
                assert piece.strip() == b.text[start:end].strip()
    assert sum(len(b.ids) for b in blocks) == sum(len(tok(d, add_special_tokens=False)["input_ids"]) for d in DOCS)


def test_ranks_read_disjoint_shards_deterministically_and_epochs_reshuffle():
    tok = named_tokenizer("gpt-2")
    blocks = make_blocks(DOCS * 4, tok, seq_len=16, min_tokens=2)
    samplers = [BlockSampler(blocks, 2, 0, seed=3, rank=r, world=2) for r in range(2)]
    epoch = [np.concatenate([s.block_ids(i) for i in range(s.per_epoch)]) for s in samplers]
    assert not set(epoch[0]) & set(epoch[1])  # each rank its own shard
    assert np.array_equal(samplers[0].block_ids(5), BlockSampler(blocks, 2, 0, seed=3, rank=0, world=2).block_ids(5))
    nxt = np.concatenate([samplers[0].block_ids(samplers[0].per_epoch + i) for i in range(samplers[0].per_epoch)])
    assert not np.array_equal(nxt, epoch[0])  # a new order in the next epoch
    with pytest.raises(ValueError, match="too few"):
        BlockSampler(blocks[:3], 2, 0, world=2)


def test_split_and_loss_mask():
    train, held = split_documents([str(i) for i in range(20)], 0.1, seed=0)
    assert len(held) == 2 and not set(train) & set(held) and len(train) == 18
    mask = loss_mask(np.array([[1, 1, 1, 0], [1, 1, 1, 1]]))
    assert mask.tolist() == [[True, True, False, False], [True, True, True, False]]
