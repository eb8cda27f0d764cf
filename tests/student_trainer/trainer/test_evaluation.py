"""The run's periodic evaluation: a source that was down at one evaluation is scored again at the next (only
successes are kept for the rest of the run), and the ranks agree on a source failure during evaluation."""

from __future__ import annotations

from types import SimpleNamespace

import numpy as np
import pytest
import torch

from student_trainer.core.alignment import TeacherOutput, Tokens
from student_trainer.trainer.data.blocks import Block
from student_trainer.trainer.run_setup import Run


class _Engine(torch.nn.Module):
    """What evaluation needs of the DeepSpeed engine: a forward that gives logits, the micro-batch size."""

    def __init__(self, vocab: int = 8) -> None:
        super().__init__()
        self.bias = torch.nn.Parameter(torch.zeros(vocab))

    def forward(self, input_ids, attention_mask):
        return SimpleNamespace(logits=self.bias.expand(*input_ids.shape, -1))

    def train_micro_batch_size_per_gpu(self) -> int:
        return 2


class _FlakySource:
    """Down (policy skip: fetch gives None) for the first ``down`` fetches, then answers."""

    def __init__(self, down: int) -> None:
        self.name, self.down, self.fetches = "flaky", down, 0

    def fetch(self, texts, gather=None):
        self.fetches += 1
        if self.fetches <= self.down:
            return None
        n = 5
        tokens = Tokens(np.arange(n, dtype=np.int64), np.stack([np.arange(n), np.arange(1, n + 1)], 1))
        return [TeacherOutput(tokens, np.zeros((n, 1), np.int64), np.zeros((n, 1), np.float32),
                              np.full(n - 1, -0.5, np.float32)) for _ in texts]


def _run(source) -> Run:
    block = Block(np.arange(6, dtype=np.int64), np.stack([np.arange(6), np.arange(1, 7)], 1), "abcdef")
    config = SimpleNamespace(run=SimpleNamespace(eval_blocks=4))
    return Run(config, _Engine(), SimpleNamespace(pad_token_id=0), None, [block, block], [source], None,
               rank=0, world=1, max_steps=1)


def test_a_source_down_at_one_evaluation_is_scored_at_the_next():
    """Defect: the failed fetch was turned into zeros and cached for the whole run (NaN ever after)."""
    source = _FlakySource(down=1)
    run = _run(source)
    first = run.evaluate()
    assert np.isnan(first["flaky/ce_per_token"]) and np.isfinite(first["student/ce_per_token"])
    second = run.evaluate()
    assert second["flaky/ce_per_token"] == pytest.approx(0.5)
    assert run.evaluate()["flaky/ce_per_token"] == pytest.approx(0.5) and source.fetches == 2  # kept once scored


class _CountingEngine(_Engine):
    def __init__(self) -> None:
        super().__init__()
        self.forwards = 0

    def forward(self, input_ids, attention_mask):
        self.forwards += 1
        return super().forward(input_ids, attention_mask)


@pytest.mark.parametrize("eval_blocks", [5, 1])
def test_every_rank_runs_as_many_forwards_as_rank_0(monkeypatch, eval_blocks):
    """Under ZeRO-3 a forward is a collective (it gathers the parameters). Defect: with 5 held-out blocks on 2
    ranks and micro-batches of 2, rank 0 ran 2 forwards and rank 1 one: the ranks hung in evaluation. With one
    block, rank 1 has none and still runs rank 0's one forward; the idle forwards add nothing to its sums."""
    block = Block(np.arange(6, dtype=np.int64), np.stack([np.arange(6), np.arange(1, 7)], 1), "abcdef")
    monkeypatch.setattr(Run, "_summed", lambda self, sums: sums)  # this rank's own sums: no process group here
    forwards, scored = [], []
    for rank in (0, 1):
        engine = _CountingEngine()
        config = SimpleNamespace(run=SimpleNamespace(eval_blocks=eval_blocks))
        run = Run(config, engine, SimpleNamespace(pad_token_id=0), None, [block] * 8, [], None, rank=rank, world=2,
                  max_steps=1)
        out = run.evaluate()
        forwards.append(engine.forwards)
        scored.append(out["student/ce_per_token"])
    assert forwards == [-(-((eval_blocks + 1) // 2) // 2)] * 2
    assert scored[0] == pytest.approx(np.log(8))  # uniform logits over 8 ids
    assert np.isnan(scored[1]) if eval_blocks == 1 else scored[1] == pytest.approx(np.log(8))
