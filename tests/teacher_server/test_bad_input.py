"""Every bad or over-limit request gets a precise status code, and the server keeps answering."""

from __future__ import annotations

import threading
import time

import grpc
import pytest

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from student_trainer.trainer.client import TeacherClient
from teacher_server.background import BackgroundServer
from tests.doubles import ControlledBackend

from .conftest import make_config

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def limited(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"], max_texts_per_request=4, max_top_k=16,
                         max_tokens_per_text=32, max_tokens_per_request=80, max_batch_tokens=64,
                         max_message_bytes=64 * 1024)
    with BackgroundServer(config, backend, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        yield client


def assert_error(client: TeacherClient, code: grpc.StatusCode, *words: str, **request) -> None:
    with pytest.raises(grpc.RpcError) as err:
        client.stub.Score(pb.ScoreRequest(**request), timeout=30)
    assert err.value.code() == code, err.value.details()
    for word in words:
        assert word in err.value.details(), err.value.details()
    # ... and the server still answers
    assert client.score(["still alive"], top_k=2)[0].input_ids.size > 0


BAD_REQUESTS = {
    "no texts": (grpc.StatusCode.INVALID_ARGUMENT, ("texts", "no texts"), {}),
    "too many texts": (grpc.StatusCode.INVALID_ARGUMENT, ("texts", "5", "max_texts_per_request=4"),
                       {"texts": ["a"] * 5}),
    "empty text": (grpc.StatusCode.INVALID_ARGUMENT, ("texts[1]", "empty"), {"texts": ["a", ""]}),
    "top_k over limit": (grpc.StatusCode.INVALID_ARGUMENT, ("top_k", "17", "max_top_k=16"),
                         {"texts": ["a"], "top_k": 17}),
    "unknown logprob_format": (grpc.StatusCode.INVALID_ARGUMENT, ("logprob_format", "99", "LOGPROB_FORMAT_FLOAT32"),
                               {"texts": ["a"], "logprob_format": 99}),
    "over-long text": (grpc.StatusCode.INVALID_ARGUMENT, ("texts[0]", "max_tokens_per_text=32", "truncate"),
                       {"texts": ["word " * 60]}),
    "too many tokens in request": (grpc.StatusCode.INVALID_ARGUMENT, ("max_tokens_per_request=80",),
                                   {"texts": ["word " * 30] * 3}),
    "oversized message": (grpc.StatusCode.RESOURCE_EXHAUSTED, (), {"texts": ["x" * 70_000]}),
}


@pytest.mark.parametrize("case", BAD_REQUESTS)
def test_bad_request_is_refused_with_a_clear_status(limited, case):
    code, words, request = BAD_REQUESTS[case]
    assert_error(limited, code, *words, **request)


def test_truncate_cuts_over_long_text_to_the_limit(limited):
    got = limited.score(["word " * 60], top_k=3, truncate=True)[0]
    assert got.truncated and got.input_ids.shape == (32,) and got.next_logprobs.shape == (31,)
    assert not limited.score(["word"], top_k=3, truncate=True)[0].truncated


def test_garbage_bytes_do_not_kill_the_server(limited):
    raw = limited.channel.unary_unary("/livefuse.v1.Teacher/Score", request_serializer=None,
                                      response_deserializer=None)
    with pytest.raises(grpc.RpcError) as err:
        raw(b"\xff\xfe\x00garbage", timeout=10)
    # grpcio answers a request that does not parse with UNKNOWN before any servicer code runs
    assert err.value.code() == grpc.StatusCode.UNKNOWN and "parsing" in err.value.details()
    assert limited.score(["still alive"], top_k=2)


def test_unknown_method_is_unimplemented(limited):
    raw = limited.channel.unary_unary("/livefuse.v1.Teacher/Nope")
    with pytest.raises(grpc.RpcError) as err:
        raw(b"", timeout=10)
    assert err.value.code() == grpc.StatusCode.UNIMPLEMENTED


@pytest.fixture
def gated(tiny_model_dirs, loaded):
    """A server whose forwards wait for the test to open a gate (real model underneath)."""
    backend, tokenizer = loaded["llama"]
    gate = ControlledBackend(backend, hold_after=0)
    config = make_config(tiny_model_dirs["llama"], max_queue_tokens=64, max_tokens_per_request=64,
                         max_tokens_per_text=64, max_batch_tokens=64, warmup=False)
    server = BackgroundServer(config, gate, tokenizer).start()
    client = TeacherClient(f"127.0.0.1:{server.port}", timeout=30)
    yield gate, client
    gate.release.set()
    client.close()
    server.stop()


def _in_background(fn, *args):
    box: dict[str, object] = {}

    def run() -> None:
        try:
            box["value"] = fn(*args)
        except grpc.RpcError as err:
            box["error"] = err

    thread = threading.Thread(target=run)
    thread.start()
    return thread, box


def test_full_queue_answers_resource_exhausted(gated):
    gate, client = gated
    busy, _ = _in_background(client.score, ["first text in the forward"], 2)
    assert gate.held.wait(10)
    fill, fill_box = _in_background(client.score, ["word " * 50], 2)  # ~50 tokens wait in the queue
    time.sleep(0.5)
    with pytest.raises(grpc.RpcError) as err:
        client.score(["word " * 30], top_k=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in err.value.details()
    gate.release.set()
    busy.join(30)
    fill.join(30)
    assert "value" in fill_box and client.score(["after"], top_k=2)


def test_cancelled_request_is_dropped_before_the_forward(gated, loaded):
    gate, client = gated
    busy, _ = _in_background(client.score, ["occupies the forward"], 2)
    assert gate.held.wait(10)
    future = client.stub.Score.future(client.request(["never scored, caller left"], top_k=2), timeout=30)
    time.sleep(0.3)
    future.cancel()
    expired, expired_box = _in_background(
        lambda: client.stub.Score(client.request(["deadline passes in the queue"], top_k=2), timeout=0.5))
    expired.join(10)
    assert expired_box["error"].code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.release.set()
    busy.join(30)
    assert client.score(["after"], top_k=2)
    tokenizer = loaded["llama"][1]
    served = [e.ids.tolist() for e in tokenizer.encode(["occupies the forward", "after"])]
    assert gate.scored == served  # the cancelled and the expired text never reached the model


def test_stub_without_ready_model_is_unavailable(tiny_model_dirs):
    config = make_config(tiny_model_dirs["gpt2"])
    server = BackgroundServer(config, load=False).start()
    try:
        channel = grpc.insecure_channel(f"127.0.0.1:{server.port}")
        with pytest.raises(grpc.RpcError) as err:
            pb_grpc.TeacherStub(channel).GetInfo(pb.GetInfoRequest(), timeout=10)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "loading" in err.value.details()
        channel.close()
    finally:
        server.stop()
