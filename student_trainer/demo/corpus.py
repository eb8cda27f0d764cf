"""Two domains every Python install carries: the standard library's code, and the English prose of its
docstrings and comments. Files are split (seeded) into train, validation and held-out (test); each domain
is written as JSONL ({"text": ...} per file) so the trainer reads it like any user corpus. Settings are
chosen on the validation files (the trainer's periodic evaluation reads them); the report's table is
scored on the held-out files only."""

from __future__ import annotations

import ast
import io
import json
import os
import sysconfig
import tempfile
import tokenize
from pathlib import Path

import numpy as np

SKIP_DIRS = {"test", "tests", "idlelib", "lib2to3", "turtledemo", "site-packages", "ensurepip", "pydoc_data",
             "encodings"}


def stdlib_files() -> list[Path]:
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py")
                  if not SKIP_DIRS & set(p.relative_to(root).parts) and 2_000 < p.stat().st_size < 200_000)


def split_domains(source: str) -> tuple[str, str]:
    """(code without docstrings and comments, the docstrings and comments as prose)."""
    tree = ast.parse(source)
    prose, drop = [], set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Module | ast.ClassDef | ast.FunctionDef | ast.AsyncFunctionDef):
            doc = ast.get_docstring(node)
            if doc and node.body and isinstance(node.body[0], ast.Expr):
                prose.append(doc)
                drop.update(range(node.body[0].lineno, node.body[0].end_lineno + 1))
    for tok in tokenize.generate_tokens(io.StringIO(source).readline):
        if tok.type == tokenize.COMMENT and len(tok.string) > 3:
            prose.append(tok.string.lstrip("#").strip())
            if source.splitlines()[tok.start[0] - 1].strip().startswith("#"):
                drop.add(tok.start[0])
    code = "\n".join(line for i, line in enumerate(source.splitlines(), 1) if i not in drop and line.strip())
    return code, "\n".join(prose)


FILE_SPLITS = ("train", "valid", "heldout")


def write_corpus(out_dir: Path, held_out: float = 0.1, validation: float = 0.1, seed: int = 0,
                 max_files: int = 400) -> dict[str, Path]:
    """Writes {code,prose}_{train,valid,heldout}.jsonl into ``out_dir`` (once); returns name -> path. The
    held-out files are the first ``held_out`` of a seeded permutation of the standard library's files, the
    validation files the next ``validation``, the rest is training text."""
    names = [f"{d}_{s}" for d in ("code", "prose") for s in FILE_SPLITS]
    paths = {n: out_dir / f"{n}.jsonl" for n in names}
    if all(p.exists() for p in paths.values()):
        return paths
    files = stdlib_files()
    order = np.random.default_rng(seed).permutation(len(files))[:max_files]
    n_held = max(2, int(len(order) * held_out))
    n_valid = max(2, int(len(order) * validation))
    out_dir.mkdir(parents=True, exist_ok=True)
    rows: dict[str, list[str]] = {n: [] for n in names}
    for rank, i in enumerate(order):
        try:
            code, prose = split_domains(files[i].read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, tokenize.TokenError):
            continue
        split = "heldout" if rank < n_held else "valid" if rank < n_held + n_valid else "train"
        for domain, text in (("code", code), ("prose", prose)):
            if len(text) > 200:
                rows[f"{domain}_{split}"].append(text)
    for name, texts in rows.items():
        _write_atomic(paths[name], "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return paths


def _write_atomic(path: Path, text: str) -> None:
    """Writes through a temporary file of this writer's own (two demos may build the same file at once)."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    with os.fdopen(fd, "w") as f:
        f.write(text)
    os.replace(tmp, path)


def read_jsonl(path: Path) -> list[str]:
    return [json.loads(line)["text"] for line in path.read_text().splitlines() if line.strip()]


def write_mixed_validation(corpus: dict[str, Path], chars: int = 800, docs: int = 64) -> Path:
    """Excerpts (the first ``chars`` characters) of code and prose validation documents, alternating: a small
    file on which the trainer's periodic evaluation sees both domains evenly (the first blocks of the
    per-domain files would all be code)."""
    path = corpus["code_valid"].parent / f"mixed_valid_{chars}x{docs}.jsonl"
    if not path.exists():
        code, prose = read_jsonl(corpus["code_valid"]), read_jsonl(corpus["prose_valid"])
        texts = [t[:chars] for pair in zip(code, prose, strict=False) for t in pair][:docs]
        _write_atomic(path, "".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path
