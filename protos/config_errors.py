"""One format for configuration errors, shared by ``livefuse-teacher`` and ``livefuse-train``.

Not part of the wire format, but of the user-facing contract of both CLIs: a bad setting is reported the
same way by either side. It lives in ``protos`` because the trainer and the server may not import each
other (import-linter contracts in pyproject.toml); it needs nothing but pydantic.
"""

from __future__ import annotations

from pydantic import ValidationError


def format_errors(err: ValidationError, title: str) -> str:
    """One line per bad field: dotted path, pydantic's message and the value given."""
    lines = []
    for e in err.errors():
        field = ".".join(str(p) for p in e["loc"]) or "config"
        value = e.get("input")
        shown = "" if isinstance(value, dict | list) else f" (got {value!r})"
        lines.append(f"{field}: {e['msg']}{shown}")
    return f"{title}:\n  " + "\n  ".join(lines)
