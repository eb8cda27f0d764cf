"""The prepared corpus: tokenized once, on disk, read by every rank without holding it in memory.

    livefuse-train prepare --config run.yaml     # optional: the first training run prepares it the same way

One cache per (inputs, target tokenizer fingerprint, seq_len, min_block_tokens, max_piece_chars, split
settings, format version), in ``<cache_dir>/<name>-<key>/``::

    meta.json                  build.CorpusMeta: the key's inputs, counts, dtypes, every file's size, sha256 of
                               each block table, the format version
    train/text.bin             the documents' text, UTF-8, in document order (long ones as pieces)
    train/ids.bin              the kept token ids, flat (uint16 when the vocabulary fits, else uint32)
    train/offsets.bin          (n, 2) uint16: each token's characters relative to its block's text
    train/blocks.bin           (k, 5) int64: piece row, token start, token end, text byte start, byte end
    validation/...             the same for the held-out documents

It is written into ``<folder>.partial-<pid>`` (``build``) and renamed into place last: the rename is the
completion marker, so a killed build leaves only a ``.partial`` folder that the next builder removes. A folder
whose files do not match ``meta.json`` (sizes, block-table hashes) is rebuilt, never used. One process builds
under a file lock (``<folder>.lock``); every other rank or run waits for it and then reads the result.

A block is read with ``pread``: its table row, two slices of the token files and its text's bytes. Nothing is
memory-mapped, so a rank's RSS does not grow as it reads (mapped pages count in RSS and in the OOM killer's
score even when they are only page cache), and nothing per block is held as a Python object.
"""

from __future__ import annotations

import hashlib
import json
import logging
import os
import re
import shutil
import time
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from protos.vocabulary import tokenizer_fingerprint
from student_trainer.paths import cache_root
from student_trainer.trainer.config import ConfigError, DataConfig
from student_trainer.trainer.data.blocks import Block
from student_trainer.trainer.data.build import (
    FILES,
    FORMAT_VERSION,
    CorpusMeta,
    SplitMeta,
    build,
    file_sha256,
)
from student_trainer.trainer.data.documents import identity

log = logging.getLogger("livefuse.trainer.data")


def default_root() -> Path:
    """Where prepared corpora go unless ``data.cache_dir`` says otherwise."""
    return cache_root() / "data"


def cache_folder(d: DataConfig, fingerprint: str, inputs: dict[str, Any]) -> Path:
    """``<cache_dir>/<name>-<key>``: the key hashes everything that changes the prepared blocks."""
    held_out = d.validation_files or d.validation_split
    settings = {"format": FORMAT_VERSION, "inputs": inputs, "tokenizer": fingerprint, "seq_len": d.seq_len,
                "min_block_tokens": d.min_block_tokens, "max_piece_chars": d.max_piece_chars,
                "text_field": d.text_field,
                "split": None if held_out else [d.validation_fraction, d.shuffle_seed]}
    key = hashlib.sha256(json.dumps(settings, sort_keys=True).encode()).hexdigest()[:24]
    label = Path(d.dataset).name if d.dataset else Path(d.train_files[0]).stem
    label = re.sub(r"[^A-Za-z0-9_.-]+", "_", label)[:40] or "corpus"
    return (Path(d.cache_dir).expanduser() if d.cache_dir else default_root()) / f"{label}-{key}"


# --- reading ----------------------------------------------------------------------------------------------------

class PreparedBlocks(Sequence[Block]):
    """The blocks of one split, read from the cache on demand; ``len``, ``[i]`` and ``[a:b]`` like a list.

    Reads are ``os.pread`` calls on descriptors opened once: safe from several threads (the prefetcher's).
    """

    def __init__(self, folder: Path, meta: SplitMeta) -> None:
        self.n_blocks = meta.blocks
        self.ids_dtype = np.dtype(meta.ids_dtype)
        self._fds = {name: os.open(folder / name, os.O_RDONLY) for name in FILES}
        weakref.finalize(self, lambda fds: [os.close(fd) for fd in fds], list(self._fds.values()))

    def _read(self, name: str, dtype: np.dtype, start: int, count: int) -> np.ndarray:
        size = np.dtype(dtype).itemsize
        return np.frombuffer(os.pread(self._fds[name], count * size, start * size), dtype)

    def __len__(self) -> int:
        return self.n_blocks

    @overload
    def __getitem__(self, i: int) -> Block: ...
    @overload
    def __getitem__(self, i: slice) -> list[Block]: ...

    def __getitem__(self, i: int | slice) -> Block | list[Block]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        if not -self.n_blocks <= i < self.n_blocks:
            raise IndexError(f"block {i} of {self.n_blocks}")
        _, t0, t1, b0, b1 = self._read("blocks.bin", np.dtype(np.int64), 5 * (i % self.n_blocks), 5).tolist()
        text = os.pread(self._fds["text.bin"], b1 - b0, b0).decode("utf-8", "surrogatepass")
        ids = self._read("ids.bin", self.ids_dtype, t0, t1 - t0)
        offsets = self._read("offsets.bin", np.dtype(np.uint16), 2 * t0, 2 * (t1 - t0)).reshape(-1, 2)
        return Block(ids.astype(np.int64), offsets.astype(np.int64), text)


@dataclass(frozen=True)
class PreparedCorpus:
    """A complete prepared corpus: its folder and its typed metadata."""

    folder: Path
    meta: CorpusMeta

    def blocks(self, split: str) -> PreparedBlocks:
        return PreparedBlocks(self.folder / split, self.meta.splits[split])

    def facts(self) -> dict[str, Any]:
        """What the start-up log says about the data: where, how much, what was skipped."""
        splits = self.meta.splits
        return {"cache": str(self.folder), "cache_bytes": sum(sum(m.files.values()) for m in splits.values()),
                "documents": splits["train"].documents,
                "empty_documents_skipped": sum(m.empty_skipped for m in splits.values()),
                "train_tokens": splits["train"].block_tokens, "validation_documents": splits["validation"].documents}


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache (None: it is). A folder whose meta.json is of another format or
    not ours raises ValueError (never deleted: it may be someone else's)."""
    if not folder.exists():
        return "missing"
    try:
        meta = CorpusMeta.read(folder)
    except (OSError, json.JSONDecodeError):
        return "without a readable meta.json (half-written?)"
    if meta.key != folder.name:
        raise ConfigError(f"{folder / 'meta.json'}: the metadata of cache {meta.key!r}, not of {folder.name!r}: "
                         f"delete {folder} (the next run rebuilds it) or set data.cache_dir to another folder")
    for split, m in meta.splits.items():
        for name, size in m.files.items():
            path = folder / split / name
            if not path.is_file() or path.stat().st_size != size:
                return f"corrupt: {split}/{name} is missing or has the wrong size"
        if file_sha256(folder / split / "blocks.bin") != m.blocks_sha256:
            return f"corrupt: {split}/blocks.bin does not match its hash"
    return None


def prepare_corpus(d: DataConfig, tokenizer, *, progress: bool = True) -> PreparedCorpus:
    """The prepared corpus for ``d`` and ``tokenizer``: opened if complete, else built once under a file lock
    (every other process waits for the builder and then opens its result)."""
    from filelock import FileLock, Timeout

    inputs = identity(d)
    fingerprint = tokenizer_fingerprint(tokenizer)
    folder = cache_folder(d, fingerprint, inputs)
    if problem(folder) is not None:
        folder.parent.mkdir(parents=True, exist_ok=True)
        lock = FileLock(str(folder) + ".lock")
        try:
            lock.acquire(timeout=1)
        except Timeout:
            log.info(f"waiting for another process to finish preparing {folder}")
            lock.acquire()
        try:
            if (reason := problem(folder)) is not None:
                if reason != "missing":
                    log.warning(f"the data cache {folder} is {reason}; rebuilding it")
                    shutil.rmtree(folder)
                header = {"format": FORMAT_VERSION, "key": folder.name, "inputs": inputs, "tokenizer": fingerprint,
                          "seq_len": d.seq_len, "min_block_tokens": d.min_block_tokens,
                          "max_piece_chars": d.max_piece_chars, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                build(d, tokenizer, folder, header, progress)
        finally:
            lock.release()
    return PreparedCorpus(folder, CorpusMeta.read(folder))
