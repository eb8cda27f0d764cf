"""vLLM backend (``livefuse-teacher --backend vllm --model FOLDER``): scores id sequences with prompt logprobs.

Each sequence becomes one ``TokensPrompt`` (ids used as given: vLLM adds no BOS to token-id prompts) with
``SamplingParams(max_tokens=1, prompt_logprobs=k, logprobs=k)``; one ``LLM.generate`` call scores the
whole batch. vLLM's ``prompt_logprobs`` has one entry per prompt token — ``None`` for the first, then the
distribution that *predicted* that token — so it covers every position but the last; the last position's
distribution is the one the single generated token was sampled from (``outputs[0].logprobs[0]``).
Both are raw log-softmax of the model's logits (vLLM's default ``logprobs_mode="raw_logprobs"``, and
temperature 1 with no penalties for versions without that setting). See docs/VLLM.md.

vLLM is optional and CUDA-only: it is imported inside ``load_vllm`` only.
"""

from __future__ import annotations

import logging
import os
import time
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from teacher_server.backends.base import ScoreOutput, max_positions
from teacher_server.config import TeacherConfig
from teacher_server.tokenizer import TeacherTokenizer

log = logging.getLogger("livefuse.teacher.vllm")

MISSING_VLLM = "backend=vllm needs the vllm package (pip install 'livefuse[vllm]') on a CUDA machine"
GPU_MEMORY_UTILIZATION = 0.9  # vLLM's default share of GPU memory for weights + KV cache + activations
PROMPT_LOGPROB_BYTES = 10     # per (token, vocab entry): bf16 logits + fp32 copy + fp32 log-softmax

Position = Mapping[int, Any]  # vLLM's {token_id: Logprob(logprob, rank, decoded_token)} for one position


def top_k_of(position: Position, k: int) -> tuple[list[int], list[float]]:
    """The k entries of one position by decreasing log-prob (ties: smaller id first).

    vLLM's dict holds the top-k plus, when it is not among them, the actual (prompt or sampled) token;
    sorting drops that extra entry. ``Logprob.rank`` is not used: vLLM counts ties against the token
    (rank = number of entries >= its log-prob), and earlier V1 versions gave the extra entry rank k+1.
    """
    ranked = sorted(position.items(), key=lambda item: (-item[1].logprob, item[0]))[:k]
    if len(ranked) < k:
        raise ValueError(f"vLLM returned {len(ranked)} log-probs for a position, expected at least {k}")
    return [tid for tid, _ in ranked], [lp.logprob for _, lp in ranked]


def prompt_logprobs_to_output(prompt_logprobs: Sequence[Position | None], last: Position,
                              text_ids: np.ndarray, top_k: int, bos: bool) -> ScoreOutput:
    """vLLM's per-prompt-token dicts -> the HF backend's ScoreOutput for the n text tokens.

    prompt_logprobs: (n + bos) entries, ``None`` first; entry p is the distribution that predicted
    prompt token p. last: the distribution at the last prompt position (the first sampled token's
    logprobs). text_ids: (n,) the text tokens without BOS. Row j of the output predicts text token j+1,
    so it comes from entry j + bos + 1; with BOS, entry 1 (BOS predicting text token 0) is dropped.
    """
    n, offset = len(text_ids), int(bos) + 1
    if len(prompt_logprobs) != n + int(bos):
        raise ValueError(f"got {len(prompt_logprobs)} prompt log-prob entries for {n + int(bos)} prompt tokens")
    positions = [prompt_logprobs[j + offset] for j in range(n - 1)] + [last]
    topk_ids = np.empty((n, top_k), dtype=np.int32)
    topk_logprobs = np.empty((n, top_k), dtype=np.float32)
    for j, position in enumerate(positions):
        if position is None:
            raise ValueError(f"no log-probs for text position {j}")
        topk_ids[j], topk_logprobs[j] = top_k_of(position, top_k)
    next_logprobs = np.array([positions[j][int(text_ids[j + 1])].logprob for j in range(n - 1)],
                             dtype=np.float32)
    return ScoreOutput(topk_ids, topk_logprobs, next_logprobs)


def memory_fraction(total_bytes: int | None, chunk_tokens: int, vocab_size: int,
                    base: float = GPU_MEMORY_UTILIZATION, floor: float = 0.5) -> float:
    """vLLM's gpu_memory_utilization leaving room for one chunk's full-vocab prompt log-softmax.

    vLLM sizes its KV cache from a profiling run without prompt logprobs; scoring then materialises
    (chunk_tokens, vocab) logits and log-probs on top. Never below ``floor``; ``base`` if the GPU's
    memory is unknown.
    """
    if not total_bytes:
        return base
    spike = chunk_tokens * vocab_size * PROMPT_LOGPROB_BYTES
    return max(floor, round(base - spike / total_bytes, 3))


class VLLMBackend:
    """Scores id sequences through a ``vllm.LLM`` (one GPU, or tensor-parallel as vLLM is configured)."""

    name = "vllm"
    device = "cuda"

    def __init__(self, llm: Any, *, bos_id: int | None = None) -> None:
        from vllm import SamplingParams, TokensPrompt

        self.llm = llm
        self._params, self._prompt = SamplingParams, TokensPrompt
        model_config = llm.llm_engine.model_config
        self.architecture = (getattr(model_config.hf_config, "architectures", None) or ["unknown"])[0]
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.max_positions: int | None = int(model_config.max_model_len) - 1  # room for the sampled token
        self.bos_id = bos_id

    def score(self, batch: Sequence[np.ndarray], top_k: int) -> list[ScoreOutput]:
        prefix = [self.bos_id] if self.bos_id is not None else []
        prompts = [self._prompt(prompt_token_ids=prefix + [int(t) for t in seq]) for seq in batch]
        params = self._params(max_tokens=1, temperature=1.0, logprobs=top_k, prompt_logprobs=top_k,
                              detokenize=False)
        results = self.llm.generate(prompts, params, use_tqdm=False)
        return [prompt_logprobs_to_output(r.prompt_logprobs, r.outputs[0].logprobs[0], seq, top_k,
                                          bos=self.bos_id is not None)
                for r, seq in zip(results, batch, strict=True)]


def _check_device(config: TeacherConfig) -> None:
    if config.device == "cpu":
        raise ValueError("backend=vllm runs on CUDA only; use backend=hf for device=cpu")
    if config.device.startswith("cuda:") and config.device != "cuda:0":
        raise ValueError(f"backend=vllm uses the first visible GPU; instead of device={config.device} "
                         f"set CUDA_VISIBLE_DEVICES={config.device.split(':')[1]} and device=cuda")


def _engine_args(config: TeacherConfig, vocab_size: int, positions: int | None,
                 total_bytes: int | None) -> dict:
    """Keyword arguments for ``vllm.LLM``: our limits become vLLM's, so requests never exceed them."""
    model = os.path.join(config.model, config.gguf_file) if config.gguf_file else config.model
    max_model_len = config.max_tokens_per_text + int(config.add_bos) + 1  # + the one sampled token
    if positions is not None:
        max_model_len = min(max_model_len, positions)
    chunk = max(config.max_batch_tokens, max_model_len)
    return dict(
        model=model, tokenizer=config.tokenizer or config.model, skip_tokenizer_init=True,
        dtype="bfloat16" if config.dtype == "auto" else config.dtype,
        trust_remote_code=config.trust_remote_code, max_logprobs=config.max_top_k,
        max_model_len=max_model_len, max_num_batched_tokens=chunk, enable_prefix_caching=False,
        gpu_memory_utilization=memory_fraction(total_bytes, min(chunk, max_model_len), vocab_size), seed=0,
    )


def _model_shape(config: TeacherConfig) -> tuple[int, int | None]:
    """(vocab size, max positions) from the model's config, before vLLM loads it."""
    from transformers import AutoConfig

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    hf_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code, **extra)
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    return int(text_config.vocab_size), max_positions(text_config)


def _total_memory(platform: Any) -> int | None:
    """GPU 0's memory in bytes (vLLM reads it through NVML, without starting CUDA here); None if unknown."""
    try:
        return int(platform.get_device_total_memory(0))
    except Exception:  # only sizes a safety margin
        return None


def load_vllm(config: TeacherConfig) -> tuple[VLLMBackend, TeacherTokenizer]:
    """Builds the vLLM engine and the HF tokenizer the server encodes texts with."""
    _check_device(config)
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as err:
        raise ValueError(MISSING_VLLM) from err
    from transformers import AutoTokenizer

    t0 = time.perf_counter()
    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    tokenizer = TeacherTokenizer(AutoTokenizer.from_pretrained(
        config.tokenizer or config.model, trust_remote_code=config.trust_remote_code, **extra))
    vocab_size, positions = _model_shape(config)
    args = _engine_args(config, vocab_size, positions, _total_memory(current_platform))
    backend = VLLMBackend(vllm.LLM(**args), bos_id=tokenizer.bos_id if config.add_bos else None)
    log.info("vllm engine ready", extra={"fields": {
        "model": config.model, "architecture": backend.architecture, "dtype": backend.dtype,
        "max_model_len": args["max_model_len"], "max_logprobs": args["max_logprobs"],
        "gpu_memory_utilization": args["gpu_memory_utilization"], "vllm": vllm.__version__,
        "seconds": round(time.perf_counter() - t0, 2)}})
    return backend, tokenizer
