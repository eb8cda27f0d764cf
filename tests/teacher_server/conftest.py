"""Real teacher servers on 127.0.0.1:0 for the integration tests."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import pytest

from student_trainer.trainer.client import TeacherClient
from teacher_server.backends.hf import HFBackend, load_hf
from teacher_server.background import BackgroundServer
from teacher_server.config import TeacherConfig, load_config
from teacher_server.tokenizer import TeacherTokenizer


def make_config(model: Path, **overrides: object) -> TeacherConfig:
    return load_config(overrides={"model": str(model), "host": "127.0.0.1", "port": 0, "metrics_port": None,
                                  "device": "cpu", "log_format": "text", **overrides})


@pytest.fixture(scope="session")
def loaded(tiny_model_dirs: dict[str, Path]) -> dict[str, tuple[HFBackend, TeacherTokenizer]]:
    """name -> (backend, tokenizer) loaded through the same code path the CLI uses."""
    return {name: load_hf(make_config(path)) for name, path in tiny_model_dirs.items()}


@pytest.fixture(scope="module")
def servers(tiny_model_dirs: dict[str, Path], loaded) -> Iterator[dict[str, BackgroundServer]]:
    """One running server per tiny model (model loaded by the server itself)."""
    running = {name: BackgroundServer(make_config(path)).start() for name, path in tiny_model_dirs.items()}
    yield running
    for server in running.values():
        server.stop()


@pytest.fixture(scope="module")
def clients(servers: dict[str, BackgroundServer]) -> Iterator[dict[str, TeacherClient]]:
    made = {name: TeacherClient(f"127.0.0.1:{s.port}", timeout=60) for name, s in servers.items()}
    yield made
    for client in made.values():
        client.close()
