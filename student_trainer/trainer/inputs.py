"""Whether what a config names is there on this machine: data files or dataset, TLS files, token files.

The config model only validates values (so a config meant for another machine, e.g. a container's, loads
anywhere); the CLI calls :func:`check_inputs` before a run or ``prepare`` starts, so a missing file is a
one-line error naming the setting, not a traceback minutes into start-up.
"""

from __future__ import annotations

import os
from pathlib import Path

from student_trainer.trainer.config import ConfigError, TrainerConfig
from student_trainer.trainer.data.documents import check_data


def _readable_file(path: str | None, field: str) -> None:
    if path is not None and not (Path(path).is_file() and os.access(path, os.R_OK)):
        raise ConfigError(f"{field}: file {path!r} does not exist or is not readable")


def check_sources(config: TrainerConfig) -> None:
    """Every source's TLS and token files are readable here."""
    for i, s in enumerate(config.sources):
        _readable_file(s.auth_token_file, f"sources.{i}.auth_token_file")
        for name in ("ca_cert", "client_cert", "client_key"):
            _readable_file(getattr(s.tls, name) if s.tls else None, f"sources.{i}.tls.{name}")


def check_inputs(config: TrainerConfig, *, sources: bool = True) -> None:
    """The data (always) and, with ``sources``, the sources' files; raises ValueError naming the setting."""
    check_data(config.data)
    if sources:
        check_sources(config)
