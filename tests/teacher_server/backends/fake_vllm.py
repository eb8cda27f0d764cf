"""Doubles of the vLLM 0.33 pieces the backend touches, built from vLLM's source, for the contract tests of the
conversion (test_vllm_contract.py, test_vllm_engine_contract.py) in the main environment, which has no vLLM.

- ``Logprob``, ``FlatLogprobs`` and ``position_entries``: vllm/logprobs.py (``append_logprobs_for_next_position``:
  the actual token first, then the top-k; a dict merges a repeated id, the flat lists keep both).
- ``SamplingParams``: a msgspec-like struct whose ``__struct_fields__`` names its fields, as vLLM's does.
- ``FakeAsyncLLM``: vllm/v1/engine/async_llm.py as the backend uses it (``model_config``, the async generator
  ``generate(prompt, sampling_params, request_id)``, ``errored``, ``shutdown``), scoring with a given
  log-softmax function; a step loop runs every waiting request each step, each needing one step per
  ``tokens_per_step`` prompt tokens (chunked prefill), so texts submitted later join running ones (continuous
  batching), and ``steps`` records which requests ran together.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from types import SimpleNamespace
from typing import Any

import numpy as np

from teacher_server.backends.vllm import VLLMApi

FINAL_ONLY = "FINAL_ONLY"  # stands for RequestOutputKind.FINAL_ONLY


@dataclass
class Logprob:
    """Same fields as ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


@dataclass
class FlatLogprobs:
    """Same fields and int indexing as ``vllm.logprobs.FlatLogprobs``."""

    start_indices: list[int] = field(default_factory=list)
    end_indices: list[int] = field(default_factory=list)
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[float] = field(default_factory=list)
    ranks: list[int | None] = field(default_factory=list)
    decoded_tokens: list[str | None] = field(default_factory=list)

    def append(self, entries: list[tuple[int, float, int]] | None) -> None:
        self.start_indices.append(len(self.logprobs))
        for token_id, logprob, rank in entries or []:
            self.token_ids.append(token_id)
            self.logprobs.append(logprob)
            self.ranks.append(rank)
            self.decoded_tokens.append(None)
        self.end_indices.append(len(self.logprobs))

    def __len__(self) -> int:
        return len(self.start_indices)

    def __getitem__(self, index: int) -> dict[int, Logprob]:
        return {self.token_ids[i]: Logprob(self.logprobs[i], self.ranks[i])
                for i in range(self.start_indices[index], self.end_indices[index])}


def position_entries(row: np.ndarray, actual: int, k: int) -> list[tuple[int, float, int]]:
    """[(id, log-prob, rank)] of one position as vLLM gathers it: the actual token (ranked by the count of
    entries >= its log-prob), then torch.topk's k entries in decreasing order."""
    top = np.argsort(-row, kind="stable")[:k]
    first = (actual, float(row[actual]), int((row >= row[actual]).sum()))
    return [first, *((int(t), float(row[t]), r) for r, t in enumerate(top, start=1))]


def vllm_logprobs(logp: np.ndarray, prompt: list[int], sampled: int, k: int, flat: bool):
    """(RequestOutput.prompt_logprobs, outputs[0].logprobs) for a prompt whose log-softmax rows are ``logp``
    (N, V): nothing for the first prompt token, entry p = the distribution at p-1 over prompt token p."""
    positions = [position_entries(logp[p - 1], prompt[p], k) for p in range(1, len(prompt))]
    last = position_entries(logp[-1], sampled, k)
    if flat:
        prompt_lp, sample_lp = FlatLogprobs(), FlatLogprobs()
        for entries in [None, *positions]:
            prompt_lp.append(entries)
        sample_lp.append(last)
        return prompt_lp, sample_lp
    as_dict = [None] + [{t: Logprob(lp, r) for t, lp, r in entries} for entries in positions]
    return as_dict, [{t: Logprob(lp, r) for t, lp, r in last}]


class SamplingParams:
    """Keeps its keyword arguments; ``__struct_fields__`` lists the fields, as on vLLM's msgspec struct."""

    __struct_fields__ = ("max_tokens", "temperature", "logprobs", "prompt_logprobs", "detokenize",
                         "output_kind", "flat_logprobs")

    def __init__(self, **kwargs: Any) -> None:
        unknown = set(kwargs) - set(self.__struct_fields__)
        assert not unknown, f"SamplingParams has no field {unknown}"
        self.flat_logprobs = False
        self.__dict__.update(kwargs)


class OldSamplingParams(SamplingParams):
    """A vLLM without ``flat_logprobs``."""

    __struct_fields__ = tuple(f for f in SamplingParams.__struct_fields__ if f != "flat_logprobs")


class EngineDeadError(Exception):
    """Stands for vllm.v1.engine.exceptions.EngineDeadError."""


class EngineGenerateError(Exception):
    """Stands for vllm.v1.engine.exceptions.EngineGenerateError (AsyncLLM.generate wraps other errors in it)."""


def tokens_input(prompt_token_ids: list[int]) -> dict:
    """As ``vllm.inputs.tokens_input``."""
    return {"type": "token", "prompt_token_ids": prompt_token_ids}


def api(params: type = SamplingParams) -> VLLMApi:
    return VLLMApi(params, tokens_input, FINAL_ONLY, (EngineDeadError,))


@dataclass
class _Request:
    request_id: str
    prompt: list[int]
    params: Any
    steps_left: int
    done: asyncio.Future


class FakeAsyncLLM:
    def __init__(self, logprob_fn: Callable[[list[int]], np.ndarray], vocab_size: int, *, max_model_len: int = 2049,
                 tokens_per_step: int = 64, step_seconds: float = 0.005, die_at_request: int | None = None) -> None:
        """``die_at_request``: the engine dies when that request (1-based) arrives."""
        self.logprob_fn, self.tokens_per_step, self.step_seconds = logprob_fn, tokens_per_step, step_seconds
        self.die_at_request = die_at_request
        self.model_config = SimpleNamespace(hf_config=SimpleNamespace(architectures=["FakeForCausalLM"]),
                                            get_vocab_size=lambda: vocab_size, dtype="torch.float32",
                                            max_model_len=max_model_len)
        self.running: list[_Request] = []
        self.steps: list[list[str]] = []
        self.aborted: list[str] = []
        self.params_seen: list[Any] = []
        self.fail_next: BaseException | None = None  # raised to every request in flight at the next step
        self.stop_on_fail = False  # fail_next also stops the engine (AsyncLLM's output handler failed)
        self.fail_prompts: set[int] = set()  # requests whose prompt has one of these lengths fail alone
        self.errored = False
        self.shut_down = False
        self._loop_task: asyncio.Task | None = None

    async def generate(self, prompt: dict, sampling_params: Any, request_id: str) -> AsyncIterator[Any]:
        if self.die_at_request is not None and len(self.params_seen) + 1 >= self.die_at_request:
            self.die()
        if self.errored:
            raise EngineDeadError()
        assert prompt["type"] == "token" and sampling_params.output_kind == FINAL_ONLY
        self.params_seen.append(sampling_params)
        ids = list(prompt["prompt_token_ids"])
        request = _Request(request_id, ids, sampling_params, math.ceil(len(ids) / self.tokens_per_step),
                           asyncio.get_running_loop().create_future())
        self.running.append(request)
        if self._loop_task is None:
            self._loop_task = asyncio.ensure_future(self._step_loop())
        try:
            output = await request.done
        except asyncio.CancelledError:
            self.aborted.append(request_id)  # AsyncLLM.generate aborts the request when cancelled
            raise
        except EngineDeadError:
            raise
        except Exception as err:
            raise EngineGenerateError() from err
        finally:
            if request in self.running:
                self.running.remove(request)
        yield output

    async def _step_loop(self) -> None:
        while True:
            await asyncio.sleep(self.step_seconds)
            batch = [r for r in self.running if not r.done.done()]
            if not batch:
                continue
            self.steps.append([r.request_id for r in batch])
            for request in batch:
                self._step(request)

    def _step(self, request: _Request) -> None:
        if self.fail_next is not None:
            request.done.set_exception(self.fail_next)
            self.errored = self.errored or self.stop_on_fail
            return
        if len(request.prompt) in self.fail_prompts:
            request.done.set_exception(ValueError(f"prompt of {len(request.prompt)} tokens refused"))
            return
        request.steps_left -= 1
        if request.steps_left <= 0:
            request.done.set_result(self._output(request))

    def _output(self, request: _Request) -> Any:
        k, logp = request.params.prompt_logprobs, self.logprob_fn(request.prompt)
        sampled = int(logp[-1].argmin())  # outside the top-k: the sampled entry is an extra key
        prompt_lp, sample_lp = vllm_logprobs(logp, request.prompt, sampled, k, request.params.flat_logprobs)
        completion = SimpleNamespace(index=0, token_ids=[sampled], logprobs=sample_lp, finish_reason="length")
        return SimpleNamespace(request_id=request.request_id, prompt_token_ids=request.prompt,
                               prompt_logprobs=prompt_lp, outputs=[completion], finished=True)

    def die(self) -> None:
        """The engine process dies: requests in flight and every later one get EngineDeadError."""
        self.fail_next, self.errored = EngineDeadError(), True

    def shutdown(self) -> None:
        self.shut_down = True
        if self._loop_task is not None:
            self._loop_task.get_loop().call_soon_threadsafe(self._loop_task.cancel)


def toy_logprobs(ids: list[int], vocab_size: int = 64) -> np.ndarray:
    """A deterministic stand-in for a model: (n, vocab_size) log-softmax rows that depend on the prefix."""
    logits = np.sin(np.outer(np.cumsum(ids) + np.arange(len(ids)), np.arange(1, vocab_size + 1)))
    return logits - np.log(np.exp(logits).sum(-1, keepdims=True))


def load_dying(config: Any) -> tuple[Any, Any]:
    """A ``teacher_server.backends.BACKENDS`` loader for a child teacher process: VLLMBackend over a
    FakeAsyncLLM whose engine dies at the third request (the warm-up and one request succeed)."""
    from transformers import AutoTokenizer

    from teacher_server.backends.vllm import VLLMBackend
    from teacher_server.tokenizer import TeacherTokenizer

    tokenizer = TeacherTokenizer(AutoTokenizer.from_pretrained(config.model))
    engine = FakeAsyncLLM(lambda ids: toy_logprobs(ids, tokenizer.size), tokenizer.size, die_at_request=3)
    return VLLMBackend(engine, api()), tokenizer
