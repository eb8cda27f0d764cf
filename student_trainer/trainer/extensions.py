"""DeepSpeed's JIT-built ops and the lock a killed build leaves behind.

DeepSpeed builds small C++ ops on first use (on CPU: ``deepspeed_shm_comm``) under ``TORCH_EXTENSIONS_DIR``.
torch guards each build folder with a ``lock`` file and every later process waits for it to go away,
silently and forever. A process killed mid-build leaves the lock, so every later run would hang at start.
``clear_stale_locks`` runs before DeepSpeed starts: a lock with no live builder is removed, with a warning.

A builder is alive while a process works inside the build folder (torch runs ninja and the compiler
there); a lock younger than ``min_age_s`` is left alone too (the moment between taking the lock and
starting ninja). ``./scripts/setup.sh`` builds the op once into the virtual environment, and the
project's commands point ``TORCH_EXTENSIONS_DIR`` there (``default_extensions_dir``) and build with the
environment's ninja (``prefer_venv_ninja``).
"""

from __future__ import annotations

import logging
import os
import sys
import time
from pathlib import Path

log = logging.getLogger("livefuse.trainer.extensions")
MIN_LOCK_AGE_S = 30.0


def default_extensions_dir() -> Path | None:
    """``<venv>/torch_extensions`` when running inside a virtual environment, else None (torch's default)."""
    return Path(sys.prefix) / "torch_extensions" if sys.prefix != sys.base_prefix else None


def prefer_venv_ninja(env: dict[str, str] | os._Environ = os.environ) -> bool:
    """Puts the virtual environment's ``bin`` first on ``PATH`` when it holds ``ninja``; True if it changed.

    torch builds with whichever ninja ``PATH`` finds. A system ninja 1.11 and the ``ninja`` wheel (1.13) hash
    their build commands differently, so each one's ``.ninja_log`` says the other's build is stale: runs that
    alternated between them rebuilt DeepSpeed's op every time (60–100 s on 2 cores, seen in the test suite).
    ``scripts/setup.sh``, ``test.sh``, ``demo.sh`` and the trainer all build with the environment's ninja.
    """
    if sys.prefix == sys.base_prefix:
        return False
    bin_dir = str(Path(sys.prefix) / "bin")
    if not (Path(bin_dir) / "ninja").exists():
        return False
    parts = [p for p in env.get("PATH", "").split(os.pathsep) if p]
    if parts[:1] == [bin_dir]:
        return False
    env["PATH"] = os.pathsep.join([bin_dir, *(p for p in parts if p != bin_dir)])
    return True


def extensions_root() -> Path:
    """Where torch builds JIT extensions: ``$TORCH_EXTENSIONS_DIR``, else torch's per-user default."""
    env = os.environ.get("TORCH_EXTENSIONS_DIR")
    if env:
        return Path(env)
    from torch.utils.cpp_extension import get_default_build_root

    return Path(get_default_build_root())


def _inside(path: Path, folder: Path) -> bool:
    return path == folder or folder in path.parents


def builder_alive(build_dir: Path, proc: Path = Path("/proc")) -> bool | None:
    """True if a process has its working directory inside ``build_dir``; None if that cannot be known."""
    if not proc.is_dir():
        return None
    folder = build_dir.resolve()
    for entry in proc.iterdir():
        if not entry.name.isdigit():
            continue
        try:
            if _inside(Path(os.readlink(entry / "cwd")), folder):
                return True
        except OSError:  # gone, or not ours to read
            continue
    return False


def clear_stale_locks(root: Path | None = None, min_age_s: float = MIN_LOCK_AGE_S) -> list[Path]:
    """Removes build locks no live process holds; returns them. Raises RuntimeError when unsure.

    Looks at ``root/*/lock`` and ``root/*/*/lock`` (with and without torch's ``py311_cpu``-style folder).
    """
    root = extensions_root() if root is None else root
    removed: list[Path] = []
    for lock in [*root.glob("*/lock"), *root.glob("*/*/lock")]:
        try:
            age = time.time() - lock.stat().st_mtime
        except FileNotFoundError:  # the builder just finished
            continue
        if age < min_age_s:
            continue
        alive = builder_alive(lock.parent)
        if alive:
            continue
        if alive is None:
            raise RuntimeError(f"{lock} exists and this system cannot tell whether a build is running; if no "
                               "other livefuse-train or DeepSpeed process is starting, delete it and rerun")
        lock.unlink(missing_ok=True)
        removed.append(lock)
        log.warning("removed a stale DeepSpeed build lock (a build was killed before it finished)",
                    extra={"fields": {"lock": str(lock), "age_s": round(age)}})
    return removed
