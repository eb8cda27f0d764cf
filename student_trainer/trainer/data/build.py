"""Building a prepared corpus (``prepared``): documents read by ``datasets``, empty ones dropped and counted,
long ones cut into pieces, the held-out ones split off; then every piece tokenized (in ``num_proc`` worker
processes) and cut into blocks, written as flat files in document order — the same bytes whatever
``num_proc`` is. Everything goes into a ``.partial`` folder that ``prepared`` renames into place.

The cache's ``meta.json`` is a typed record (:class:`CorpusMeta`, versioned by ``format``), written here and
read back by ``prepared`` through the same model: a file of another format or another program is refused
with a message naming it, never read by guessed keys.
"""

from __future__ import annotations

import hashlib
import json
import logging
import multiprocessing
import os
import shutil
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import numpy as np
from pydantic import BaseModel, ConfigDict, ValidationError

from student_trainer.trainer.config import ConfigError, DataConfig
from student_trainer.trainer.data.blocks import (
    char_batches,
    cut_blocks,
    split_order,
    text_pieces,
    tokenize_texts,
)
from student_trainer.trainer.data.documents import Split, is_document, load_split

log = logging.getLogger("livefuse.trainer.data")
FORMAT_VERSION = 2  # of the files and of meta.json; part of the cache key
ROWS_PER_TASK = 256  # pieces per tokenizing task (a worker's unit of work)
SPLITS = ("train", "validation")
FILES = ("text.bin", "ids.bin", "offsets.bin", "blocks.bin")  # of each split


class _Record(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SplitMeta(_Record):
    """One split of a prepared corpus: counts, the token dtype, every file's size, the block table's hash."""

    documents: int
    empty_skipped: int
    rows: int              # pieces (long documents are cut at line breaks)
    tokens: int            # all tokens of the pieces
    block_tokens: int      # the tokens kept in blocks
    blocks: int
    ids_dtype: Literal["uint16", "uint32"]
    files: dict[str, int]  # file name -> bytes
    blocks_sha256: str
    seconds: float


class CorpusMeta(_Record):
    """``meta.json`` of a prepared corpus: what it was built from (the key's inputs) and each split."""

    format: int
    key: str                # the folder's name: <label>-<hash of the settings>
    inputs: dict[str, Any]  # data.documents.identity(): files with sizes and mtimes, or a dataset's revision
    tokenizer: str          # the target tokenizer's fingerprint
    seq_len: int
    min_block_tokens: int
    max_piece_chars: int
    created: str
    seconds: float
    splits: dict[Split, SplitMeta]

    @classmethod
    def read(cls, folder: Path) -> CorpusMeta:
        """The record in ``folder/meta.json``; ValueError naming the file and what to do when it is of another
        format or not a livefuse data cache's (OSError / JSON errors pass through: a half-written file)."""
        path = folder / "meta.json"
        text = path.read_text()
        fix = (f"delete {folder} (the next run or `livefuse-train prepare` rebuilds it) or set data.cache_dir "
               "to another folder")
        found = _format_of(text)
        if found != FORMAT_VERSION:
            raise ConfigError(f"{path}: a data cache of format {found!r}; this livefuse reads format "
                             f"{FORMAT_VERSION}: {fix}")
        try:
            return cls.model_validate_json(text)
        except ValidationError as err:
            raise ConfigError(f"{path}: not the metadata of a livefuse data cache ({err.error_count()} "
                             f"problem(s), first: {err.errors()[0]['loc']}: {err.errors()[0]['msg']}): {fix}") from None

    def write(self, folder: Path) -> None:
        (folder / "meta.json").write_text(self.model_dump_json(indent=1))


def _format_of(text: str) -> Any:
    """The ``format`` field of a meta.json text (None if absent); raises ValueError on invalid JSON."""
    data = json.loads(text)
    return data.get("format") if isinstance(data, dict) else None


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


# --- documents --------------------------------------------------------------------------------------------------

def _drop_empty(ds, num_proc: int) -> tuple[Any, int]:
    kept = ds.filter(lambda texts: [is_document(t) for t in texts], input_columns="text", batched=True,
                     keep_in_memory=True, num_proc=num_proc if num_proc > 1 else None)
    return kept, len(ds) - len(kept)


def _pieces(texts: list[str], max_chars: int) -> dict[str, list[str]]:
    return {"text": [p for text in texts for p in text_pieces(text, max_chars)]}


def _write_pieces(ds, path: Path, max_chars: int) -> None:
    """The split's documents, long ones cut into pieces, as one Arrow file (row order = document order)."""
    import datasets

    path.parent.mkdir(parents=True, exist_ok=True)
    features = datasets.Features({"text": datasets.Value("large_string")})
    if len(ds) == 0:  # map writes nothing for an empty table: an empty file with the schema
        from datasets.arrow_writer import ArrowWriter

        with ArrowWriter(features=features, path=str(path)) as writer:
            writer.finalize()
        return
    ds.map(_pieces, input_columns="text", batched=True, remove_columns=ds.column_names,
           fn_kwargs={"max_chars": max_chars}, features=features, cache_file_name=str(path),
           load_from_cache_file=False, writer_batch_size=1000, desc=f"documents -> {path.parent.name}")


def _documents(d: DataConfig, out: Path, revision: str | None) -> dict[str, dict[str, int]]:
    """Reads, drops empty documents, splits off the held-out ones; writes each split's pieces to tmp/."""
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
        _write_pieces(ds, tmp / f"{name}.arrow", d.max_piece_chars)
        counts[name] = {"documents": len(ds), "empty_skipped": empty}
    return counts


# --- tokens -----------------------------------------------------------------------------------------------------

@dataclass
class _Part:
    rows: int
    tokens: int          # all tokens of the rows, kept or not
    text: bytes          # the rows' UTF-8, in order
    ids: np.ndarray      # kept token ids
    offsets: np.ndarray  # (n, 2) uint16, relative to each block's first character
    table: np.ndarray    # (k, 5) int64: row, token start/end and byte start/end relative to this part


_WORKER: tuple[Any, ...] = ()


def _init_worker(pieces_path: str, tokenizer, seq_len: int, min_tokens: int, ids_dtype: str, threads: bool) -> None:
    global _WORKER
    import datasets

    if not threads:  # several worker processes: one core each
        os.environ["TOKENIZERS_PARALLELISM"] = "false"
    _WORKER = (datasets.Dataset.from_file(pieces_path), tokenizer, seq_len, min_tokens, np.dtype(ids_dtype))


def _utf8(text: str) -> tuple[bytes, np.ndarray | None]:
    """The text's UTF-8 and, unless it is ASCII, the byte position of every character (and of the end)."""
    raw = text.encode("utf-8", "surrogatepass")
    if len(raw) == len(text):
        return raw, None
    starts = np.flatnonzero((np.frombuffer(raw, np.uint8) & 0xC0) != 0x80)  # bytes that start a character
    return raw, np.append(starts, len(raw))


def _tokenize_rows(task: tuple[int, int]) -> _Part:
    """Tokenizes pieces ``[a, b)`` and cuts them into blocks (in a worker process, or in this one)."""
    docs, tokenizer, seq_len, min_tokens, ids_dtype = _WORKER
    a, b = task
    texts = docs[a:b]["text"]
    raw, ids, offs, table, kept, tokens, at = [], [], [], [], 0, 0, 0
    encoded = (pair for batch in char_batches(texts) for pair in tokenize_texts(tokenizer, batch))
    for row, (text, (text_ids, text_offs)) in enumerate(zip(texts, encoded, strict=True), start=a):
        data, byte_at = _utf8(text)
        tokens += len(text_ids)
        for s, e, c0, c1 in cut_blocks(text_offs, seq_len, min_tokens).tolist():
            b0, b1 = (c0, c1) if byte_at is None else (int(byte_at[c0]), int(byte_at[c1]))
            ids.append(text_ids[s:e])
            offs.append(text_offs[s:e] - c0)
            table.append((row, kept, kept + e - s, at + b0, at + b1))
            kept += e - s
        raw.append(data)
        at += len(data)
    if not table:
        return _Part(b - a, tokens, b"".join(raw), np.zeros(0, ids_dtype), np.zeros((0, 2), np.uint16),
                     np.zeros((0, 5), np.int64))
    rel = np.concatenate(offs)
    assert rel.min() >= 0 and rel.max() <= np.iinfo(np.uint16).max, "cut_blocks bounds a block's characters"
    return _Part(b - a, tokens, b"".join(raw), np.concatenate(ids).astype(ids_dtype), rel.astype(np.uint16),
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


def _tokenize_split(pieces: Path, folder: Path, tokenizer, d: DataConfig, progress: bool) -> dict[str, Any]:
    """Writes text.bin, ids.bin, offsets.bin and blocks.bin of one split from its pieces."""
    import datasets
    from tqdm import tqdm

    folder.mkdir(parents=True)
    n_rows = len(datasets.Dataset.from_file(str(pieces)))
    ids_dtype = "uint16" if len(tokenizer) <= 1 << 16 else "uint32"
    tasks = [(a, min(a + ROWS_PER_TASK, n_rows)) for a in range(0, n_rows, ROWS_PER_TASK)]
    init_args = (str(pieces), tokenizer, d.seq_len, d.min_block_tokens, ids_dtype)
    written = {"text": 0, "kept": 0, "tokens": 0, "blocks": 0}
    t0 = time.perf_counter()
    files = {name: open(folder / name, "wb") for name in FILES}  # noqa: SIM115 - closed below
    bar = tqdm(total=n_rows, unit="doc", desc=f"tokenizing {folder.name}", disable=not progress, dynamic_ncols=True)
    try:
        for part in _parts(tasks, init_args, d.num_proc):
            part.table[:, 1:3] += written["kept"]
            part.table[:, 3:5] += written["text"]
            for name, data in zip(FILES, (part.text, part.ids, part.offsets, part.table), strict=True):
                files[name].write(data if isinstance(data, bytes) else data.tobytes())
            written["text"] += len(part.text)
            written["kept"] += len(part.ids)
            written["tokens"] += part.tokens
            written["blocks"] += len(part.table)
            bar.update(part.rows)
            bar.set_postfix(tokens=f"{written['tokens']:,}",
                            tokens_per_s=f"{written['tokens'] / (time.perf_counter() - t0):,.0f}")
        for f in files.values():
            f.flush()
            os.fsync(f.fileno())
    finally:
        bar.close()
        for f in files.values():
            f.close()
    return {"rows": n_rows, "tokens": written["tokens"], "block_tokens": written["kept"], "blocks": written["blocks"],
            "ids_dtype": ids_dtype, "files": {n: (folder / n).stat().st_size for n in FILES},
            "blocks_sha256": file_sha256(folder / "blocks.bin"), "seconds": round(time.perf_counter() - t0, 3)}


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


def build(d: DataConfig, tokenizer, folder: Path, header: dict[str, Any], progress: bool) -> CorpusMeta:
    """Builds the cache into a ``.partial`` folder and renames it into place (the completion marker);
    ``header``: the :class:`CorpusMeta` fields known before building (format, key, inputs, settings)."""
    for stale in folder.parent.glob(f"{folder.name}.partial-*"):  # left by a killed build (the caller holds the lock)
        shutil.rmtree(stale, ignore_errors=True)
    partial = folder.with_name(f"{folder.name}.partial-{os.getpid()}")
    partial.mkdir(parents=True)
    try:
        log.info(f"preparing the corpus into {folder}")
        t0 = time.perf_counter()
        with _datasets_bars(progress):
            counts = _documents(d, partial, header["inputs"].get("revision"))
        splits = {s: SplitMeta(**counts[s], **_tokenize_split(partial / "tmp" / f"{s}.arrow", partial / s, tokenizer,
                                                              d, progress)) for s in SPLITS}
        shutil.rmtree(partial / "tmp")
        meta = CorpusMeta(**header, splits=splits, seconds=round(time.perf_counter() - t0, 3))
        meta.write(partial)
        os.rename(partial, folder)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    size = sum(n for m in meta.splits.values() for n in m.files.values())
    train = meta.splits["train"]
    log.info(f"prepared {folder} in {meta.seconds:.1f} s: {train.documents:,} documents ({train.empty_skipped:,} "
             f"empty skipped), {train.block_tokens:,} tokens in {train.blocks:,} blocks, {size / 1e6:,.1f} MB on disk")
    return meta
