"""The vLLM backend: its conversion of vLLM's logprob structures, its engine settings, and (GPU) real vLLM.

vLLM cannot be installed on the CI machine, so the conversion is checked on structures built exactly as
vLLM builds them (``vllm/logprobs.py``: ``Logprob`` and ``append_logprobs_for_next_position``), both by
hand and from a real tiny model's log-softmax, against the HF backend.
"""

from __future__ import annotations

import importlib.util
import sys
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM

from teacher_server.backends import load_backend
from teacher_server.backends.hf import load_hf
from teacher_server.backends.vllm import (
    GPU_MEMORY_UTILIZATION,
    MISSING_VLLM,
    _engine_args,
    memory_fraction,
    prompt_logprobs_to_output,
    top_k_of,
)
from teacher_server.config import load_config

from ..conftest import make_config

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "x"]


@dataclass
class Logprob:
    """Same fields as ``vllm.logprobs.Logprob``."""

    logprob: float
    rank: int | None = None
    decoded_token: str | None = None


def vllm_position(row: np.ndarray, actual: int, k: int) -> dict[int, Logprob]:
    """One position's dict as vLLM builds it: the actual (prompt or sampled) token first, ranked by the
    count of entries >= its log-prob, then the top-k with ranks 1..k (an actual token inside the top-k
    is overwritten by its top-k entry, so the dict has k or k+1 keys)."""
    top = torch.from_numpy(row).topk(k).indices.tolist()
    entries = {actual: Logprob(float(row[actual]), int((row >= row[actual]).sum()))}
    entries.update({t: Logprob(float(row[t]), r) for r, t in enumerate(top, start=1)})
    return entries


def vllm_structures(logp: np.ndarray, prompt: list[int], sampled: int, k: int):
    """(RequestOutput.prompt_logprobs, outputs[0].logprobs[0]) for a prompt whose log-softmax rows are
    ``logp`` (N, V): None for the first token, entry p = distribution at p-1 over prompt token p."""
    prompt_logprobs = [None] + [vllm_position(logp[p - 1], prompt[p], k) for p in range(1, len(prompt))]
    return prompt_logprobs, vllm_position(logp[-1], sampled, k)


def lp(value: float, rank: int | None = None) -> Logprob:
    return Logprob(value, rank)


# --- conversion on hand-built structures -------------------------------------------------------------

def test_actual_token_outside_top_k_is_dropped():
    position = {7: lp(-9.0, 40), 3: lp(-0.5, 1), 5: lp(-1.5, 2)}  # actual token 7 injected first
    assert top_k_of(position, 2) == ([3, 5], [-0.5, -1.5])


def test_actual_token_inside_top_k_keeps_k_entries_in_logprob_order():
    position = {5: lp(-1.5, 2), 3: lp(-0.5, 1), 9: lp(-2.0, 3)}  # dict order is not rank order
    assert top_k_of(position, 3) == ([3, 5, 9], [-0.5, -1.5, -2.0])


def test_ties_break_by_smaller_id_even_when_ranks_tie():
    # the injected token ties with the k-th: vLLM gives it rank k+1 or a shared rank; never k+1 entries out
    position = {8: lp(-2.0, 3), 6: lp(-1.0, 1), 4: lp(-2.0, 2)}
    assert top_k_of(position, 2) == ([6, 4], [-1.0, -2.0])
    assert top_k_of({2: lp(-1.0), 1: lp(-1.0)}, 2) == ([1, 2], [-1.0, -1.0])


def test_rows_next_logprobs_and_last_position():
    # text [10, 11, 12]; entry p predicted prompt token p; last = sampled-token distribution
    prompt_logprobs = [None, {11: lp(-0.1, 1), 20: lp(-3.0, 2)}, {12: lp(-4.0, 3), 21: lp(-0.2, 1), 22: lp(-0.3, 2)}]
    last = {99: lp(-8.0, 50), 30: lp(-0.7, 1), 31: lp(-0.9, 2)}
    out = prompt_logprobs_to_output(prompt_logprobs, last, np.array([10, 11, 12]), 2, bos=False)
    np.testing.assert_array_equal(out.topk_ids, [[11, 20], [21, 22], [30, 31]])
    np.testing.assert_allclose(out.topk_logprobs, [[-0.1, -3.0], [-0.2, -0.3], [-0.7, -0.9]])
    np.testing.assert_allclose(out.next_logprobs, [-0.1, -4.0])


def test_bos_entry_is_dropped():
    # prompt [BOS=1, 10, 11]: entry 1 (BOS predicting 10) has no row; rows are text positions only
    prompt_logprobs = [None, {10: lp(-5.0, 9), 77: lp(-0.01, 1)}, {11: lp(-0.3, 1), 40: lp(-2.0, 2)}]
    last = {50: lp(-0.4, 1), 51: lp(-1.1, 2)}
    out = prompt_logprobs_to_output(prompt_logprobs, last, np.array([10, 11]), 2, bos=True)
    np.testing.assert_array_equal(out.topk_ids, [[11, 40], [50, 51]])
    np.testing.assert_allclose(out.next_logprobs, [-0.3])
    assert 77 not in out.topk_ids


def test_one_token_text_uses_the_sampled_distribution_only():
    out = prompt_logprobs_to_output([None], {4: lp(-0.2, 1), 2: lp(-1.9, 2)}, np.array([9]), 2, bos=False)
    np.testing.assert_array_equal(out.topk_ids, [[4, 2]])
    assert out.next_logprobs.shape == (0,)


def test_wrong_number_of_entries_is_an_error():
    with pytest.raises(ValueError, match="prompt log-prob entries"):
        prompt_logprobs_to_output([None], {1: lp(0.0)}, np.array([3, 4]), 1, bos=False)
    with pytest.raises(ValueError, match="expected at least 3"):
        top_k_of({1: lp(-0.1), 2: lp(-0.2)}, 3)


# --- equivalence with the HF backend on structures rebuilt from a real model ----------------------------

@pytest.mark.parametrize(("name", "bos"), [("llama", False), ("llama", True), ("gpt2", False), ("mpt", False)])
def test_reconstructed_vllm_output_equals_hf_backend(name, bos, tiny_model_dirs):
    k = 8
    backend, tokenizer = load_hf(make_config(tiny_model_dirs[name], add_bos=bos))
    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[name], dtype=torch.float32).eval()
    for text, expected in zip(TEXTS, backend.score([e.ids for e in tokenizer.encode(TEXTS)], k), strict=True):
        ids = tokenizer.encode([text])[0].ids
        prompt = ([tokenizer.bos_id] if bos else []) + ids.tolist()
        with torch.no_grad():
            logp = torch.log_softmax(model(input_ids=torch.tensor([prompt])).logits[0].float(), -1).numpy()
        sampled = int(logp[-1].argmin())  # outside the top-k: the sampled entry is an extra key
        got = prompt_logprobs_to_output(*vllm_structures(logp, prompt, sampled, k), ids, k, bos=bos)
        for field in ("topk_ids", "topk_logprobs", "next_logprobs"):
            assert getattr(got, field).dtype == getattr(expected, field).dtype, field
            assert getattr(got, field).shape == getattr(expected, field).shape, field
        np.testing.assert_allclose(got.topk_logprobs, expected.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(got.next_logprobs, expected.next_logprobs, atol=1e-5)
        differ = got.topk_ids != expected.topk_ids  # only where two log-probs tie within float noise
        gaps = np.abs(np.diff(expected.topk_logprobs, axis=1, prepend=0))
        assert not differ.any() or np.all(gaps[differ] < 1e-5)


# --- engine settings -----------------------------------------------------------------------------------

def test_memory_fraction_leaves_room_for_the_prompt_logprob_spike():
    gib = 1 << 30
    assert memory_fraction(None, 8192, 128_000) == GPU_MEMORY_UTILIZATION
    small = memory_fraction(80 * gib, 2048, 32_000)  # 0.65 GB of 80 GB
    assert 0.89 <= small < GPU_MEMORY_UTILIZATION
    big = memory_fraction(80 * gib, 16384, 128_000)  # 21 GB of 80 GB
    assert big == pytest.approx(GPU_MEMORY_UTILIZATION - 16384 * 128_000 * 10 / (80 * gib), abs=1e-3)
    assert memory_fraction(24 * gib, 16384, 128_000) == 0.5  # never below the floor


def test_engine_args_carry_our_limits(tmp_path: Path):
    config = load_config(overrides={"model": str(tmp_path), "backend": "vllm", "max_top_k": 50, "add_bos": True,
                                    "max_tokens_per_text": 1000, "max_batch_tokens": 4096})
    args = _engine_args(config, vocab_size=32_000, positions=2048, total_bytes=80 << 30)
    assert args["max_logprobs"] == 50  # vLLM rejects prompt_logprobs > max_logprobs (default 20)
    assert args["max_model_len"] == 1000 + 1 + 1  # text + BOS + the one sampled token
    assert args["max_num_batched_tokens"] == 4096 and args["dtype"] == "bfloat16"
    assert args["skip_tokenizer_init"] and not args["enable_prefix_caching"]
    short = _engine_args(config, vocab_size=32_000, positions=512, total_bytes=None)
    assert short["max_model_len"] == 512 and short["gpu_memory_utilization"] == GPU_MEMORY_UTILIZATION


def test_backend_vllm_without_vllm_fails_at_load_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, installed or not
    config = load_config(overrides={"model": str(tmp_path), "backend": "vllm"})
    with pytest.raises(ValueError) as err:
        load_backend(config)
    assert str(err.value) == MISSING_VLLM


def test_backend_vllm_refuses_cpu(tmp_path):
    config = load_config(overrides={"model": str(tmp_path), "backend": "vllm", "device": "cpu"})
    with pytest.raises(ValueError, match="CUDA only"):
        load_backend(config)


# --- real vLLM (GPU) -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vllm and a CUDA GPU")
def test_real_vllm_matches_hf_backend(tmp_path):
    from student_trainer.demo.assets import build_tiny_model
    from teacher_server.backends.vllm import load_vllm

    folder = build_tiny_model("llama", "llama-spm", tmp_path / "llama", hidden=128, heads=2)  # head dim 64
    config = load_config(overrides={"model": str(folder), "backend": "vllm", "dtype": "bfloat16",
                                    "max_top_k": 32, "max_tokens_per_text": 256, "max_batch_tokens": 1024})
    backend, tokenizer = load_vllm(config)
    hf, _ = load_hf(make_config(folder))  # fp32 on CPU: the reference
    ids = [e.ids for e in tokenizer.encode(TEXTS)]
    assert backend.vocab_size == hf.vocab_size and backend.max_positions == 256
    for got, ref in zip(backend.score(ids, 32), hf.score(ids, 32), strict=True):
        assert got.topk_ids.shape == ref.topk_ids.shape and got.next_logprobs.shape == ref.next_logprobs.shape
        np.testing.assert_allclose(got.next_logprobs, ref.next_logprobs, atol=0.1)  # bf16 weights/activations
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=0.1)
        clear = ref.topk_logprobs[:, 0] - ref.topk_logprobs[:, 1] > 0.2  # top-1 not within bf16 noise
        np.testing.assert_array_equal(got.topk_ids[clear, 0], ref.topk_ids[clear, 0])
