"""Replicas as the trainer's client sees them: a replica still loading gets no traffic (client-side health
checking), and a replica too busy to meet a request's deadline refuses it at once, so the client's retry
lands on another replica."""

from __future__ import annotations

import grpc
import pytest

from student_trainer.trainer.client import TeacherClient
from teacher_server.background import BackgroundServer
from tests.doubles import ControlledBackend
from tests.threads import Workers, wait_until

from .conftest import make_config

pytestmark = pytest.mark.integration
TEXT = "many words to make the queue long " * 40  # ~250 tokens


def counted(server: BackgroundServer, method: str, code: str) -> float:
    assert server.server is not None
    value = server.server.metrics.registry.get_sample_value(
        "livefuse_teacher_requests_total", {"method": method, "code": code})
    return value or 0.0


def test_a_replica_still_loading_gets_no_calls(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"])
    loading = BackgroundServer(config, backend, tokenizer, load=False).start()
    serving = BackgroundServer(config, backend, tokenizer).start()
    try:
        endpoints = [f"127.0.0.1:{loading.port}", f"127.0.0.1:{serving.port}"]
        with TeacherClient(endpoints, timeout=30, max_attempts=1) as client:  # no retries to hide a miss
            for i in range(20):
                assert client.score([f"call {i}"], top_k=2)
        assert counted(serving, "Score", "OK") == 20
        assert counted(loading, "Score", "UNAVAILABLE") == 0
        loading.load()  # once it serves, it takes its share
        with TeacherClient(endpoints, timeout=30, max_attempts=1) as client:
            client.info()

            def spread() -> bool:
                client.score(["spread"], top_k=2)
                return counted(loading, "Score", "OK") > 0

            wait_until(spread, what="a call on the replica that finished loading")
    finally:
        loading.stop()
        serving.stop()


@pytest.fixture
def slow_and_held(tiny_model_dirs, loaded):
    """A replica scoring ~500 tokens/s (2 ms per token, real outputs) whose forwards the test can hold."""
    backend, tokenizer = loaded["gpt2"]
    slow = ControlledBackend(backend, seconds_per_token=0.002)
    config = make_config(tiny_model_dirs["gpt2"], max_tokens_per_text=512, max_batch_tokens=512)
    with BackgroundServer(config, slow, tokenizer) as server:
        with TeacherClient(f"127.0.0.1:{server.port}", timeout=60) as client:
            for _ in range(4):  # the server times real forwards before it refuses anything
                client.score([TEXT], top_k=2)
        yield server, slow
        slow.stop_holding()


def _fill(server: BackgroundServer, slow: ControlledBackend, texts: int) -> Workers:
    """Holds the forwards and sends ``texts`` requests of ~250 tokens each in the background (generous
    deadline); returns once every one of them is in the server: in the held forward or in the queue."""
    def send() -> None:
        with TeacherClient(f"127.0.0.1:{server.port}", timeout=120) as c:
            c.score([TEXT], top_k=2)

    assert server.server is not None
    scored_before = len(slow.scored)
    slow.hold_after_more(0)
    workers = Workers()
    for i in range(texts):
        workers.start(send, name=f"fill-{i}")

    def inside() -> int:
        queued = server.server.metrics.registry.get_sample_value("livefuse_teacher_queue_texts") or 0
        return len(slow.scored) - scored_before + int(queued)

    wait_until(lambda: slow.held.is_set() and inside() == texts, what=f"{texts} requests in the server")
    return workers


def test_a_request_that_cannot_meet_its_deadline_is_refused_at_once(slow_and_held):
    server, slow = slow_and_held
    fill = _fill(server, slow, 12)  # ~3,000 tokens: >= 6 s of work at the measured rate (2 ms per token)
    with TeacherClient(f"127.0.0.1:{server.port}", timeout=30, max_attempts=1) as client:
        with pytest.raises(grpc.RpcError) as err:
            client.score(["needs an answer within five seconds"], top_k=2, timeout=5.0)  # 80%: 4 s < 6 s
        # the forward is held until after this answer: only the early refusal answers UNAVAILABLE "overloaded";
        # a request left waiting in the queue would end in DEADLINE_EXCEEDED
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE, (err.value.code(), err.value.details())
        assert "overloaded" in err.value.details() and "deadline" in err.value.details(), err.value.details()
        slow.stop_holding()
        assert client.score(["a deadline the queue can meet"], top_k=2, timeout=60)
    fill.join(120)
    assert counted(server, "Score", "UNAVAILABLE") == 1
    assert server.server.metrics.registry.get_sample_value("livefuse_teacher_overload_refusals_total") == 1


def test_the_client_retries_an_overload_refusal_on_another_replica(slow_and_held, tiny_model_dirs, loaded):
    busy, slow = slow_and_held
    backend, tokenizer = loaded["gpt2"]
    with BackgroundServer(make_config(tiny_model_dirs["gpt2"]), backend, tokenizer) as idle:
        fill = _fill(busy, slow, 12)
        endpoints = [f"127.0.0.1:{busy.port}", f"127.0.0.1:{idle.port}"]
        with TeacherClient(endpoints, timeout=30) as client:  # the trainer's default: 5 attempts
            for i in range(6):
                assert client.score([f"short deadline {i}"], top_k=2, timeout=5.0)
        slow.stop_holding()
        fill.join(120)
        assert counted(idle, "Score", "OK") == 6
        assert counted(busy, "Score", "UNAVAILABLE") >= 1  # round-robin sent some there first
