"""Where livefuse keeps what it builds once per machine (vocabulary maps, prepared corpora, the demo's assets).

One root for every layer of the trainer side: ``$LIVEFUSE_CACHE``, else ``~/.cache/livefuse``. Each user of it
takes a sub-folder of its own (``vocab-maps/``, ``data/``, ``tokenizers/``, ...).
"""

from __future__ import annotations

import os
from pathlib import Path


def cache_root() -> Path:
    """livefuse's cache folder on this machine: ``$LIVEFUSE_CACHE``, else ``~/.cache/livefuse``."""
    return Path(os.environ.get("LIVEFUSE_CACHE", Path.home() / ".cache" / "livefuse"))
