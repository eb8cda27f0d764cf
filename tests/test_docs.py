"""The documents describe this repository: the tree in docs/ARCHITECTURE.md is the code's, every relative link
resolves, and nothing cites a document outside the repository (a clone has none of them)."""

from __future__ import annotations

import re
import subprocess
from pathlib import Path

from tests import REPO

OUTSIDE = re.compile(r"DESIGN\.md|\.\./shared|shared/(ENVIRONMENT|STYLE)")


def _tracked_text_files() -> list[Path]:
    names = subprocess.run(["git", "ls-files"], cwd=REPO, capture_output=True, text=True, check=True).stdout.split()
    return [REPO / n for n in names if not n.endswith((".png", ".pyc")) and (REPO / n).is_file()]


def _tree_section() -> dict[str, set[str]]:
    """Folder -> the module names ARCHITECTURE.md's tree lists for it (continuation lines included)."""
    text = (REPO / "docs" / "ARCHITECTURE.md").read_text()
    block = text.split("## The tree", 1)[1].split("```")[1]
    listed: dict[str, set[str]] = {}
    folder = None
    for line in block.splitlines():
        head, _, rest = line.partition("  ")
        if head.strip():
            folder, names = head.strip(), rest
        else:
            names = line
        if folder and folder.endswith("/"):
            names = re.sub(r"\([^)]*\)", "", names)  # "base (the protocol)" names the module base
            listed.setdefault(folder, set()).update(n.strip() for n in names.split(",") if n.strip())
    return listed


def test_the_architecture_tree_lists_every_module_of_the_code():
    listed = _tree_section()
    for folder in ("teacher_server/", "teacher_server/backends/", "student_trainer/core/", "student_trainer/trainer/",
                   "student_trainer/trainer/data/", "student_trainer/experiments/", "student_trainer/demo/"):
        modules = {p.stem for p in (REPO / folder).glob("*.py") if p.stem != "__init__"}
        assert listed[folder] == modules, f"docs/ARCHITECTURE.md's tree for {folder}: {listed[folder] ^ modules}"
    packages = {p.parent.relative_to(REPO).as_posix() + "/" for p in (REPO / "student_trainer").rglob("__init__.py")}
    assert packages <= set(listed) | {"student_trainer/"}, packages - set(listed)


def test_no_file_cites_a_document_outside_the_repository():
    offenders = [str(p.relative_to(REPO)) for p in _tracked_text_files()
                 if p.suffix in {".md", ".py", ".sh", ".toml", ".yaml", ".yml", ".txt", ".proto", ""}
                 and p.name != "test_docs.py" and OUTSIDE.search(p.read_text(errors="replace"))]
    assert not offenders


def test_relative_links_in_the_docs_resolve():
    broken = []
    for doc in [REPO / "README.md", *(REPO / "docs").glob("*.md")]:
        for target in re.findall(r"\]\(([^)#\s]+)(?:#[^)]*)?\)", doc.read_text()):
            if not target.startswith(("http://", "https://", "mailto:")) and not (doc.parent / target).exists():
                broken.append(f"{doc.relative_to(REPO)} -> {target}")
    assert not broken
