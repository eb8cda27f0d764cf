"""On-policy fusion: a share of the micro-batches are the student's own samples, scored live by every teacher.

    livefuse-train --config run.yaml on_policy.share=0.25 on_policy.max_new_tokens=64

Micro-batch m is a rollout when :func:`is_rollout` says so: evenly spread at ``on_policy.share``, a pure function
of m. Its corpus blocks are the prompts: each block's first ``prompt_tokens`` (or ``prompt_fraction``) tokens,
cut between characters. On every rank the student continues them with its current weights (``generate``
under a seed derived from (train.seed, rank, m) inside ``torch.random.fork_rng``: the training RNG is never
touched, and a resumed run draws the same samples). The continuation's text is its tokens' bytes, so a rollout
is a block like a corpus block (ids, character offsets, text) and the corpus path scores it
(``prefetch.fuse_batch``: each teacher tokenizes the text in its own vocabulary, MinED / offsets align, MinCE /
AvgCE fuse). The loss (``loop.rollout_loss``) covers the continuation's positions where a source distribution
was aligned; the one-hot fallback would teach the student its own sample, so those positions are left out
and counted.

Rollouts need the current weights, so none is prefetched: a step generates its rollouts first (every rank makes
the same ``generate`` calls, which ZeRO-3's parameter gathering needs, before anything can fail), submits each
one's scoring at once and generates the next while the previous is scored; the corpus micro-batches of the
step keep coming from the prefetcher and are trained on while the last rollouts are scored (``loop.train_step``).
A rollout counts its continuation positions in the step's token count, whether or not they are trained on.

Reverse KL and JSD (``on_policy.divergence``) need each teacher's log-probs at the tokens the *student*
favours, which no top-k holds: :func:`sample` also keeps the student's ``gather_candidates`` most likely tokens
at each continuation position (the logits it sampled from), and :func:`gather_plans` asks every teacher for them
(the wire's ``gather``, checked at connect time: ``Source.connect``) at the position whose token ends where the
target token ends — the teacher position that has read the same text. A candidate maps to a teacher token only
through an exact counterpart (``core.vocab.counterpart_map``); one without is left out and counted. The gathered
log-probs join that source's aligned rows before fusion (``prefetch.fuse_sequence``: a union with its top-k), so
that ``sparse_divergence`` finds them in the support.
"""

from __future__ import annotations

import hashlib
import math
from collections.abc import Iterable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

import numpy as np
import torch

from protos.vocabulary import detect_conventions, is_special, token_bytes
from student_trainer.trainer.config import ConfigError, MethodConfig, OnPolicyConfig
from student_trainer.trainer.data.blocks import Batch, Block, collate, loss_mask
from student_trainer.trainer.prefetch import FusedBatch, GatherPlan, fuse_batch
from student_trainer.trainer.sources import Source
from student_trainer.trainer.stats import RolloutStats

if TYPE_CHECKING:
    from student_trainer.trainer.run_setup import Run


def is_rollout(share: float, index: int) -> bool:
    """Micro-batch ``index`` is a rollout when ⌊(m+1)·share⌋ > ⌊m·share⌋: evenly spread, ``share`` of them
    (0: never, 1: always)."""
    return math.floor((index + 1) * share) > math.floor(index * share)


def rollout_seed(seed: int, rank: int, index: int) -> int:
    """The sampling seed of micro-batch ``index`` on ``rank``: a hash of (train.seed, rank, index)."""
    digest = hashlib.blake2b(f"livefuse-rollout/{seed}/{rank}/{index}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") & (2**63 - 1)


def prompt_length(block: Block, cfg: OnPolicyConfig) -> int:
    """Tokens of ``block`` that prompt the student: ``prompt_tokens`` (or ``prompt_fraction`` of the block), at
    least 1, shortened until the cut falls between characters (not after a byte token inside one)."""
    n = len(block.ids)
    want = cfg.prompt_tokens if cfg.prompt_tokens is not None else round(cfg.prompt_fraction * n)
    p = min(max(int(want), 1), n)
    while 1 < p < n and block.offsets[p, 0] < block.offsets[p - 1, 1]:
        p -= 1
    return p


class TokenText:
    """Target id → the bytes it stands for after other text (SentencePiece's ``▁`` is a space there).

    Special tokens and padded output rows have no text: a continuation ends before the first of them.
    """

    def __init__(self, vocab: Sequence[str], special_ids: Iterable[int]) -> None:
        conv, specials = detect_conventions(vocab), set(special_ids)
        self.pieces: list[bytes | None] = [None if not t or i in specials or is_special(t) else token_bytes(t, conv)
                                           for i, t in enumerate(vocab)]
        self.padded_rows = [i for i, t in enumerate(vocab) if not t]  # ids the model has and the tokenizer lacks

    def kept(self, ids: np.ndarray) -> int:
        """How many of ``ids`` come before the first id without text."""
        for n, t in enumerate(ids.tolist()):
            if not 0 <= t < len(self.pieces) or self.pieces[t] is None:
                return n
        return len(ids)

    def text(self, ids: np.ndarray) -> tuple[str, np.ndarray]:
        """The text of ``ids`` (all with text) following other text, and each token's ``[start, end)`` in it
        ``(n, 2) int64``: the characters its bytes fall in, as a fast tokenizer's offsets are (a byte token
        inside a multi-byte character spans that character). Invalid UTF-8 becomes U+FFFD, one per byte."""
        chunks = [self.pieces[t] or b"" for t in ids.tolist()]
        data = b"".join(chunks)
        text = data.decode("utf-8", errors="surrogateescape")  # one char per invalid byte: byte positions map
        sizes = [len(c.encode("utf-8", errors="surrogateescape")) for c in text]
        char_of_byte = np.append(np.repeat(np.arange(len(text), dtype=np.int64), sizes), len(text))
        lengths = np.array([len(c) for c in chunks], np.int64)
        ends = np.cumsum(lengths)
        starts = char_of_byte[ends - lengths]
        stops = np.where(lengths > 0, char_of_byte[np.maximum(ends - 1, 0)] + 1, starts)
        clean = "".join("\ufffd" if "\udc80" <= c <= "\udcff" else c for c in text)
        return clean, np.stack([starts, stops], axis=1).reshape(-1, 2)


def rollout_block(block: Block, prompt: int, new_ids: np.ndarray, text: TokenText) -> tuple[Block, int]:
    """The prompt (``block``'s first ``prompt`` tokens, its own text and offsets) and the sampled continuation
    (up to its first token without text) as one block; also how many new tokens were kept."""
    new_ids = np.asarray(new_ids[:text.kept(new_ids)], np.int64)
    tail, offsets = text.text(new_ids)
    head = block.text[:int(block.offsets[prompt - 1, 1])]
    ids = np.concatenate([block.ids[:prompt], new_ids]).astype(np.int64)
    return Block(ids, np.concatenate([block.offsets[:prompt], offsets + len(head)]).astype(np.int64),
                 head + tail), len(new_ids)


def continuation_mask(attention_mask: np.ndarray, prompt_lens: Sequence[int]) -> np.ndarray:
    """``(B, T) bool``: positions that predict a continuation token (position t predicts token t+1)."""
    starts = np.asarray(prompt_lens, np.int64)[:, None] - 1
    return loss_mask(attention_mask) & (np.arange(attention_mask.shape[1])[None, :] >= starts)


@dataclass(frozen=True)
class Sampled:
    """The student's continuation of one prompt: ``ids (n,)`` and, when gathering, its ``candidates (n, c)``: the
    most likely tokens of the distribution each of them was sampled from."""

    ids: np.ndarray
    candidates: np.ndarray | None = None


@torch.no_grad()
def sample(module, prompts: Sequence[np.ndarray], cfg: OnPolicyConfig, *, seed: int, pad_id: int,
           eos_id: int | None, suppress: Sequence[int], synced: bool, candidates: int = 0) -> list[Sampled]:
    """The student's continuation of each prompt, sampled with its current weights under ``seed``; with
    ``candidates``, also the top ``candidates`` ids of each step's logits (before temperature and top-p).

    Left-padded (every row continues at the same step); the model's own generation defaults are set aside for
    the call, so the sample comes from the student's distribution with only ``temperature`` / ``top_p``.
    ``synced``: ZeRO-3 over several ranks (every rank runs forwards until all are done: they gather the
    parameters together).
    """
    from transformers import GenerationConfig

    device = next(module.parameters()).device
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for r, p in enumerate(prompts):
        ids[r, width - len(p):], mask[r, width - len(p):] = torch.from_numpy(np.asarray(p, np.int64)), 1
    greedy = cfg.temperature == 0
    config = GenerationConfig(max_new_tokens=cfg.max_new_tokens, do_sample=not greedy, top_k=0,
                              temperature=None if greedy else cfg.temperature, top_p=None if greedy else cfg.top_p,
                              pad_token_id=pad_id, eos_token_id=eos_id, suppress_tokens=list(suppress) or None)
    saved, was_training = module.generation_config, module.training
    module.generation_config = config
    module.eval()
    try:
        with torch.random.fork_rng(devices=[torch.cuda.current_device()] if device.type == "cuda" else []):
            torch.manual_seed(seed)
            out = module.generate(input_ids=ids.to(device), attention_mask=mask.to(device), generation_config=config,
                                  synced_gpus=synced, output_logits=candidates > 0, return_dict_in_generate=True)
    finally:
        module.generation_config = saved
        module.train(was_training)
    new = out.sequences[:, width:].cpu().numpy()
    if not candidates:
        return [Sampled(row) for row in new]
    top = torch.stack(out.logits, dim=1).topk(candidates, dim=-1).indices.cpu().numpy()  # (B, steps, c)
    return [Sampled(row, top[r]) for r, row in enumerate(new)]


def gather_plan(block: Block, prompt: int, candidates: np.ndarray) -> GatherPlan:
    """Where to ask the teachers for the student's candidates in one rollout: each continuation position whose
    token ends on a character boundary the next token starts after (not a byte fragment inside a character),
    the character it ends at, and the candidates of the distribution sampled there (``candidates (kept, c)``:
    row s belongs to position ``prompt - 1 + s``)."""
    n, kept = len(block.ids), len(candidates)
    positions = np.arange(prompt - 1, min(prompt - 1 + kept, n - 1))
    positions = positions[block.offsets[positions + 1, 0] >= block.offsets[positions, 1]]  # whole characters
    ends = block.offsets[positions, 1]
    keep = np.concatenate([[True], ends[1:] > ends[:-1]]) & (ends > 0)  # strictly increasing, past the start
    return GatherPlan(positions[keep], ends[keep], candidates[positions[keep] - (prompt - 1)].astype(np.int64))


def score(batch: Batch, prompt_lens: Sequence[int], new_tokens: int, sources: Sequence[Source],
          method: MethodConfig, pool: ThreadPoolExecutor, plans: Sequence[GatherPlan] | None = None) -> FusedBatch:
    """Every source scores the rollouts' text (the corpus path), and with ``plans`` gathers at the student's
    candidates; the loss mask keeps the continuation's positions that got a source distribution."""
    fused = fuse_batch(batch, sources, method, pool, plans)
    cont = continuation_mask(batch.attention_mask, prompt_lens)
    trained = cont & fused.aligned
    asked = unmapped = 0
    for plan in plans or []:
        for source in sources:
            mapped = plan.for_source(source)[1]
            asked, unmapped = asked + mapped.size, unmapped + int((mapped < 0).sum())
    stats = RolloutStats(1, len(batch.blocks), new_tokens, int(cont.sum()), int(trained.sum()), asked, unmapped)
    return replace(fused, loss_mask=trained, rollout=stats)


@dataclass(frozen=True)
class Pending:
    """A rollout micro-batch generated and being scored."""

    index: int
    future: Future[FusedBatch]
    positions: int  # its continuation positions: its part of the step's token count, known before it is scored


class Rollouts:
    """A run's rollouts: which micro-batches they are, their generation on the training thread and their
    scoring on threads. ``start`` then ``finish`` for each rollout of a step."""

    def __init__(self, run: Run, gas: int) -> None:
        self.cfg, self._run = run.config.on_policy, run
        self.text = TokenText(run.target_vocab, run.tokenizer.all_special_ids)
        self._synced = run.engine.zero_optimization_stage() == 3 and run.world > 1
        self._jobs = ThreadPoolExecutor(gas, thread_name_prefix="rollout")
        self._fetchers = ThreadPoolExecutor(max(len(run.sources) * gas, 1), thread_name_prefix="rollout-fetch")
        limit = getattr(run.engine.module.config, "max_position_embeddings", None)
        prompt = self.cfg.prompt_tokens or round(self.cfg.prompt_fraction * run.config.data.seq_len)
        longest = prompt + self.cfg.max_new_tokens
        if limit is not None and longest > limit:
            raise ConfigError(f"on_policy: a prompt of up to {longest - self.cfg.max_new_tokens} tokens plus "
                              f"max_new_tokens={self.cfg.max_new_tokens} exceeds the target's "
                              f"max_position_embeddings={limit}; lower on_policy.max_new_tokens or the prompt")

    def is_rollout(self, index: int) -> bool:
        return is_rollout(self.cfg.share, index)

    def start(self, index: int) -> Pending:
        """Generates micro-batch ``index``'s rollouts now and submits their scoring."""
        run = self._run
        batch = run.sampler.batch(index)
        prompts = [prompt_length(b, self.cfg) for b in batch.blocks]
        c = self.cfg.gather_candidates if self.cfg.gather_ids else 0
        new = sample(run.engine.module, [b.ids[:p] for b, p in zip(batch.blocks, prompts, strict=True)], self.cfg,
                     seed=rollout_seed(run.config.train.seed, run.rank, index), pad_id=run.tokenizer.pad_token_id,
                     eos_id=run.tokenizer.eos_token_id, suppress=self.text.padded_rows, synced=self._synced,
                     candidates=c)
        built = [rollout_block(b, p, s.ids, self.text) for b, p, s in zip(batch.blocks, prompts, new, strict=True)]
        rolled = collate(index, [b for b, _ in built], run.tokenizer.pad_token_id)
        plans = [gather_plan(b, p, s.candidates[:kept]) for (b, kept), p, s in zip(built, prompts, new, strict=True)] \
            if c else None
        future = self._jobs.submit(score, rolled, prompts, sum(n for _, n in built), run.sources, run.config.method,
                                   self._fetchers, plans)
        return Pending(index, future, int(continuation_mask(rolled.attention_mask, prompts).sum()))

    def close(self) -> None:
        self._jobs.shutdown(wait=False, cancel_futures=True)
        self._fetchers.shutdown(wait=False, cancel_futures=True)

    def join(self) -> None:
        self._jobs.shutdown(wait=True)
        self._fetchers.shutdown(wait=True)
