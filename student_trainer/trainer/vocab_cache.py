"""On-disk cache of MinED vocabulary maps, keyed by the two tokenizer fingerprints.

The only I/O around :mod:`student_trainer.core.vocab`: a map is built once per (source, target) pair and
stored as ``.npy``; a change of either fingerprint or of :data:`ALGORITHM_VERSION` gives a new key.
"""

from __future__ import annotations

import hashlib
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from student_trainer.core.vocab import build_vocab_map
from student_trainer.paths import cache_root

ALGORITHM_VERSION = 2  # bump when build_vocab_map's output changes (2: whitespace runs go to the ids the target emits)


def default_vocab_dir() -> Path:
    """Where vocabulary maps go unless ``run.vocab_cache_dir`` says otherwise."""
    return cache_root() / "vocab-maps"


def cache_key(source_fingerprint: str, target_fingerprint: str) -> str:
    """File-name-safe key of a (source, target) pair at the current algorithm version."""
    digest = hashlib.sha256(f"{source_fingerprint}\0{target_fingerprint}".encode()).hexdigest()[:32]
    return f"vocabmap-v{ALGORITHM_VERSION}-{digest}"


def _save_atomic(path: Path, array: np.ndarray) -> None:
    """Writes beside the final path and renames, so a reader never sees a half-written file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=".npy")
    try:
        with os.fdopen(fd, "wb") as f:
            np.save(f, array)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def cached_vocab_map(source: Sequence[str], target: Sequence[str], source_fingerprint: str,
                     target_fingerprint: str, cache_dir: Path) -> np.ndarray:
    """The MinED map ``(len(source),) int64`` from ``cache_dir``, built and stored on a miss.

    A stored map whose length or target range does not fit the vocabularies is rebuilt.
    """
    path = Path(cache_dir) / f"{cache_key(source_fingerprint, target_fingerprint)}.npy"
    if path.exists():
        try:
            stored = np.load(path)
        except (OSError, ValueError):
            stored = None
        if stored is not None and stored.shape == (len(source),) and int(stored.max(initial=-1)) < len(target):
            return stored.astype(np.int64, copy=False)
    built = build_vocab_map(source, target)
    _save_atomic(path, built)
    return built
