"""Every bad or over-limit request gets a precise status code, and the server keeps answering."""

from __future__ import annotations

import threading
import time

import grpc
import numpy as np
import pytest
from google.rpc import error_details_pb2
from grpc_status import rpc_status

from protos import teacher_pb2 as pb
from protos import teacher_pb2_grpc as pb_grpc
from student_trainer.trainer.client import ResponseTooLarge, TeacherClient
from teacher_server.background import BackgroundServer
from tests.doubles import ControlledBackend
from tests.threads import Workers, wait_until

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
    # parsed by the server's gate, not by grpcio (which would answer UNKNOWN): the field's type is named
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "does not parse as livefuse.v1.ScoreRequest" in err.value.details(), err.value.details()
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
    yield gate, client, server
    gate.release.set()
    client.close()
    server.stop()


def _queued_texts(server: BackgroundServer) -> float:
    assert server.server is not None
    return server.server.metrics.registry.get_sample_value("livefuse_teacher_queue_texts") or 0.0


def test_full_queue_answers_resource_exhausted(gated):
    gate, client, server = gated
    workers = Workers()
    workers.start(client.score, ["first text in the forward"], 2)
    assert gate.held.wait(30)
    workers.start(client.score, ["word " * 50], 2)  # ~50 tokens wait in the queue
    wait_until(lambda: _queued_texts(server) == 1, what="the second request queued")
    with pytest.raises(grpc.RpcError) as err:
        client.score(["word " * 30], top_k=2)
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED and "busy" in err.value.details()
    assert rpc_status.from_call(err.value) is None  # no reason: busy, retry later (not RESPONSE_TOO_LARGE)
    gate.release.set()
    workers.join(60)  # both scored
    assert client.score(["after"], top_k=2)


def test_cancelled_request_is_dropped_before_the_forward(gated, loaded):
    gate, client, server = gated
    busy = Workers()
    busy.start(client.score, ["occupies the forward"], 2)
    assert gate.held.wait(30)
    future = client.stub.Score.future(client.request(["never scored, caller left"], top_k=2), timeout=30)
    wait_until(lambda: _queued_texts(server) == 1, what="the request queued")
    future.cancel()
    wait_until(lambda: _queued_texts(server) == 0, what="the cancelled request dropped from the queue")
    with pytest.raises(grpc.RpcError) as expired:  # its deadline passes while it waits in the queue
        client.stub.Score(client.request(["deadline passes in the queue"], top_k=2), timeout=0.5)
    assert expired.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    gate.release.set()
    busy.join(60)
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


class RecordingTokenizer:
    """The real tokenizer, recording the length in characters of every text it is asked to tokenize."""

    def __init__(self, inner) -> None:
        self.inner, self.lengths = inner, []
        for attr in ("hf", "fingerprint", "size", "bos_id", "special_ids"):
            setattr(self, attr, getattr(inner, attr))

    def encode(self, texts):
        self.lengths.extend(len(t) for t in texts)
        return self.inner.encode(texts)

    def vocab(self, vocab_size):
        return self.inner.vocab(vocab_size)


@pytest.fixture
def recorded(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    recording = RecordingTokenizer(tokenizer)
    config = make_config(tiny_model_dirs["gpt2"], max_tokens_per_text=64)
    with BackgroundServer(config, backend, recording) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=60) as client:
        yield config, recording, client


def test_text_over_max_chars_is_refused_before_tokenizing(recorded):
    config, recording, client = recorded
    limit = config.max_chars_per_text
    assert limit == 16 * 64  # default: tied to max_tokens_per_text
    recording.lengths.clear()
    t0 = time.perf_counter()
    with pytest.raises(grpc.RpcError) as err:
        client.score(["the same words again " * 50_000], top_k=2)  # 1.05 M characters
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    for word in ("texts[0]", "1050000 characters", f"max_chars_per_text={limit}", "truncate"):
        assert word in err.value.details(), err.value.details()
    assert recording.lengths == [] and time.perf_counter() - t0 < 30  # refused, not tokenized
    for length, limit_named in ((limit, "max_tokens_per_text"), (limit + 1, "max_chars_per_text")):
        with pytest.raises(grpc.RpcError) as err:  # at the limit the tokens decide; one more: the characters
            client.score(["x" * length], top_k=2)
        assert limit_named in err.value.details(), (length, err.value.details())


def test_truncate_cuts_by_characters_before_tokenizing(recorded):
    config, recording, client = recorded
    text = "the same words again " * 50_000
    recording.lengths.clear()
    got = client.score([text, "short"], top_k=2, truncate=True)
    assert max(recording.lengths) <= config.max_chars_per_text
    assert got[0].truncated and len(got[0].input_ids) == 64 and not got[1].truncated
    alone = client.score([text[:config.max_chars_per_text]], top_k=2, truncate=True)[0]
    np.testing.assert_array_equal(got[0].input_ids, alone.input_ids)  # = the first 64 tokens of the text


def test_a_huge_text_does_not_stall_another_clients_small_request(tiny_model_dirs, loaded):
    """Two clients' texts of 1.2 M characters are being tokenized (seconds of work each, as many as there
    are tokenizer threads); a third client's small request is answered before either."""
    backend, tokenizer = loaded["gpt2"]
    recording = RecordingTokenizer(tokenizer)
    config = make_config(tiny_model_dirs["gpt2"], max_tokens_per_text=64, max_chars_per_text=1_200_000)
    huge = ("def f(x):\n    return x * 2  # a comment\n" * 40_000)[:1_200_000]
    finished: list[str] = []
    with BackgroundServer(config, backend, recording) as server:
        address = f"127.0.0.1:{server.port}"

        def send(name: str, text: str) -> None:
            with TeacherClient(address, timeout=300) as c:
                c.score([text], top_k=2, truncate=True)
            finished.append(name)

        bulk = [threading.Thread(target=send, args=(f"huge-{i}", huge)) for i in range(config.tokenizer_threads)]
        for thread in bulk:
            thread.start()
        deadline = time.monotonic() + 60
        while recording.lengths.count(len(huge)) < len(bulk) and time.monotonic() < deadline:
            time.sleep(0.01)  # until every huge text is being tokenized
        t0 = time.perf_counter()
        send("small", "a small request from another client")
        small_s = time.perf_counter() - t0
        for thread in bulk:
            thread.join(300)
    assert finished[0] == "small" and sorted(finished[1:]) == ["huge-0", "huge-1"], finished
    assert small_s < 10, small_s  # generous: the huge texts take seconds each on a shared 2-core machine


def test_a_response_that_would_not_fit_is_refused_before_the_forward(tiny_model_dirs, loaded):
    """Where the start-up check is bypassed (config built without validation), the request is still refused
    in band, before any forward, and the metric records the code the client saw."""
    from teacher_server.config import TeacherConfig

    backend, tokenizer = loaded["gpt2"]
    recording = ControlledBackend(backend)
    valid = make_config(tiny_model_dirs["gpt2"], warmup=False)
    config = TeacherConfig.model_construct(**{**valid.model_dump(), "max_message_bytes": 64 * 1024})
    with BackgroundServer(config, recording, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        text = "words and more words " * 60  # ~300 tokens: ~160 kB at k = 64 in fp32
        request = client.request([text], top_k=64, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)
        with pytest.raises(grpc.RpcError) as err:
            client.stub.Score(request, timeout=30)
        assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
        assert "max_message_bytes=65536" in err.value.details(), err.value.details()
        with pytest.raises(ResponseTooLarge) as too_large:  # the trainer's client tells it from "busy"
            client.score([text], top_k=64, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)
        assert too_large.value.max_message_bytes == 65536 and too_large.value.response_bytes > 65536
        (response,) = client.score_stream([client.request([text], top_k=64, logprob_format=pb.LOGPROB_FORMAT_FLOAT32)])
        assert response.error.code == grpc.StatusCode.RESOURCE_EXHAUSTED.value[0]
        assert response.error.message.startswith("RESPONSE_TOO_LARGE: "), response.error.message  # no trailer
        assert len(client.score([text], top_k=4)[0].input_ids) > 200  # the same text at k = 4 fits
        counted = server.server.metrics.registry.get_sample_value(
            "livefuse_teacher_requests_total", {"method": "Score", "code": "RESOURCE_EXHAUSTED"})
    assert recording.calls == 1 and counted == 2  # only the k = 4 request reached the model
    # the documented reason, in gRPC's rich error model (grpc-status-details-bin), as any client reads it
    status = rpc_status.from_call(err.value)
    assert status is not None and len(status.details) == 1, status
    info = error_details_pb2.ErrorInfo()
    assert status.details[0].Unpack(info), status.details[0].type_url
    assert (info.reason, info.domain) == ("RESPONSE_TOO_LARGE", "livefuse.v1")
    assert info.metadata["max_message_bytes"] == "65536" and int(info.metadata["response_bytes"]) > 65536
    assert err.value.details().startswith("RESPONSE_TOO_LARGE: ")


def test_vocabulary_chunks_fit_the_message_limit_whatever_the_chunk_size_asked(tiny_model_dirs, loaded):
    backend, tokenizer = loaded["gpt2"]
    config = make_config(tiny_model_dirs["gpt2"], max_message_bytes=64 * 1024, max_tokens_per_request=80,
                         max_tokens_per_text=64, max_top_k=16)
    with BackgroundServer(config, backend, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", timeout=30) as client:
        chunks = list(client.stub.GetVocab(pb.GetVocabRequest(chunk_size=1_000_000), timeout=30))
        assert all(c.ByteSize() <= 64 * 1024 for c in chunks) and len(chunks) > 1
        assert client.vocab() == [t for c in chunks for t in c.tokens]
