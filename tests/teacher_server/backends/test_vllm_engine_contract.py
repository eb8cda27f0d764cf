"""Contract tests of the vLLM backend on vLLM's async engine, with ``FakeAsyncLLM`` (fake_vllm.py: AsyncLLM's
interface as the backend uses it, written from vLLM 0.33.0's source; the main environment has no vLLM): one
engine request per text so later requests join running ones, cancellation aborts, an engine death is fatal
for the server (NOT_SERVING, then ``livefuse-teacher`` exits 1), and a real server on loopback answers
through the async engine exactly as through the HF backend. The same behaviours on real vLLM (a CPU build):
test_vllm_real.py, ``./scripts/test-vllm.sh``.
"""

from __future__ import annotations

import asyncio
import time

import grpc
import numpy as np
import pytest
import torch
from grpc_health.v1 import health_pb2, health_pb2_grpc
from transformers import AutoModelForCausalLM

from protos import teacher_pb2 as pb
from student_trainer.demo.teacher_process import TeacherProcess
from student_trainer.trainer.client import TeacherClient
from teacher_server.backends.base import BackendDead, ScoreOutput
from teacher_server.backends.hf import load_hf
from teacher_server.background import BackgroundServer
from teacher_server.batcher import QueueFull
from teacher_server.engine_queue import EngineQueue
from teacher_server.metrics import TeacherMetrics
from tests import REPO

from ..conftest import make_config
from . import fake_vllm
from .fake_vllm import FakeAsyncLLM, toy_logprobs

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "x"]
VOCAB = 64  # toy_logprobs' default


def backend(engine: FakeAsyncLLM, params: type = fake_vllm.SamplingParams, bos_id: int | None = None):
    from teacher_server.backends.vllm import VLLMBackend

    return VLLMBackend(engine, fake_vllm.api(params), bos_id=bos_id)


def run(coro):
    return asyncio.run(coro)


def test_a_later_request_joins_the_running_ones_instead_of_waiting_for_them():
    """Continuous batching: request B (one short text) arrives while request A's long texts are still in
    prefill; B's text runs in the same engine steps and finishes first."""
    engine = FakeAsyncLLM(toy_logprobs, VOCAB, tokens_per_step=32)
    vllm = backend(engine)
    long_texts = [np.arange(1, 1025) % VOCAB] * 4  # 32 steps each
    finished: dict[str, float] = {}

    async def scenario() -> None:
        async def call(name: str, seqs) -> None:
            await vllm.score_async(seqs, 3)
            finished[name] = time.perf_counter()

        a = asyncio.create_task(call("A", long_texts))
        while not engine.steps:
            await asyncio.sleep(0.001)
        await call("B", [np.array([5, 6, 7])])
        await a

    run(scenario())
    assert finished["B"] < finished["A"]
    mixed = [s for s in engine.steps if len(s) == 5]  # A's four texts and B's one in the same step
    assert mixed, engine.steps[:5]


def test_each_text_is_one_engine_request_with_scoring_params():
    engine = FakeAsyncLLM(toy_logprobs, VOCAB)
    outs = run(backend(engine).score_async([np.array([1, 2, 3]), np.array([4])], 5))
    assert [o.topk_ids.shape for o in outs] == [(3, 5), (1, 5)]
    params = engine.params_seen[0]
    assert len(engine.params_seen) == 2 and params is engine.params_seen[1]  # built once per k
    assert (params.max_tokens, params.logprobs, params.prompt_logprobs, params.detokenize,
            params.temperature, params.flat_logprobs) == (1, 5, 5, False, 1.0, True)


@pytest.mark.parametrize("params", [fake_vllm.SamplingParams, fake_vllm.OldSamplingParams])
def test_flat_and_dict_logprobs_give_the_same_scores(params):
    """flat_logprobs where the SamplingParams has it (guarded), the dict structures where it does not."""
    engine = FakeAsyncLLM(toy_logprobs, VOCAB)
    vllm = backend(engine, params, bos_id=1)
    ids = np.array([7, 3, 9, 9, 2])
    got = run(vllm.score_async([ids], 4))[0]
    assert vllm.flat == (params is fake_vllm.SamplingParams)
    logp = toy_logprobs([1, *ids.tolist()])[1:]  # BOS first; rows of the text positions
    order = np.lexsort((np.arange(VOCAB)[None].repeat(len(ids), 0), -logp), axis=-1)[:, :4]
    np.testing.assert_array_equal(got.topk_ids, order)
    np.testing.assert_allclose(got.topk_logprobs, np.take_along_axis(logp, order, -1), rtol=1e-6)
    np.testing.assert_allclose(got.next_logprobs, logp[np.arange(4), ids[1:]], rtol=1e-6)


def test_a_cancelled_call_aborts_its_requests_in_the_engine():
    engine = FakeAsyncLLM(toy_logprobs, VOCAB, tokens_per_step=1, step_seconds=0.01)

    async def scenario() -> None:
        task = asyncio.ensure_future(backend(engine).score_async([np.arange(200) % VOCAB] * 2, 3))
        while not engine.steps:
            await asyncio.sleep(0.001)
        task.cancel()
        await asyncio.gather(task, return_exceptions=True)

    run(scenario())
    assert sorted(engine.aborted) == ["lf-0", "lf-1"] and not engine.running


def test_one_failed_text_aborts_the_other_texts_of_its_request():
    engine = FakeAsyncLLM(toy_logprobs, VOCAB, tokens_per_step=1, step_seconds=0.002)
    engine.fail_prompts = {3}

    async def scenario() -> None:
        with pytest.raises(fake_vllm.EngineGenerateError):
            await backend(engine).score_async([np.arange(300) % VOCAB, np.array([1, 2, 3])], 2)
        await asyncio.sleep(0.01)

    run(scenario())
    assert engine.aborted == ["lf-0"] and not engine.running  # the long text did not run to its end


def test_engine_death_is_backend_dead_and_other_errors_fail_one_call():
    engine = FakeAsyncLLM(toy_logprobs, VOCAB)
    vllm = backend(engine)
    one = [np.array([1, 2])]

    async def scenario() -> None:  # one event loop, as in the server (AsyncLLM's output handler is bound to it)
        engine.fail_next = ValueError("a bad request")  # recoverable: the engine is still running
        with pytest.raises(fake_vllm.EngineGenerateError) as err:
            await vllm.score_async(one, 2)
        assert "a bad request" in str(err.value.__cause__)
        engine.fail_next = None
        assert (await vllm.score_async(one, 2))[0].topk_ids.shape == (2, 2)
        engine.fail_next, engine.stop_on_fail = RuntimeError("output handler failed"), True  # engine stops
        with pytest.raises(BackendDead, match="output handler failed"):
            await vllm.score_async(one, 2)
        engine.die()  # EngineDeadError, now and for every later request
        for _ in range(2):
            with pytest.raises(BackendDead, match="engine died"):
                await vllm.score_async(one, 2)

    run(scenario())


def test_engine_queue_bounds_admitted_tokens_and_its_gauges_return_to_zero():
    engine = FakeAsyncLLM(toy_logprobs, VOCAB, tokens_per_step=1, step_seconds=0.01)
    metrics = TeacherMetrics()
    queue = EngineQueue(backend(engine), max_queue_tokens=100, metrics=metrics)

    async def scenario() -> None:
        running = asyncio.ensure_future(queue.submit([np.arange(60) % VOCAB], 2))
        await asyncio.sleep(0.02)
        assert metrics.queue_tokens._value.get() == 60 and metrics.queue_texts._value.get() == 1
        with pytest.raises(QueueFull, match="60 tokens are in the engine; the limit is 100"):
            await queue.submit([np.arange(41) % VOCAB], 2)
        small: list[ScoreOutput] = await queue.submit([np.arange(40) % VOCAB], 2)  # 100: fits
        assert small[0].topk_ids.shape == (40, 2)
        running.cancel()
        await asyncio.gather(running, return_exceptions=True)
        await queue.stop()

    run(scenario())
    assert metrics.queue_tokens._value.get() == 0 and metrics.queue_texts._value.get() == 0
    assert engine.shut_down


def model_logprobs(folder):
    model = AutoModelForCausalLM.from_pretrained(folder, dtype=torch.float32).eval()

    def logprobs(ids: list[int]) -> np.ndarray:
        with torch.no_grad():
            return torch.log_softmax(model(input_ids=torch.tensor([ids])).logits[0].float(), -1).numpy()

    return logprobs


@pytest.mark.integration
def test_a_server_on_the_async_engine_answers_like_the_hf_backend(tiny_model_dirs):
    """A real gRPC server whose backend is VLLMBackend over FakeAsyncLLM scoring with the tiny Llama's fp32
    log-softmax: same ids, offsets and scores as the same model behind the HF backend."""
    folder = tiny_model_dirs["llama"]
    hf, tokenizer = load_hf(make_config(folder))
    engine = FakeAsyncLLM(model_logprobs(folder), hf.vocab_size)
    with BackgroundServer(make_config(folder), backend(engine), tokenizer) as via_vllm, \
            BackgroundServer(make_config(folder), hf, tokenizer) as via_hf, \
            TeacherClient(f"127.0.0.1:{via_vllm.port}") as a, TeacherClient(f"127.0.0.1:{via_hf.port}") as b:
        assert a.info().max_tokens_per_text == b.info().max_tokens_per_text
        got, want = (c.score(TEXTS, top_k=6, logprob_format=pb.LOGPROB_FORMAT_FLOAT32) for c in (a, b))
        for x, y in zip(got, want, strict=True):
            np.testing.assert_array_equal(x.input_ids, y.input_ids)
            np.testing.assert_array_equal(x.offsets, y.offsets)
            np.testing.assert_allclose(x.topk_logprobs, y.topk_logprobs, atol=1e-4)
            np.testing.assert_allclose(x.next_logprobs, y.next_logprobs, atol=1e-4)
            gaps = np.abs(np.diff(y.topk_logprobs, axis=1, prepend=0))
            assert np.all(gaps[x.topk_ids != y.topk_ids] < 1e-4)  # ids differ only on float ties
    assert len({rid for step in engine.steps for rid in step}) == len(TEXTS) + 1  # + the warm-up text


def health(port: int) -> int:
    with grpc.insecure_channel(f"127.0.0.1:{port}") as channel:
        stub = health_pb2_grpc.HealthStub(channel)
        return stub.Check(health_pb2.HealthCheckRequest(service=""), timeout=10).status


class DyingBackend:
    """A blocking backend (the token-budget batcher's kind) whose device is gone after the warm-up."""

    name, architecture, dtype, device, max_positions = "hf", "Dying", "float32", "cpu", None

    def __init__(self, vocab_size: int) -> None:
        self.vocab_size, self.calls = vocab_size, 0

    def score(self, batch, top_k):
        self.calls += 1
        if self.calls > 1:
            raise BackendDead("the device is gone")
        return [ScoreOutput(np.zeros((len(s), top_k), np.int32), np.zeros((len(s), top_k), np.float32),
                            np.zeros(len(s) - 1, np.float32)) for s in batch]


@pytest.mark.integration
@pytest.mark.parametrize("kind", ["engine", "batcher"])
def test_a_dead_backend_turns_the_server_not_serving(tiny_model_dirs, kind):
    folder = tiny_model_dirs["llama"]
    hf, tokenizer = load_hf(make_config(folder))
    engine = FakeAsyncLLM(lambda ids: toy_logprobs(ids, hf.vocab_size), hf.vocab_size)
    dying = backend(engine) if kind == "engine" else DyingBackend(hf.vocab_size)
    with BackgroundServer(make_config(folder), dying, tokenizer) as server, \
            TeacherClient(f"127.0.0.1:{server.port}", max_attempts=1) as client:
        assert health(server.port) == health_pb2.HealthCheckResponse.SERVING
        engine.die()
        with pytest.raises(grpc.RpcError) as err:
            client.score(["hello"], top_k=2)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE and "engine died" in err.value.details()  # retried elsewhere
        deadline = time.monotonic() + 10
        while health(server.port) != health_pb2.HealthCheckResponse.NOT_SERVING and time.monotonic() < deadline:
            time.sleep(0.05)
        assert health(server.port) == health_pb2.HealthCheckResponse.NOT_SERVING
        assert server.server.dead.is_set()


DYING_TEACHER = """
import sys
import teacher_server.backends as backends
backends.BACKENDS["vllm"] = "tests.teacher_server.backends.fake_vllm:load_dying"
from teacher_server.__main__ import main
main(sys.argv[1:])
"""


@pytest.mark.integration
@pytest.mark.slow  # a child teacher process: ~17 s on a quiet 2-core machine, more under load
def test_the_teacher_process_exits_non_zero_when_its_engine_dies(tiny_model_dirs):
    """``livefuse-teacher --backend vllm`` (vLLM swapped for FakeAsyncLLM in the child): after the engine
    dies the process stops and exits 1, so a restart policy (on-failure, Kubernetes) restarts it."""
    teacher = TeacherProcess(tiny_model_dirs["llama"], "--backend", "vllm", "--device", "cuda",
                             name="dying-teacher", env={"PYTHONPATH": str(REPO)})
    teacher.cmd[1:3] = ["-c", DYING_TEACHER]
    with teacher, TeacherClient(teacher.address, max_attempts=1) as client:
        assert client.score(["first"], top_k=2)[0].topk_ids.shape[1] == 2
        with pytest.raises(grpc.RpcError):
            client.score(["second"], top_k=2)  # the engine dies on this one
        assert teacher.proc.wait(timeout=60) == 1
    assert any("backend died" in line for line in teacher.recent), list(teacher.recent)
