"""Where a corpus comes from, as a ``datasets`` table (or stream) with one column ``text``.

Three kinds of ``data`` settings, one code path each way (prepared or ``streaming``):

- local files: ``train_files`` / ``validation_files`` (.txt = one document per file; .jsonl/.json/.parquet =
  one per row), read by the ``datasets`` builder their extension names;
- a dataset by name: ``dataset: JeanKaddour/minipile`` (a hub id) or ``dataset: /data/my_corpus`` (a local
  folder of data files) — both go through the same ``datasets.load_dataset(name, config, split=...,
  revision=...)`` call;
- a ``save_to_disk`` folder: ``dataset: /data/saved`` (recognised by its ``dataset_dict.json`` /
  ``state.json``), read with ``datasets.load_from_disk``.

It also says, cheaply and before anything starts, whether the inputs are there (``check_dataset``) and what
identifies them for the prepared cache's key (``identity``: paths with sizes and mtimes, or the dataset's
resolved revision).
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any, Literal

from student_trainer.trainer.config import DATA_FILE_KINDS, ConfigError, DataConfig

HUB_TIMEOUT_S = 10.0  # deadline of the one hub call that resolves a dataset's revision
Split = Literal["train", "validation"]
Kind = Literal["disk", "local", "hub"]


def is_document(text: Any) -> bool:
    """A row counts as a document when its text is a string with something besides whitespace."""
    return isinstance(text, str) and bool(text.strip())


def builder_of(name: str) -> str:
    """The ``datasets`` builder that reads a data file, by its extension."""
    suffix = Path(name).suffix.lower()
    if suffix not in DATA_FILE_KINDS:
        raise ConfigError(f"data file {name}: unknown extension {suffix!r}; accepted: {sorted(DATA_FILE_KINDS)}")
    return DATA_FILE_KINDS[suffix]


def _text_column(ds, field: str, what: str):
    """``ds`` with only the text column, named ``text``."""
    if field not in ds.column_names:
        raise ConfigError(f"{what}: no field {field!r}; fields: {ds.column_names} (set data.text_field)")
    ds = ds.select_columns([field])
    return ds if field == "text" else ds.rename_column(field, "text")


def load_files(files: Sequence[str], text_field: str, *, cache_dir: Path | None = None, streaming: bool = False):
    """One table (or stream) of all documents in ``files``, grouped by builder in order of first appearance.

    ``cache_dir``: where ``datasets`` writes its Arrow conversion (the prepared cache passes a temporary folder
    inside itself, so a corpus does not stay twice on disk).
    """
    import datasets

    by_builder: dict[str, list[str]] = {}
    for name in files:
        builder = builder_of(name)
        if not Path(name).is_file():
            raise ConfigError(f"data file {name} does not exist")
        by_builder.setdefault(builder, []).append(str(Path(name).resolve()))
    parts = []
    for builder, paths in by_builder.items():
        kwargs = {"sample_by": "document"} if builder == "text" else {}
        ds = datasets.load_dataset(builder, data_files=paths, split="train", streaming=streaming,
                                   cache_dir=None if cache_dir is None else str(cache_dir), **kwargs)
        parts.append(_text_column(ds, "text" if builder == "text" else text_field, f"data files {paths}"))
    if len({str(p.features) for p in parts}) > 1:  # e.g. string from JSON, large_string from parquet
        parts = [p.cast_column("text", datasets.Value("large_string")) for p in parts]
    return parts[0] if len(parts) == 1 else datasets.concatenate_datasets(parts)


def read_documents(files: Sequence[str], text_field: str) -> list[str]:
    """Texts of all documents in ``files`` (kinds by extension), empty ones dropped, in file order."""
    return [t for t in load_files(files, text_field)["text"] if is_document(t)]


def dataset_kind(name: str) -> Kind:
    """``disk`` (a save_to_disk folder), ``local`` (a folder ``load_dataset`` reads) or ``hub`` (an id)."""
    path = Path(name).expanduser()
    if (path / "dataset_dict.json").is_file() or (path / "state.json").is_file():
        return "disk"
    if path.exists():
        return "local"
    if name.startswith(("/", ".", "~")) or name.count("/") > 1:
        raise ConfigError(f"data.dataset: folder {name!r} does not exist")
    return "hub"


def hub_revision(name: str, revision: str | None) -> str:
    """The commit a hub dataset's ``revision`` points to now (one call with a deadline); offline
    (``HF_HUB_OFFLINE=1``) the revision as given: pin a commit then, or the key cannot see updates."""
    if os.environ.get("HF_HUB_OFFLINE", "").lower() in ("1", "true", "yes", "on"):
        return revision or "main"
    from huggingface_hub import HfApi

    try:
        return str(HfApi().dataset_info(name, revision=revision, timeout=HUB_TIMEOUT_S).sha)
    except Exception as err:  # noqa: BLE001 - any failure means the same thing to the user
        raise ConfigError(f"data.dataset: cannot find {name!r} (revision {revision or 'main'}) on the hub: "
                         f"{type(err).__name__}: {str(err)[:300]} — check the id and the network, or set "
                         "HF_HUB_OFFLINE=1 to use the copy already in the Hugging Face cache") from None


def _disk_splits(path: Path) -> list[str] | None:
    """Splits of a save_to_disk DatasetDict folder; None for a single saved Dataset."""
    import json

    meta = path / "dataset_dict.json"
    return json.loads(meta.read_text())["splits"] if meta.is_file() else None


def check_dataset(d: DataConfig) -> None:
    """``data.dataset`` is there and readable (local), or found on the hub — in seconds, before any start."""
    assert d.dataset is not None
    kind = dataset_kind(d.dataset)
    path = Path(d.dataset).expanduser()
    if kind == "hub":
        hub_revision(d.dataset, d.dataset_revision)
        return
    if not os.access(path, os.R_OK | os.X_OK):
        raise ConfigError(f"data.dataset: folder {d.dataset!r} is not readable")
    if kind == "disk":
        splits = _disk_splits(path)
        for field, split in (("train_split", d.train_split), ("validation_split", d.validation_split)):
            if split is not None and splits is not None and split not in splits:
                raise ConfigError(f"data.{field}: {d.dataset!r} has no split {split!r}; splits: {splits}")
            if split is not None and splits is None and field == "validation_split":
                raise ConfigError(f"data.validation_split: {d.dataset!r} is a single saved Dataset without splits")
    elif not any(p.is_file() for p in path.rglob("*")):
        raise ConfigError(f"data.dataset: folder {d.dataset!r} holds no files")


def check_data(d: DataConfig) -> None:
    """Every data file exists and is readable here, or the dataset is there — what the CLI checks before a
    run or ``prepare`` starts (the config model itself does no I/O)."""
    for field in ("train_files", "validation_files"):
        for path in getattr(d, field):
            if not Path(path).is_file() or not os.access(path, os.R_OK):
                raise ConfigError(f"data.{field}: data file {path!r} does not exist or is not readable")
    if d.dataset is not None:
        check_dataset(d)


def _files_identity(paths: Sequence[Path]) -> list[list[Any]]:
    """(path, size, mtime in ns) of each file: what decides whether a prepared cache is still valid."""
    out = []
    for p in paths:
        st = p.stat()
        out.append([str(p.resolve()), st.st_size, st.st_mtime_ns])
    return out


def identity(d: DataConfig) -> dict[str, Any]:
    """What names the inputs in the prepared cache's key (cheap: no file is read, at most one hub call)."""
    if d.dataset is None:
        return {"train_files": _files_identity([Path(f) for f in d.train_files]),
                "validation_files": _files_identity([Path(f) for f in d.validation_files])}
    kind = dataset_kind(d.dataset)
    out: dict[str, Any] = {"dataset": d.dataset, "kind": kind, "config": d.dataset_config,
                           "train_split": d.train_split, "validation_split": d.validation_split}
    if kind == "hub":
        out["revision"] = hub_revision(d.dataset, d.dataset_revision)
    else:
        root = Path(d.dataset).expanduser()
        out["files"] = _files_identity(sorted(p for p in root.rglob("*") if p.is_file()))
    return out


def load_named(d: DataConfig, split: str, *, streaming: bool, cache_dir: Path | None, revision: str | None):
    """One split of ``data.dataset`` (hub id, local dataset folder or save_to_disk folder), column ``text``;
    a hub id at ``revision`` (the commit the cache key names) or else ``data.dataset_revision``."""
    import datasets

    assert d.dataset is not None
    kind = dataset_kind(d.dataset)
    what = f"data.dataset {d.dataset!r} split {split!r}"
    try:
        if kind == "disk":
            saved = datasets.load_from_disk(str(Path(d.dataset).expanduser()))
            ds = saved[split] if isinstance(saved, datasets.DatasetDict) else saved
            if streaming:
                ds = ds.to_iterable_dataset(num_shards=min(64, max(1, len(ds))))
        else:
            ds = datasets.load_dataset(d.dataset, d.dataset_config, split=split, streaming=streaming,
                                       revision=(revision or d.dataset_revision) if kind == "hub" else None,
                                       cache_dir=None if kind == "hub" or cache_dir is None else str(cache_dir))
    except (KeyError, ValueError, OSError, ConnectionError) as err:
        raise ConfigError(f"{what}: cannot load it: {type(err).__name__}: {str(err)[:500]}") from None
    return _text_column(ds, d.text_field, what)


def load_split(d: DataConfig, which: Split, *, streaming: bool, cache_dir: Path | None = None,
               revision: str | None = None):
    """The train or validation documents the config names (None: no validation source; then a fraction of
    the train documents is held out)."""
    if d.dataset is None:
        files = d.train_files if which == "train" else d.validation_files
        return load_files(files, d.text_field, cache_dir=cache_dir, streaming=streaming) if files else None
    split = d.train_split if which == "train" else d.validation_split
    if split is None:
        return None
    return load_named(d, split, streaming=streaming, cache_dir=cache_dir, revision=revision)
