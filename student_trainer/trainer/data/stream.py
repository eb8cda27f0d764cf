"""``data.streaming: true``: documents read as a stream and tokenized on the fly — for corpora larger than the
disk, or to start at once without preparing.

What streaming gives up, and what it keeps:

- **No length, no epochs by count.** A stream has no known size: ``train.max_steps`` is required. When a
  rank's share of the stream ends, it starts again (the next "epoch", with a new shuffle order).
- **Approximate shuffling.** ``datasets`` shuffles the shard order and a buffer of ``data.shuffle_buffer``
  documents (seeded, per epoch); blocks of one document stay close together. The prepared path permutes all
  blocks exactly.
- **Ranks read different documents, not different blocks**: ``datasets.distributed.split_dataset_by_node``
  (whole shards when their number divides by the world size, else every W-th document of the shuffled
  stream), so a 2-rank run does not see the same blocks as a 1-rank run with twice the accumulation.
- **Held-out text** comes from ``validation_files`` / ``validation_split``, else from the documents whose
  seeded hash falls under ``validation_fraction`` (decided per document, independent of order and rank);
  the first ``run.eval_blocks`` blocks of it are kept in memory.
- **Resume stays exact**: micro-batch m of rank r is the m-th group of blocks of the rank's stream, a pure
  function of (seed, r, world, m) as long as the input does not change. A resumed run replays the rank's
  stream from its start up to m (``seek``: reading and tokenizing, no teacher calls, no steps, nothing kept):
  exact, at a cost that grows with the position.
"""

from __future__ import annotations

import hashlib
import threading
from collections.abc import Callable, Iterable, Iterator
from itertools import count, islice
from typing import Any

from student_trainer.trainer.config import ConfigError, DataConfig
from student_trainer.trainer.data.blocks import Batch, Block, collate, iter_blocks
from student_trainer.trainer.data.documents import is_document, load_split

STREAM_BATCH_CHARS = 256_000  # characters per tokenizer call: the first block comes quickly
WINDOW = 256                  # micro-batches kept for requests that arrive out of order (prefetch depth)


def held_out(text: str, fraction: float, seed: int) -> bool:
    """Whether a document belongs to the held-out text: its seeded hash falls under ``fraction``."""
    if fraction <= 0:
        return False
    digest = hashlib.blake2b(text.encode("utf-8", "surrogatepass"), digest_size=8, key=str(seed).encode()).digest()
    return int.from_bytes(digest, "little") < fraction * 2.0**64


class StreamSampler:
    """Micro-batches of one rank from its stream of blocks, in order; ``batch(m)`` fast-forwards as needed."""

    per_epoch: int | None = None

    def __init__(self, blocks_of_epoch: Callable[[int], Iterator[Block]], micro_batch: int, pad_id: int) -> None:
        self.micro_batch, self.pad_id = micro_batch, pad_id
        self._blocks = self._forever(blocks_of_epoch)
        self._lock = threading.Lock()
        self._ready: dict[int, Batch] = {}
        self._next = 0  # the index of the next micro-batch to cut from the stream

    @staticmethod
    def _forever(blocks_of_epoch: Callable[[int], Iterator[Block]]) -> Iterator[Block]:
        for epoch in count():
            empty = True
            for block in blocks_of_epoch(epoch):
                empty = False
                yield block
            if empty:
                raise ConfigError("this rank's share of the data stream holds no blocks; add data or lower "
                                 "data.seq_len / data.min_block_tokens")

    def seek(self, index: int) -> None:
        """Positions the stream at micro-batch ``index`` (a resumed run's first): the ones before it are read
        and dropped, never collated or kept."""
        with self._lock:
            while self._next < index:
                for _ in islice(self._blocks, self.micro_batch):
                    pass
                self._next += 1
            self._ready = {i: b for i, b in self._ready.items() if i >= index}

    def held(self) -> int:
        """Micro-batches cut from the stream and not handed out yet (the prefetch window)."""
        with self._lock:
            return len(self._ready)

    def batch(self, index: int) -> Batch:
        with self._lock:
            while self._next <= index:
                blocks = list(islice(self._blocks, self.micro_batch))
                if self._next >= index - WINDOW:
                    self._ready[self._next] = collate(self._next, blocks, self.pad_id)
                self._next += 1
            if index not in self._ready:
                raise RuntimeError(f"micro-batch {index} of the stream was already handed out or skipped")
            return self._ready.pop(index)


def _documents(rows: Iterable[dict[str, Any]], d: DataConfig, keep_held_out: bool | None) -> Iterator[str]:
    """Non-empty texts of ``rows``; with ``keep_held_out`` set, only the held-out (True) or other (False) ones."""
    for row in rows:
        text = row["text"]
        if is_document(text) and (keep_held_out is None
                                  or held_out(text, d.validation_fraction, d.shuffle_seed) == keep_held_out):
            yield text


def rank_blocks(d: DataConfig, tokenizer, rank: int, world: int) -> Callable[[int], Iterator[Block]]:
    """epoch -> this rank's blocks of the train stream in that epoch."""
    from datasets.distributed import split_dataset_by_node

    separate = load_split(d, "validation", streaming=True) is not None
    stream = split_dataset_by_node(load_split(d, "train", streaming=True), rank=rank, world_size=world)
    stream = stream.shuffle(seed=d.shuffle_seed, buffer_size=d.shuffle_buffer)

    def blocks(epoch: int) -> Iterator[Block]:
        stream.set_epoch(epoch)
        texts = _documents(stream, d, None if separate else False)
        return iter_blocks(texts, tokenizer, d.seq_len, d.min_block_tokens, d.max_piece_chars, STREAM_BATCH_CHARS)

    return blocks


def validation_blocks(d: DataConfig, tokenizer, n: int) -> list[Block]:
    """The first ``n`` held-out blocks (every rank reads the same ones; evaluation strides them by rank)."""
    val = load_split(d, "validation", streaming=True)
    if val is None and d.validation_fraction <= 0:
        return []
    texts = _documents(val, d, None) if val is not None else _documents(load_split(d, "train", streaming=True), d, True)
    blocks = iter_blocks(texts, tokenizer, d.seq_len, d.min_block_tokens, d.max_piece_chars, STREAM_BATCH_CHARS)
    return list(islice(blocks, n))


def stream_data(d: DataConfig, tokenizer, micro: int, *, rank: int, world: int, eval_blocks: int
                ) -> tuple[StreamSampler, list[Block], dict[str, Any]]:
    """The streaming counterpart of the prepared path: (sampler, held-out blocks, start-up facts)."""
    sampler = StreamSampler(rank_blocks(d, tokenizer, rank, world), micro, tokenizer.pad_token_id)
    val = validation_blocks(d, tokenizer, eval_blocks)
    return sampler, val, {"streaming": True, "val_blocks": len(val),
                          "source": d.dataset or f"{len(d.train_files)} file(s)"}
