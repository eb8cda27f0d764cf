"""Corpus -> target-token blocks that carry the exact text they cover -> deterministic micro-batches.

Documents are read with ``datasets`` (.txt = one document per file, .jsonl/.json/.parquet = one per row),
tokenized with the target tokenizer (with character offsets) and cut into blocks of ``seq_len`` tokens
that never cross documents. A block keeps its text slice and its token offsets relative to that slice:
the slice is what the teachers score. The order of blocks is a seeded permutation per epoch; rank r of
W takes every W-th block of it. Micro-batch number m is a pure function of (seed, rank, world, m), so the
data position in a checkpoint is one integer.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from student_trainer.trainer.config import DATA_FILE_KINDS


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


def read_documents(files: Sequence[str], text_field: str) -> list[str]:
    """Texts of all documents in ``files`` (kinds by extension), empty ones dropped, in file order."""
    import datasets

    by_builder: dict[str, list[str]] = {}
    for name in files:
        path = Path(name)
        builder = DATA_FILE_KINDS.get(path.suffix.lower())
        if builder is None:
            raise ValueError(f"data file {name}: unknown extension {path.suffix!r}; accepted: {sorted(DATA_FILE_KINDS)}")
        if not path.is_file():
            raise ValueError(f"data file {name} does not exist")
        by_builder.setdefault(builder, []).append(str(path))
    docs: list[str] = []
    for builder, paths in by_builder.items():
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=paths, split="train", **kwargs)
        field = "text" if builder == "text" else text_field
        if field not in ds.column_names:
            raise ValueError(f"data files {paths}: no field {field!r}; fields: {ds.column_names} "
                             "(set data.text_field)")
        docs.extend(t for t in ds[field] if isinstance(t, str) and t.strip())
    return docs


def split_documents(docs: list[str], fraction: float, seed: int) -> tuple[list[str], list[str]]:
    """Seeded document-level split into (train, held-out)."""
    if fraction <= 0 or len(docs) < 2:
        return docs, []
    order = np.random.default_rng(seed).permutation(len(docs))
    n_val = max(1, int(round(len(docs) * fraction)))
    return [docs[i] for i in order[n_val:]], [docs[i] for i in order[:n_val]]


def make_blocks(docs: Sequence[str], tokenizer, seq_len: int, min_tokens: int) -> list[Block]:
    """Cuts each tokenized document into blocks of at most ``seq_len`` tokens with their text slices."""
    blocks: list[Block] = []
    if not docs:  # e.g. no held-out documents (validation_fraction=0); tokenizers fail on an empty list
        return blocks
    enc = tokenizer(list(docs), add_special_tokens=False, return_offsets_mapping=True,
                    return_attention_mask=False)
    for text, ids, offs in zip(docs, enc["input_ids"], enc["offset_mapping"], strict=True):
        ids, offs = np.asarray(ids, np.int64), np.asarray(offs, np.int64).reshape(-1, 2)
        for s in range(0, len(ids), seq_len):
            b_ids, b_offs = ids[s:s + seq_len], offs[s:s + seq_len]
            if len(b_ids) < min_tokens:
                continue
            start, end = int(b_offs[0, 0]), int(b_offs[:, 1].max())
            blocks.append(Block(b_ids, b_offs - start, text[start:end]))
    return blocks


class BlockSampler:
    """Deterministic micro-batches for one rank: permutation per epoch, rank-strided, equal across ranks."""

    def __init__(self, blocks: Sequence[Block], micro_batch: int, pad_id: int, *, seed: int = 0,
                 rank: int = 0, world: int = 1) -> None:
        self.blocks, self.micro_batch, self.pad_id = blocks, micro_batch, pad_id
        self.seed, self.rank, self.world = seed, rank, world
        self.per_epoch = (len(blocks) // world) // micro_batch
        if self.per_epoch == 0:
            raise ValueError(f"{len(blocks)} blocks are too few for {world} rank(s) x micro batch {micro_batch}; "
                             "add data or lower train_micro_batch_size_per_gpu / data.seq_len")

    def block_ids(self, index: int) -> np.ndarray:
        """Indices into ``blocks`` of micro-batch ``index`` (any index: epochs repeat with new orders)."""
        epoch, i = divmod(index, self.per_epoch)
        order = np.random.default_rng([self.seed, epoch]).permutation(len(self.blocks))
        mine = order[self.rank::self.world][: self.per_epoch * self.micro_batch]
        return mine[i * self.micro_batch:(i + 1) * self.micro_batch]

    def batch(self, index: int) -> Batch:
        return collate(index, [self.blocks[j] for j in self.block_ids(index)], self.pad_id)


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
