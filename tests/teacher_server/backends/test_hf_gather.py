"""The HF backend's gather, below the server: taken inside the chunked output layer, it equals the full
log-softmax of a direct forward whatever the chunk size, on the split-head and the full-logits paths, for
positions in any order (repeated, -1) and padding ids; a sequence that gathers nothing in a batch with
others that do gets None and the same top-k as alone."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from teacher_server.backends.base import Gather
from teacher_server.backends.hf import HFBackend

TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog.", "Ünï 😀 é"]


def full_logprobs(backend: HFBackend, ids: np.ndarray) -> np.ndarray:
    with torch.no_grad():
        logits = backend.model(input_ids=torch.from_numpy(ids.astype(np.int64))[None]).logits[0]
    return torch.log_softmax(logits.float(), -1).numpy()


def some_gather(n: int, vocab_size: int, seed: int) -> Gather:
    rng = np.random.default_rng(seed)
    positions = rng.integers(0, n, 7)
    positions[[1, 4]] = [-1, positions[0]]  # no position; a repeated one; otherwise any order
    ids = rng.integers(0, vocab_size, (7, 5))
    ids[0, 2] = ids[3, 4] = -1
    ids[2, 0] = vocab_size - 1
    return Gather(positions, ids)


def expected(logp: np.ndarray, g: Gather) -> np.ndarray:
    rows = logp[np.maximum(g.positions, 0)][np.arange(len(g.ids))[:, None], np.maximum(g.ids, 0)]
    return np.where((g.positions[:, None] >= 0) & (g.ids >= 0), rows, -np.inf).astype(np.float32)


@pytest.fixture(scope="module")
def llama(loaded):
    return loaded["llama"]


@pytest.mark.parametrize("chunk_tokens", [0, 1, 3])
@pytest.mark.parametrize("split_head", [True, False])
def test_gather_equals_the_full_log_softmax_at_any_chunk_size(llama, chunk_tokens, split_head):
    backend, tokenizer = llama
    chunked = HFBackend(backend.model, chunk_tokens=chunk_tokens)
    chunked.split_head = split_head  # False: the full-logits path (models whose head the split cannot reproduce)
    batch = [e.ids for e in tokenizer.encode(TEXTS)]
    gathers = [some_gather(len(ids), chunked.vocab_size, seed) for seed, ids in enumerate(batch)]
    outs = chunked.score(batch, 3, gathers)
    for ids, g, out in zip(batch, gathers, outs, strict=True):
        assert out.gathered_logprobs.shape == g.ids.shape and out.gathered_logprobs.dtype == np.float32
        np.testing.assert_allclose(out.gathered_logprobs, expected(full_logprobs(backend, ids), g), atol=2e-5)


def test_a_sequence_without_gather_in_a_gathering_batch(llama):
    backend, tokenizer = llama
    batch = [e.ids for e in tokenizer.encode(TEXTS)]
    g = some_gather(len(batch[0]), backend.vocab_size, 7)
    mixed = backend.score(batch, 4, [g, None, Gather(np.zeros(0, np.int64), np.zeros((0, 2), np.int64))])
    plain = backend.score(batch, 4)
    assert mixed[1].gathered_logprobs is None and plain[0].gathered_logprobs is None
    assert mixed[2].gathered_logprobs.shape == (0, 2)
    for a, b in zip(mixed, plain, strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-6)
    alone = backend.score(batch[:1], 4, [g])[0]
    np.testing.assert_allclose(mixed[0].gathered_logprobs, alone.gathered_logprobs, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_gather_on_cuda_equals_the_cpu_backend(llama):
    """The pairs' rows and ids move to the logits' device per chunk; the values come back to the host once."""
    import copy

    backend, tokenizer = llama
    cuda = HFBackend(copy.deepcopy(backend.model).to("cuda"), chunk_tokens=5)
    batch = [e.ids for e in tokenizer.encode(TEXTS)]
    gathers = [some_gather(len(ids), cuda.vocab_size, seed) for seed, ids in enumerate(batch)]
    for a, b in zip(cuda.score(batch, 3, gathers), backend.score(batch, 3, gathers), strict=True):
        np.testing.assert_allclose(a.gathered_logprobs, b.gathered_logprobs, atol=1e-4)
