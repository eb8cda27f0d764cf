"""The prepared corpus: tokenized once, on disk, memory-mapped by every rank.

    livefuse-train prepare --config run.yaml     # optional: the first training run prepares it the same way

One cache per (inputs, target tokenizer fingerprint, seq_len, min_block_tokens, max_piece_chars, split
settings, format version), in ``<cache_dir>/<name>-<key>/``::

    meta.json                  the key's inputs, counts, dtypes, every file's size, sha256 of each block table
    train/documents.arrow      documents (pieces of at most max_piece_chars) as a ``datasets`` Arrow table
    train/ids.bin              the kept token ids, flat (uint16 when the vocabulary fits, else uint32)
    train/offsets.bin          (n, 2) uint16: each token's characters relative to its block's text
    train/blocks.npy           (k, 5) int64: document row, token start, token end, char start, char end
    validation/...             the same for the held-out documents

It is written into ``<folder>.partial-<pid>`` and renamed into place last: the rename is the completion
marker, so a killed build leaves only a ``.partial`` folder that the next builder removes. A folder whose
files do not match ``meta.json`` (sizes, block-table hashes) is rebuilt, never used. One process builds
under a file lock (``<folder>.lock``); every other rank or run waits for it and then reads the result.

A block is read from the maps by its table row (two slices) and its text from its document's row — the
text is stored once, the ids and offsets are never held in memory as Python objects.
"""

from __future__ import annotations

import hashlib
import json
import mmap
import multiprocessing
import os
import re
import shutil
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, overload

import numpy as np

from protos.vocabulary import tokenizer_fingerprint
from student_trainer.trainer.config import DataConfig
from student_trainer.trainer.data import Block, char_batches, cut_blocks, encode, split_order, text_pieces
from student_trainer.trainer.data_sources import identity, is_document, load_split

FORMAT_VERSION = 1
ROWS_PER_TASK = 256  # documents per tokenizing task (a worker's unit of work)
SPLITS = ("train", "validation")
Say = Callable[[str], None]


def say_stderr(message: str) -> None:
    print(f"[livefuse] {message}", file=sys.stderr, flush=True)


def default_root() -> Path:
    from student_trainer.trainer.vocab_cache import default_cache_dir

    return default_cache_dir() / "data"


def load_tokenizer(name: str):
    """The target tokenizer (fast: the cache stores its character offsets), with a pad token."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(name)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"target.tokenizer: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; the "
                         "trainer needs character offsets (save the tokenizer with a tokenizer.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    return tokenizer


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

def _map(path: Path, dtype: np.dtype, shape: tuple[int, ...]) -> np.ndarray:
    """A read-only map of ``path``, advised for random access (no read-ahead of pages no block needs)."""
    if shape[0] == 0:  # mmap cannot map an empty file
        return np.zeros(shape, dtype)
    array = np.memmap(path, dtype=dtype, mode="r", shape=shape)
    if hasattr(mmap, "MADV_RANDOM"):
        array._mmap.madvise(mmap.MADV_RANDOM)  # type: ignore[attr-defined]
    return array


class PreparedBlocks(Sequence[Block]):
    """The blocks of one split, read from the cache on demand; ``len``, ``[i]`` and ``[a:b]`` like a list."""

    def __init__(self, folder: Path, meta: dict[str, Any]) -> None:
        import datasets

        n = int(meta["block_tokens"])
        self.docs = datasets.Dataset.from_file(str(folder / "documents.arrow"))
        self.ids = _map(folder / "ids.bin", np.dtype(meta["ids_dtype"]), (n,))
        self.offsets = _map(folder / "offsets.bin", np.dtype(np.uint16), (n, 2))
        self.table = np.load(folder / "blocks.npy", mmap_mode="r")

    def __len__(self) -> int:
        return len(self.table)

    @overload
    def __getitem__(self, i: int) -> Block: ...
    @overload
    def __getitem__(self, i: slice) -> list[Block]: ...

    def __getitem__(self, i: int | slice) -> Block | list[Block]:
        if isinstance(i, slice):
            return [self[j] for j in range(*i.indices(len(self)))]
        row, t0, t1, c0, c1 = (int(x) for x in self.table[i])
        text = self.docs[row]["text"][c0:c1]
        return Block(self.ids[t0:t1].astype(np.int64), self.offsets[t0:t1].astype(np.int64), text)


@dataclass(frozen=True)
class Prepared:
    folder: Path
    meta: dict[str, Any]

    def blocks(self, split: str) -> PreparedBlocks:
        return PreparedBlocks(self.folder / split, self.meta["splits"][split])

    def facts(self) -> dict[str, Any]:
        """What the start-up log says about the data: where, how much, what was skipped."""
        train = self.meta["splits"]["train"]
        size = sum(s for m in self.meta["splits"].values() for s in m["files"].values())
        return {"cache": str(self.folder), "cache_bytes": size, "documents": train["documents"],
                "empty_documents_skipped": sum(m["empty_skipped"] for m in self.meta["splits"].values()),
                "train_tokens": train["block_tokens"],
                "validation_documents": self.meta["splits"]["validation"]["documents"]}


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def problem(folder: Path) -> str | None:
    """Why ``folder`` is not a complete cache of this format (None: it is)."""
    if not folder.exists():
        return "missing"
    try:
        meta = json.loads((folder / "meta.json").read_text())
    except (OSError, ValueError):
        return "without a readable meta.json (half-written?)"
    if meta.get("format") != FORMAT_VERSION or meta.get("key") != folder.name:
        return f"of another format or key ({meta.get('format')}, {meta.get('key')})"
    for split, m in meta.get("splits", {}).items():
        for name, size in m["files"].items():
            path = folder / split / name
            if not path.is_file() or path.stat().st_size != size:
                return f"corrupt: {split}/{name} is missing or has the wrong size"
        if _sha256(folder / split / "blocks.npy") != m["blocks_sha256"]:
            return f"corrupt: {split}/blocks.npy does not match its hash"
    return None


# --- building ---------------------------------------------------------------------------------------------------

def _drop_empty(ds, num_proc: int) -> tuple[Any, int]:
    kept = ds.filter(lambda texts: [is_document(t) for t in texts], input_columns="text", batched=True,
                     keep_in_memory=True, num_proc=num_proc if num_proc > 1 else None)
    return kept, len(ds) - len(kept)


def _pieces(texts: list[str], indices: list[int], max_chars: int) -> dict[str, list[Any]]:
    out: dict[str, list[Any]] = {"text": [], "doc": []}
    for text, index in zip(texts, indices, strict=True):
        pieces = text_pieces(text, max_chars)
        out["text"] += pieces
        out["doc"] += [index] * len(pieces)
    return out


def _write_documents(ds, path: Path, max_chars: int) -> None:
    """The split's documents, long ones cut into pieces, as one Arrow file (row order = document order)."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"text": datasets.Value("large_string"), "doc": datasets.Value("int64")})
    if len(ds) == 0:  # map writes nothing for an empty table: an empty file with the schema
        from datasets.arrow_writer import ArrowWriter

        with ArrowWriter(features=features, path=str(path)) as writer:
            writer.finalize()
        return
    ds.map(_pieces, input_columns="text", with_indices=True, batched=True, remove_columns=ds.column_names,
           fn_kwargs={"max_chars": max_chars}, features=features, cache_file_name=str(path),
           load_from_cache_file=False, writer_batch_size=1000, desc=f"documents -> {path.parent.name}")


def _documents(d: DataConfig, out: Path, revision: str | None) -> dict[str, dict[str, int]]:
    """Reads, drops empty documents, splits off the held-out ones; writes each split's documents table."""
    tmp = out / "tmp"
    train, skipped = _drop_empty(load_split(d, "train", streaming=False, cache_dir=tmp, revision=revision),
                                 d.num_proc)
    val = load_split(d, "validation", streaming=False, cache_dir=tmp, revision=revision)
    if val is None:
        keep, held = split_order(len(train), d.validation_fraction, d.shuffle_seed)
        train, val, val_skipped = train.select(keep, keep_in_memory=True), train.select(held, keep_in_memory=True), 0
    else:
        val, val_skipped = _drop_empty(val, d.num_proc)
    counts = {}
    for name, ds, empty in (("train", train, skipped), ("validation", val, val_skipped)):
        _write_documents(ds, out / name / "documents.arrow", d.max_piece_chars)
        counts[name] = {"documents": len(ds), "empty_skipped": empty}
    return counts


@dataclass
class _Part:
    rows: int
    tokens: int          # all tokens of the rows, kept or not
    ids: np.ndarray      # kept token ids
    offsets: np.ndarray  # (n, 2) uint16, relative to each block's first character
    table: np.ndarray    # (k, 5) int64, token positions relative to this part


_WORKER: tuple[Any, ...] = ()


def _init_worker(docs_path: str, tokenizer, seq_len: int, min_tokens: int, ids_dtype: str, threads: bool) -> None:
    global _WORKER
    import datasets

    if not threads:  # several worker processes: one core each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (datasets.Dataset.from_file(docs_path), tokenizer, seq_len, min_tokens, np.dtype(ids_dtype))


def _tokenize_rows(task: tuple[int, int]) -> _Part:
    """Tokenizes documents ``[a, b)`` and cuts them into blocks (in a worker process, or in this one)."""
    docs, tokenizer, seq_len, min_tokens, ids_dtype = _WORKER
    a, b = task
    texts = docs[a:b]["text"]
    ids, offs, table, kept, tokens = [], [], [], 0, 0
    encoded = (pair for batch in char_batches(texts) for pair in encode(tokenizer, batch))
    for row, (text_ids, text_offs) in enumerate(encoded, start=a):
        tokens += len(text_ids)
        for s, e, c0, c1 in cut_blocks(text_offs, seq_len, min_tokens).tolist():
            ids.append(text_ids[s:e])
            offs.append(text_offs[s:e] - c0)
            table.append((row, kept, kept + e - s, c0, c1))
            kept += e - s
    if not table:
        return _Part(b - a, tokens, np.zeros(0, ids_dtype), np.zeros((0, 2), np.uint16), np.zeros((0, 5), np.int64))
    rel = np.concatenate(offs)
    assert rel.min() >= 0 and rel.max() <= np.iinfo(np.uint16).max, "cut_blocks bounds a block's characters"
    return _Part(b - a, tokens, np.concatenate(ids).astype(ids_dtype), rel.astype(np.uint16),
                 np.asarray(table, np.int64))


def _parts(tasks: list[tuple[int, int]], init_args: tuple[Any, ...], num_proc: int) -> Iterator[_Part]:
    """Tokenized parts in task order, from ``num_proc`` spawned workers or from this process."""
    if num_proc <= 1 or len(tasks) <= 1:
        _init_worker(*init_args, threads=True)
        try:
            yield from map(_tokenize_rows, tasks)
        finally:
            globals()["_WORKER"] = ()
        return
    ctx = multiprocessing.get_context("spawn")  # no fork: the trainer has threads (gloo, tokenizers) by now
    with ctx.Pool(num_proc, initializer=_init_worker, initargs=(*init_args, False)) as pool:
        yield from pool.imap(_tokenize_rows, tasks)


def _tokenize_split(folder: Path, tokenizer, d: DataConfig, progress: bool) -> dict[str, Any]:
    """Writes ids.bin, offsets.bin and blocks.npy of one split from its documents table."""
    import datasets
    from tqdm import tqdm

    docs_path = folder / "documents.arrow"
    n_rows = len(datasets.Dataset.from_file(str(docs_path)))
    ids_dtype = "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    tasks = [(a, min(a + ROWS_PER_TASK, n_rows)) for a in range(0, n_rows, ROWS_PER_TASK)]
    init_args = (str(docs_path), tokenizer, d.seq_len, d.min_block_tokens, ids_dtype)
    tables, kept, tokens, t0 = [np.zeros((0, 5), np.int64)], 0, 0, time.perf_counter()
    bar = tqdm(total=n_rows, unit="doc", desc=f"tokenizing {folder.name}", disable=not progress, dynamic_ncols=True)
    with open(folder / "ids.bin", "wb") as f_ids, open(folder / "offsets.bin", "wb") as f_offs, bar:
        for part in _parts(tasks, init_args, d.num_proc):
            part.table[:, 1:3] += kept
            f_ids.write(part.ids.tobytes())
            f_offs.write(part.offsets.tobytes())
            tables.append(part.table)
            kept, tokens = kept + len(part.ids), tokens + part.tokens
            bar.update(part.rows)
            bar.set_postfix(tokens=f"{tokens:,}", tokens_per_s=f"{tokens / (time.perf_counter() - t0):,.0f}")
        for f in (f_ids, f_offs):
            f.flush()
            os.fsync(f.fileno())
    np.save(folder / "blocks.npy", np.concatenate(tables))
    files = {n: (folder / n).stat().st_size for n in ("documents.arrow", "ids.bin", "offsets.bin", "blocks.npy")}
    return {"rows": n_rows, "tokens": tokens, "block_tokens": kept, "blocks": sum(len(t) for t in tables),
            "ids_dtype": ids_dtype, "files": files, "blocks_sha256": _sha256(folder / "blocks.npy"),
            "seconds": round(time.perf_counter() - t0, 3)}


@contextmanager
def _datasets_bars(show: bool) -> Iterator[None]:
    """``datasets``' own progress bars (reading, filtering) only when we show ours."""
    import datasets as bars

    was = bars.are_progress_bars_disabled()
    (bars.enable_progress_bars if show else bars.disable_progress_bars)()
    try:
        yield
    finally:
        (bars.disable_progress_bars if was else bars.enable_progress_bars)()


def _build(d: DataConfig, tokenizer, folder: Path, meta: dict[str, Any], progress: bool, say: Say) -> None:
    """Builds the cache into a ``.partial`` folder and renames it into place (the completion marker)."""
    for stale in folder.parent.glob(f"{folder.name}.partial-*"):  # left by a killed build (we hold the lock)
        shutil.rmtree(stale, ignore_errors=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        say(f"preparing the corpus into {folder}")
        t0 = time.perf_counter()
        with _datasets_bars(progress):
            counts = _documents(d, partial, meta["inputs"].get("revision"))
        shutil.rmtree(partial / "tmp", ignore_errors=True)
        meta["splits"] = {s: {**counts[s], **_tokenize_split(partial / s, tokenizer, d, progress)} for s in SPLITS}
        meta["seconds"] = round(time.perf_counter() - t0, 3)
        (partial / "meta.json").write_text(json.dumps(meta, indent=1))
        os.rename(partial, folder)
        size = sum(n for m in meta["splits"].values() for n in m["files"].values())
        train = meta["splits"]["train"]
        say(f"prepared {folder} in {meta['seconds']:.1f} s: {train['documents']:,} documents "
            f"({train['empty_skipped']:,} empty skipped), {train['block_tokens']:,} tokens in {train['blocks']:,} "
            f"blocks, {size / 1e6:,.1f} MB on disk")
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise


def prepare(d: DataConfig, tokenizer, *, progress: bool = True, say: Say = say_stderr) -> Prepared:
    """The prepared cache for ``d`` and ``tokenizer``: opened if complete, else built once under a file lock
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
            say(f"waiting for another process to finish preparing {folder}")
            lock.acquire()
        try:
            if (reason := problem(folder)) is not None:
                if reason != "missing":
                    say(f"the data cache {folder} is {reason}; rebuilding it")
                    shutil.rmtree(folder)
                meta = {"format": FORMAT_VERSION, "key": folder.name, "inputs": inputs, "tokenizer": fingerprint,
                        "seq_len": d.seq_len, "min_block_tokens": d.min_block_tokens,
                        "max_piece_chars": d.max_piece_chars, "created": time.strftime("%Y-%m-%dT%H:%M:%S")}
                _build(d, tokenizer, folder, meta, progress, say)
        finally:
            lock.release()
    return Prepared(folder, json.loads((folder / "meta.json").read_text()))
