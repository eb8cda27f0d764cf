"""Corpus -> target-token blocks that carry the exact text they cover -> deterministic micro-batches.

Documents come from local files or a ``datasets`` dataset (``documents``); at scale they are tokenized
once into an on-disk cache that every rank reads block by block (``prepared``), or streamed
(``stream``).
This module holds the pure parts both share: cutting a long document into pieces at line breaks, cutting a
tokenized piece into blocks of ``seq_len`` tokens that never cross pieces, the seeded sampler and collate.
A block keeps its text slice and its token offsets relative to that slice: the slice is what the teachers
score. The order of blocks is a seeded permutation per epoch; rank r of W takes every W-th block of it.
Micro-batch number m is a pure function of (seed, rank, world, m), so the data position in a checkpoint is
one integer.
"""

from __future__ import annotations

import threading
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass
from itertools import chain, islice
from typing import Protocol

import numpy as np

from student_trainer.trainer.config import ConfigError

MAX_BLOCK_CHARS = 65_535      # a block's text fits uint16 offsets (real text has ~4 characters per token)
DEFAULT_PIECE_CHARS = 1_000_000  # longer documents are tokenized in pieces cut at line breaks
BATCH_CHARS = 4_000_000       # characters per tokenizer call: bounds the memory of one call


@dataclass(frozen=True)
class Block:
    ids: np.ndarray      # (n,) int64 target token ids
    offsets: np.ndarray  # (n, 2) int64 [start, end) into ``text``
    text: str


@dataclass(frozen=True)
class Batch:
    """A micro-batch: right-padded ``input_ids (B, T)``, ``attention_mask (B, T)`` and the blocks."""

    index: int
    input_ids: np.ndarray
    attention_mask: np.ndarray
    blocks: list[Block]


class Sampler(Protocol):
    """What the prefetcher draws micro-batches from: ``batch(m)`` is a pure function of (seed, rank, world, m)."""

    per_epoch: int | None  # micro-batches per epoch (None: a stream of unknown length)

    def seek(self, index: int) -> None:
        """The run starts (or resumes) at micro-batch ``index``; earlier ones will not be asked for."""

    def batch(self, index: int) -> Batch: ...


def load_target_tokenizer(name: str):
    """The target tokenizer (fast: blocks keep its character offsets), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "is_fast", False):
        raise ConfigError(f"target.tokenizer: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; the "
                         "trainer needs character offsets (save the tokenizer with a tokenizer.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


def split_order(n: int, fraction: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded document-level split of ``n`` documents: (train indices, held-out indices)."""
    if fraction <= 0 or n < 2:
        return np.arange(n), np.arange(0)
    order = np.random.default_rng(seed).permutation(n)
    n_val = max(1, int(round(n * fraction)))
    return order[n_val:], order[:n_val]


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded document-level split into (train, held-out)."""
    train, held = split_order(len(docs), fraction, seed)
    return [docs[i] for i in train], [docs[i] for i in held]


def text_pieces(text: str, max_chars: int) -> list[str]:
    """``text`` cut into pieces of at most ``max_chars`` characters, at a line break (else a space) in the
    second half of each piece where there is one; whitespace-only pieces are dropped."""
    pieces, start = [], 0
    while len(text) - start > max_chars:
        end = start + max_chars
        cut = text.rfind("\n", start + max_chars // 2, end)
        if cut < 0:
            cut = text.rfind(" ", start + max_chars // 2, end)
        end = end if cut < 0 else cut + 1
        pieces.append(text[start:end])
        start = end
    pieces.append(text[start:])
    return [p for p in pieces if p.strip()]


def char_batches(texts: Iterable[str], max_chars: int = BATCH_CHARS) -> Iterator[list[str]]:
    """Consecutive texts grouped into lists of about ``max_chars`` characters (one tokenizer call each)."""
    batch: list[str] = []
    size = 0
    for text in texts:
        batch.append(text)
        size += len(text)
        if size >= max_chars:
            yield batch
            batch, size = [], 0
    if batch:
        yield batch


def tokenize_texts(tokenizer, texts: list[str]) -> list[tuple[np.ndarray, np.ndarray]]:
    """``(ids (n,) int64, offsets (n, 2) int64)`` of each text, in one tokenizer call."""
    enc = tokenizer(texts, add_special_tokens=False, return_offsets_mapping=True, return_attention_mask=False)
    return [(np.asarray(ids, np.int64),  # fromiter: 3x faster than asarray on a list of pairs
             np.fromiter(chain.from_iterable(offs), np.int64, 2 * len(offs)).reshape(-1, 2))
            for ids, offs in zip(enc["input_ids"], enc["offset_mapping"], strict=True)]


def cut_blocks(offsets: np.ndarray, seq_len: int, min_tokens: int) -> np.ndarray:
    """Blocks of one tokenized piece: ``(k, 4) int64`` rows [token start, token end, char start, char end].

    Blocks of ``seq_len`` tokens from the piece's start; one whose text would exceed MAX_BLOCK_CHARS ends
    earlier; blocks shorter than ``min_tokens`` (the trailing one, usually) are dropped.
    """
    rows: list[tuple[int, int, int, int]] = []
    s, n = 0, len(offsets)
    while s < n:
        e = min(s + seq_len, n)
        start = int(offsets[s, 0])
        reach = np.maximum.accumulate(offsets[s:e, 1])
        if reach[-1] - start > MAX_BLOCK_CHARS:
            e = s + max(1, int(np.searchsorted(reach, start + MAX_BLOCK_CHARS, side="right")))
        if e - s >= min_tokens and reach[e - s - 1] - start <= MAX_BLOCK_CHARS:
            rows.append((s, e, start, int(reach[e - s - 1])))
        s = e
    return np.asarray(rows, np.int64).reshape(-1, 4)


def iter_blocks(docs: Iterable[str], tokenizer, seq_len: int, min_tokens: int,
                max_piece_chars: int = DEFAULT_PIECE_CHARS, batch_chars: int = BATCH_CHARS) -> Iterator[Block]:
    """Each document tokenized (long ones in pieces) and cut into blocks of at most ``seq_len`` tokens with
    their text slices, lazily: memory is bounded by one tokenizer call of ``batch_chars`` characters."""
    pieces = (p for d in docs for p in text_pieces(d, max_piece_chars))
    for batch in char_batches(pieces, batch_chars):
        for text, (ids, offs) in zip(batch, tokenize_texts(tokenizer, batch), strict=True):
            for s, e, a, b in cut_blocks(offs, seq_len, min_tokens).tolist():
                yield Block(ids[s:e], offs[s:e] - a, text[a:b])


def make_blocks(docs: Sequence[str], tokenizer, seq_len: int, min_tokens: int,
                max_piece_chars: int = DEFAULT_PIECE_CHARS) -> list[Block]:
    """In memory (held-out texts, the demo's table); the prepared cache (``prepared``) stores the same blocks."""
    return list(iter_blocks(docs, tokenizer, seq_len, min_tokens, max_piece_chars))


def first_blocks(docs: Iterable[str], tokenizer, seq_len: int, min_tokens: int, n: int,
                 batch_chars: int = 1 << 16) -> list[Block]:
    """``make_blocks(...)[:n]``, tokenizing only about the documents those blocks need (held-out scoring:
    tokenizer calls of ``batch_chars`` characters instead of whole files)."""
    return list(islice(iter_blocks(docs, tokenizer, seq_len, min_tokens, batch_chars=batch_chars), n))


class BlockSampler:
    """Deterministic micro-batches for one rank: permutation per epoch, rank-strided, equal across ranks.

    ``blocks`` is any sequence: a list in memory, or the blocks of a prepared cache (read on demand).
    """

    def __init__(self, blocks: Sequence[Block], micro_batch: int, pad_id: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.blocks, self.micro_batch, self.pad_id = blocks, micro_batch, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = (len(blocks) // world) // micro_batch
        if self.per_epoch == 0:
            raise ConfigError(f"{len(blocks)} blocks are too few for {world} rank(s) x micro batch {micro_batch}; "
                             "add data or lower train_micro_batch_size_per_gpu / data.seq_len")
        self._lock = threading.Lock()
        self._orders: dict[int, np.ndarray] = {}  # epoch -> this rank's blocks (the last two epochs asked for)

    def _mine(self, epoch: int) -> np.ndarray:
        """This rank's share of the epoch's seeded order, computed once per epoch (8 bytes per block)."""
        with self._lock:
            if epoch not in self._orders:
                order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
                self._orders = {e: o for e, o in self._orders.items() if e == epoch - 1}
                self._orders[epoch] = order[self.rank::self.world][: self.per_epoch * self.micro_batch].copy()
            return self._orders[epoch]

    def block_ids(self, index: int) -> np.ndarray:
        """Indices into ``blocks`` of micro-batch ``index`` (any index: epochs repeat with new orders)."""
        epoch, i = divmod(index, self.per_epoch)
        return self._mine(epoch)[i * self.micro_batch:(i + 1) * self.micro_batch]

    def seek(self, index: int) -> None:
        """Nothing to do: any micro-batch is read directly."""

    def batch(self, index: int) -> Batch:
        return collate(index, [self.blocks[int(j)] for j in self.block_ids(index)], self.pad_id)


def collate(index: int, blocks: list[Block], pad_id: int) -> Batch:
    width = max(len(b.ids) for b in blocks)
    ids = np.full((len(blocks), width), pad_id, dtype=np.int64)
    mask = np.zeros((len(blocks), width), dtype=np.int64)
    for r, b in enumerate(blocks):
        ids[r, :len(b.ids)], mask[r, :len(b.ids)] = b.ids, 1
    return Batch(index, ids, mask, blocks)


def loss_mask(attention_mask: np.ndarray) -> np.ndarray:
    """Positions whose next token is real: ``(B, T) bool`` (the last real position predicts nothing)."""
    out = np.zeros(attention_mask.shape, dtype=bool)
    out[:, :-1] = (attention_mask[:, :-1] > 0) & (attention_mask[:, 1:] > 0)
    return out
