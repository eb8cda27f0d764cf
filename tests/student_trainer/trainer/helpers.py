"""Shared pieces of the trainer integration tests: real teacher servers on loopback (that a test can
hold, kill and restart on the same port), trainer configs on the stdlib corpus, metrics and TensorBoard
readers, two runs' weights compared relative to the update, launchers that leave no rank behind."""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import sysconfig
import threading
import time
from pathlib import Path
from typing import Any

import pytest
import yaml

from student_trainer.demo.teacher_process import clean_env
from teacher_server.backends.hf import load_hf
from teacher_server.background import BackgroundServer
from teacher_server.config import TeacherConfig, load_config
from tests import REPO
from tests.doubles import ControlledBackend

# Target: a tiny Llama with Mistral's SentencePiece tokenizer; the sources (tests/conftest.py) use GPT-2's
# byte-level BPE and MPT's (= GPT-NeoX's) BPE: three different tokenizers.
TARGET = ("llama", "mistral-spm")


def corpus_files() -> list[str]:
    """The stdlib ``json`` package: ~200 blocks of 64 tokens of code and English docstrings."""
    return sorted(str(p) for p in (Path(sysconfig.get_paths()["stdlib"]) / "json").glob("*.py"))


def paragraph_corpus(folder: Path) -> dict[str, Any]:
    """The ``data`` settings of a corpus whose blocks have many lengths: the stdlib ``json`` package cut at blank
    lines, one document per paragraph (~260 blocks of 16-64 tokens, nearly half shorter than 64), so the ranks of
    a step count different numbers of tokens and a loss divided by each rank's own count, instead of the step's
    global count, changes the update. Cached in ``folder`` (its key names this file's path)."""
    folder.mkdir(parents=True, exist_ok=True)
    docs = [p for f in corpus_files() for p in Path(f).read_text().split("\n\n") if p.strip()]
    path = folder / "paragraphs.jsonl"
    path.write_text("".join(json.dumps({"text": d}) + "\n" for d in docs))
    return {"train_files": [str(path)], "cache_dir": str(folder / "cache")}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def teacher_config(model: Path, port: int = 0, **extra: Any) -> TeacherConfig:
    return load_config(overrides={"model": str(model), "host": "127.0.0.1", "port": port, "metrics_port": None,
                                  "device": "cpu", "log_format": "text", "warmup": False, **extra})


class Teacher:
    """One teacher server in this process on a fixed port; ``kill`` stops it abruptly, ``restart`` brings a
    (possibly different) model back on the same port."""

    def __init__(self, model: Path, hold_after: int | None = None, port: int | None = None, **settings: Any) -> None:
        """``settings``: more TeacherConfig fields (e.g. ``max_gather_ids=0``)."""
        self.port = port or free_port()
        self.model, self.settings = model, settings
        self.backend: ControlledBackend | None = None
        self.server: BackgroundServer | None = None
        self.start(model, hold_after)

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def start(self, model: Path, hold_after: int | None = None) -> None:
        config = teacher_config(model, self.port, **self.settings)
        inner, tokenizer = load_hf(config)
        self.backend = ControlledBackend(inner, hold_after)
        self.server = BackgroundServer(config, self.backend, tokenizer).start()

    def kill(self) -> None:
        """Stops serving at once (in-flight requests are cancelled), then lets a held forward finish."""
        assert self.server is not None and self.backend is not None
        server, backend, self.server = self.server, self.backend, None
        stopper = threading.Thread(target=server.stop, kwargs={"grace": 0})
        stopper.start()
        deadline = time.monotonic() + 30
        while _accepts(self.port) and time.monotonic() < deadline:
            time.sleep(0.02)
        backend.release.set()
        stopper.join(60)

    def kill_when_held(self, then_start: Path | None = None) -> threading.Thread:
        """In the background: once a forward is held, kill the server (and start ``then_start`` on its port)."""
        def chaos() -> None:
            assert self.backend is not None
            if self.backend.held.wait(120):
                self.kill()
                if then_start is not None:
                    self.start(then_start)

        thread = threading.Thread(target=chaos, daemon=True)
        thread.start()
        return thread

    def stop(self) -> None:
        if self.server is not None:
            assert self.backend is not None
            self.backend.release.set()
            self.server.stop()
            self.server = None

    def __enter__(self) -> Teacher:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()


def _accepts(port: int) -> bool:
    with socket.socket() as s:
        s.settimeout(1)
        return s.connect_ex(("127.0.0.1", port)) == 0


def source(name: str, *teachers: Teacher, failure: str = "wait", **extra: Any) -> dict[str, Any]:
    return {"name": name, "endpoints": [t.address for t in teachers], "failure": failure, "timeout_s": 30,
            **extra}


def trainer_config(target: Path, out: Path, sources: list[dict[str, Any]], **sections: dict[str, Any]
                   ) -> dict[str, Any]:
    """A small ZeRO-2 fp32 CPU run on the stdlib corpus; ``sections`` update the defaults per section."""
    config: dict[str, Any] = {
        "target": {"model": str(target)},
        "sources": sources,
        "method": {"lambda_clm": 0.9},
        "data": {"train_files": corpus_files(), "seq_len": 64, "validation_fraction": 0.1},
        "train": {"max_steps": 4, "seed": 0, "deepspeed": {
            "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
            "zero_optimization": {"stage": 2}, "optimizer": {"params": {"lr": 1e-3}}}},
        "run": {"output_dir": str(out), "eval_blocks": 4, "progress": False, "prefetch_depth": 2,
                "connect_timeout_s": 10},  # vocab maps: the shared livefuse cache, built once per pair
    }
    for section, values in sections.items():
        config[section] = {**config.get(section, {}), **values}
    return config


def write_config(config: dict[str, Any], path: Path) -> Path:
    path.write_text(yaml.safe_dump(config))
    return path


def read_metrics(out: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """(step records, eval records) of metrics.jsonl, in file order."""
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    return [r for r in records if "eval" not in r], [r for r in records if "eval" in r]


def losses_by_step(out: Path) -> dict[int, float]:
    """The last logged loss of each step (a resumed run logs the steps after its checkpoint again)."""
    return {r["step"]: r["loss"] for r in read_metrics(out)[0]}


def tensorboard_scalars(folder: Path) -> dict[str, dict[int, float]]:
    """Every scalar of the TensorBoard logs in ``folder``, read back by tensorboard's own reader: tag -> step -> value."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(folder), size_guidance={"scalars": 0})  # 0: keep every point
    events.Reload()
    return {tag: {e.step: e.value for e in events.Scalars(tag)} for tag in events.Tags()["scalars"]}


def assert_tensorboard_equals_metrics(out: Path) -> None:
    """TensorBoard holds exactly metrics.jsonl: ``train/<key>`` at every step, ``eval/<key>`` at every evaluation
    (float32 there)."""
    steps, evals = read_metrics(out)
    expected: dict[str, dict[int, float]] = {}
    for r in steps:
        for key, value in r.items():
            if key not in ("step", "time"):
                expected.setdefault(f"train/{key}", {})[r["step"]] = value
    for r in evals:
        for key, value in r["eval"].items():
            expected.setdefault(f"eval/{key}", {})[r["step"]] = value
    got = tensorboard_scalars(out / "tensorboard")
    assert got.keys() == expected.keys(), got.keys() ^ expected.keys()
    for tag, points in expected.items():
        assert got[tag] == pytest.approx(points, rel=1e-6, nan_ok=True), tag


def update_mismatch(got: dict[str, Any], expected: dict[str, Any], initial: dict[str, Any]) -> dict[str, float]:
    """Per weight: ‖got − expected‖ / ‖expected − initial‖, how far two runs' weights are apart relative to the
    size of the update (infinite when the weight did not move: an lr of 0 proves nothing)."""
    assert got.keys() == expected.keys() == initial.keys(), (got.keys() ^ expected.keys()) | (got.keys() ^ initial.keys())
    out = {}
    for k in expected:
        update, diff = float((expected[k] - initial[k]).norm()), float((got[k] - expected[k]).norm())
        out[k] = diff / update if update > 0 else float("inf")
    return out


def run_launcher(cmd: list[str], timeout: float) -> subprocess.CompletedProcess:
    """``subprocess.run`` for a launcher (``deepspeed``, ``torchrun``) in its own process group, which goes whole
    when the time is up: the ranks of a hung run do not outlive the test."""
    proc = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        kill_group(proc)
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def kill_group(proc: subprocess.Popen) -> None:
    """SIGKILL to every process left in ``proc``'s group (started with ``start_new_session=True``)."""
    with contextlib.suppress(ProcessLookupError):
        os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()


def subprocess_env() -> dict[str, str]:
    """This environment without the process-group variables an in-process run set (a child would try to
    rejoin this process's group)."""
    env = clean_env()
    env["PYTHONUNBUFFERED"] = "1"
    return env


def launch_ranks(configs: list[Path], timeout: float = 300) -> list[subprocess.CompletedProcess]:
    """One ``livefuse-train`` process per config, started as a launcher starts ranks (``RANK``, ``WORLD_SIZE``,
    ``MASTER_ADDR``/``PORT`` in its environment; world = the number of configs); their exit codes and output."""
    port, procs = free_port(), []
    for rank, config in enumerate(configs):
        env = subprocess_env() | {"RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": str(len(configs)),
                                  "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port)}
        procs.append(subprocess.Popen([sys.executable, "-m", "student_trainer", "--config", str(config)], cwd=REPO,
                                      env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    try:
        outs = [p.communicate(timeout=timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    return [subprocess.CompletedProcess(p.args, p.returncode, o, e) for p, (o, e) in zip(procs, outs, strict=True)]
