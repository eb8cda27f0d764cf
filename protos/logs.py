"""Structured logging for both CLIs: one JSON object per line (or plain text), extra fields under ``fields``.

    log.warning("source failing", extra={"fields": {"source": "llama2", "code": "UNAVAILABLE"}})
    # json: {"ts": ..., "level": "WARNING", "logger": ..., "msg": "source failing", "source": "llama2", ...}
    # text: 2026-11-27 14:00:00,000 WARNING livefuse.trainer.sources: source failing source=llama2 code=UNAVAILABLE

Shared by ``livefuse-teacher`` and ``livefuse-train``; whoever starts a teacher as a child process reads its
JSON lines (the ``listening`` line's ``port``, the ``serving`` line), so the format is part of the contract.
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


def setup_logging(fmt: str = "json", level: str = "INFO") -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if fmt == "json" else
                         TextFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger("livefuse")
    root.handlers[:] = [handler]
    root.setLevel(level)
    root.propagate = False
