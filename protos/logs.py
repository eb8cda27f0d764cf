"""How every livefuse process talks to its user: the ``livefuse`` logger, set up once per process here.

    log.warning("source failing", extra={"fields": {"source": "llama2", "code": "UNAVAILABLE"}})
    # json:    {"ts": ..., "level": "WARNING", "logger": ..., "msg": "source failing", "source": "llama2", ...}
    # text:    2026-11-27 14:00:00,000 WARNING livefuse.trainer.sources: source failing source=llama2 code=UNAVAILABLE
    # console: [livefuse] warning: source failing source=llama2 code=UNAVAILABLE

Shared by ``livefuse-teacher`` (json by default: whoever starts a teacher as a child process reads its JSON
lines — the ``listening`` line's ``port``, the ``serving`` line — so that format is part of the contract),
``livefuse-train`` and the demo (console: a person reads them). No module prints messages of its own; a
command's *output* (a table, a JSON summary, a path) goes to stdout.
"""

from __future__ import annotations

import json
import logging
import sys
import time


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        line = {
            "ts": time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(record.created)) + f".{int(record.msecs):03d}Z",
            "level": record.levelname,
            "logger": record.name,
            "msg": record.getMessage(),
            **getattr(record, "fields", {}),
        }
        if record.exc_info:
            line["exc"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        return f"{super().format(record)} {fields}".rstrip()


class ConsoleFormatter(logging.Formatter):
    """For a person at a terminal: ``[prefix] message key=value``; warnings and errors say so."""

    def __init__(self, prefix: str = "livefuse") -> None:
        super().__init__()
        self.prefix = prefix

    def format(self, record: logging.LogRecord) -> str:
        fields = " ".join(f"{k}={v}" for k, v in getattr(record, "fields", {}).items())
        level = f"{record.levelname.lower()}: " if record.levelno >= logging.WARNING else ""
        line = f"[{self.prefix}] {level}{record.getMessage()} {fields}".rstrip()
        return f"{line}\n{self.formatException(record.exc_info)}" if record.exc_info else line


LOG_FORMATS = ("json", "text", "console")


class StderrHandler(logging.StreamHandler):
    """Writes to whatever ``sys.stderr`` is when a record is emitted (a test's capture, a progress bar's
    redirect), not to the stream that was current when logging was set up."""

    def __init__(self) -> None:
        super().__init__(sys.stderr)

    @property  # type: ignore[override]
    def stream(self):  # noqa: ANN201 - whatever file object sys.stderr is
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:  # noqa: ANN001 - StreamHandler.__init__ assigns it; the property wins
        pass


def setup_logging(fmt: str = "json", level: str = "INFO", *, prefix: str = "livefuse") -> None:
    """Sends the ``livefuse`` loggers to stderr in ``fmt`` (one of LOG_FORMATS) at ``level`` and above;
    ``prefix``: what console lines start with (e.g. ``livefuse rank 1``)."""
    if fmt not in LOG_FORMATS:
        raise ValueError(f"log format {fmt!r} is not one of {', '.join(LOG_FORMATS)}")
    handler = StderrHandler()
    handler.setFormatter(JsonFormatter() if fmt == "json" else ConsoleFormatter(prefix) if fmt == "console" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("livefuse")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
