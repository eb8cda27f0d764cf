"""The Docker HEALTHCHECK probe: exit 0 only when the teacher's health service says SERVING."""

from __future__ import annotations

import socket
import subprocess
import sys

import pytest

from teacher_server.background import BackgroundServer
from teacher_server.healthcheck import main

from .conftest import make_config

pytestmark = pytest.mark.integration


def _probe(port: int) -> subprocess.CompletedProcess:
    """The exact command the teacher image's HEALTHCHECK runs, as a subprocess."""
    cmd = [sys.executable, "-m", "teacher_server.healthcheck", "--port", str(port), "--timeout", "10"]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=60)


def test_exit_0_only_once_the_model_is_loaded(tiny_model_dirs, loaded, capsys):
    backend, tokenizer = loaded["gpt2"]
    server = BackgroundServer(make_config(tiny_model_dirs["gpt2"]), backend, tokenizer, load=False).start()
    try:
        assert main(["--port", str(server.port)]) == 1
        assert "NOT_SERVING" in capsys.readouterr().err
        assert main(["--port", str(server.port), "--service", ""]) == 1
        capsys.readouterr()
        server.load()
        probe = _probe(server.port)
        assert probe.returncode == 0, probe.stderr
        assert "SERVING" in probe.stdout and probe.stderr == ""
        assert main(["--port", str(server.port), "--service", ""]) == 0
    finally:
        server.stop()


def test_unknown_service_is_not_healthy(tiny_model_dirs, loaded, capsys):
    backend, tokenizer = loaded["gpt2"]
    with BackgroundServer(make_config(tiny_model_dirs["gpt2"]), backend, tokenizer) as server:
        assert main(["--port", str(server.port), "--service", "no.such.Service"]) == 1
    assert "NOT_FOUND" in capsys.readouterr().err


def test_nothing_listening_fails_with_a_message():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    probe = _probe(port)
    assert probe.returncode == 1
    assert f"127.0.0.1:{port}: health check failed: UNAVAILABLE" in probe.stderr


def test_missing_token_file_fails_with_a_message(capsys, tmp_path):
    assert main(["--port", "1", "--auth-token-file", str(tmp_path / "absent")]) == 1
    assert "cannot read a credentials file" in capsys.readouterr().err
