"""The Hugging Face transformers backend (CPU or CUDA): ``livefuse-teacher --backend hf`` (the default).

It runs any ``AutoModelForCausalLM``. It computes hidden states for the real tokens only,
then the output layer, the fp32 log-softmax and top-k in row chunks, so a 150k vocabulary never
materialises a full (batch, length, vocab) fp32 tensor. Gathered log-probs (``Gather``) are taken inside the
same chunks: only the asked (position, id) values leave them.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch

from teacher_server.backends.base import Gather, ScoreOutput, max_positions
from teacher_server.config import TeacherConfig
from teacher_server.tokenizer import TeacherTokenizer

log = logging.getLogger("livefuse.teacher.backend")

_CHUNK_BYTES = 256 * 1024 * 1024  # fp32 logits per log-softmax chunk


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"device={name!r} but CUDA is not available on this machine; use device=cpu")
    return torch.device(name)


def resolve_dtype(name: str, device: torch.device) -> torch.dtype:
    if name == "auto":
        return torch.bfloat16 if device.type == "cuda" else torch.float32
    if name == "float16" and device.type == "cpu":
        raise ValueError("dtype=float16 is not supported on CPU; use float32 or bfloat16")
    return getattr(torch, name)


def input_device(model: torch.nn.Module) -> torch.device:
    """Where input ids go: the model's device, or for a model sharded by accelerate (``device_map``) the device
    of its first shard (accelerate's hooks move activations between shards and fetch offloaded weights)."""
    shards = getattr(model, "hf_device_map", None)
    if shards:
        first = next(iter(shards.values()))
        return torch.device(f"cuda:{first}" if isinstance(first, int) else "cpu" if first == "disk" else first)
    return next(model.parameters()).device


def _describe_devices(model: torch.nn.Module) -> str:
    """``cuda:0`` for a model in one place; ``cuda:0,cuda:1,disk`` for a sharded one."""
    shards = getattr(model, "hf_device_map", None)
    if not shards:
        return str(next(model.parameters()).device)
    names = [f"cuda:{d}" if isinstance(d, int) else str(d) for d in shards.values()]
    return ",".join(dict.fromkeys(names))


def _asked(g: Gather) -> np.ndarray:
    """(m, c) mask of the entries of ``g`` that ask something: a position and an id that is not padding."""
    return (g.positions[:, None] >= 0) & (g.ids >= 0)


@dataclass
class GatherPairs:
    """A batch's gathers as flat (row, id) pairs over its scored rows (texts one after another), sorted by
    row so that each chunk of the output layer takes a contiguous slice; ``parts`` collects what it took."""

    rows: np.ndarray   # (P,) ascending
    ids: np.ndarray    # (P,)
    order: np.ndarray  # (P,) the asked order of each sorted pair
    parts: list[torch.Tensor] = field(default_factory=list)

    @classmethod
    def of(cls, lengths: Sequence[int], gather: Sequence[Gather | None], vocab_size: int) -> GatherPairs:
        rows, ids, start = [np.zeros(0, np.int64)], [np.zeros(0, np.int64)], 0
        for n, g in zip(lengths, gather, strict=True):
            if g is not None:
                assert g.positions.max(initial=-1) < n and g.ids.max(initial=-1) < vocab_size
                r, c = np.nonzero(_asked(g))
                rows.append(start + g.positions[r])
                ids.append(g.ids[r, c])
            start += n
        flat = np.concatenate(rows)
        order = np.argsort(flat, kind="stable")
        return cls(flat[order], np.concatenate(ids)[order], order)

    def take(self, logits: torch.Tensor, lse: torch.Tensor, start: int) -> None:
        """The log-probs of the pairs in rows ``start .. start + len(logits)`` (logits fp32, lse: (rows,))."""
        a, b = np.searchsorted(self.rows, [start, start + logits.shape[0]])
        if b > a:
            rows = torch.from_numpy(self.rows[a:b] - start).to(logits.device)
            ids = torch.from_numpy(self.ids[a:b]).to(logits.device)
            self.parts.append(logits[rows, ids] - lse[rows])

    def split(self, gather: Sequence[Gather | None]) -> list[np.ndarray | None]:
        """Each sequence's (m, c) log-probs, -inf where nothing was asked."""
        values = np.empty(len(self.rows), np.float32)
        if self.parts:
            values[self.order] = torch.cat(self.parts).cpu().numpy()
        out, at = [], 0
        for g in gather:
            if g is None:
                out.append(None)
                continue
            asked = _asked(g)
            got = np.full(g.ids.shape, -np.inf, np.float32)
            got[asked] = values[at:at + int(asked.sum())]
            at += int(asked.sum())
            out.append(got)
        return out


class HFBackend:
    """Hugging Face transformers backend (CPU or CUDA)."""

    name = "hf"
    can_gather = True

    def __init__(self, model: torch.nn.Module, *, bos_id: int | None = None, chunk_tokens: int = 0,
                 pad_to_multiple_of: int = 1, compile: bool = False) -> None:
        self.model = model.eval()
        self.architecture = type(model).__name__
        self.head = model.get_output_embeddings()
        self.vocab_size = int(self.head.weight.shape[0])
        param = next(model.parameters())
        self.torch_device, self.torch_dtype = input_device(model), param.dtype
        self.device, self.dtype = _describe_devices(model), str(param.dtype).removeprefix("torch.")
        self.max_positions = max_positions(model.config)
        self.bos_id = bos_id
        self.pad_to_multiple_of = pad_to_multiple_of
        self.chunk_tokens = chunk_tokens or max(1, _CHUNK_BYTES // (4 * self.vocab_size))
        self._base = torch.compile(model.base_model, mode="max-autotune-no-cudagraphs") if compile \
            else model.base_model
        self.split_head = self._split_head_matches()

    @torch.inference_mode()
    def _split_head_matches(self) -> bool:
        """True if base model + output layer reproduces the model's logits (no softcapping/scaling)."""
        ids = torch.arange(1, 9, device=self.torch_device).remainder(self.vocab_size)[None]
        full = self.model(input_ids=ids).logits.float()
        split = self.head(self.model.base_model(input_ids=ids)[0]).float()
        same = torch.allclose(full, split, atol=1e-3, rtol=1e-3)
        if not same:
            log.warning("output layer does not reproduce the model's logits; using full-logit path")
        return same

    def _inputs(self, batch: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Right-padded ids (B, T) and attention mask; BOS prepended when configured."""
        prefix = [self.bos_id] if self.bos_id is not None else []
        lengths = [len(prefix) + len(s) for s in batch]
        width = -(-max(lengths) // self.pad_to_multiple_of) * self.pad_to_multiple_of
        ids = np.zeros((len(batch), width), dtype=np.int64)
        mask = np.zeros((len(batch), width), dtype=np.int64)
        for row, (seq, n) in enumerate(zip(batch, lengths, strict=True)):
            ids[row, :n] = np.concatenate([prefix, seq]) if prefix else seq
            mask[row, :n] = 1
        return torch.from_numpy(ids).to(self.torch_device), torch.from_numpy(mask).to(self.torch_device)

    def _rows(self, batch: Sequence[np.ndarray]) -> tuple[torch.Tensor, torch.Tensor]:
        """Flat (batch row, position) indices of the scored positions and each one's next token id (-1: none)."""
        offset = 0 if self.bos_id is None else 1
        rows, cols, nxt = [], [], []
        for r, seq in enumerate(batch):
            n = len(seq)
            rows.append(np.full(n, r))
            cols.append(np.arange(offset, offset + n))
            nxt.append(np.append(seq[1:], -1))
        index = torch.from_numpy(np.stack([np.concatenate(rows), np.concatenate(cols)]))
        return index.to(self.torch_device), torch.from_numpy(np.concatenate(nxt)).to(self.torch_device)

    def _head_logprobs(self, hidden: torch.Tensor, next_ids: torch.Tensor, k: int, is_logits: bool,
                       pairs: GatherPairs | None = None):
        """hidden: (N, H) (or logits (N, V)) -> top-k ids (N, k), top-k log-probs (N, k), next log-probs (N,);
        ``pairs`` takes its log-probs from each chunk."""
        n = hidden.shape[0]
        top_v = torch.empty(n, k, dtype=torch.float32, device=hidden.device)
        top_i = torch.empty(n, k, dtype=torch.int32, device=hidden.device)
        nxt = torch.empty(n, dtype=torch.float32, device=hidden.device)
        for s in range(0, n, self.chunk_tokens):
            e = min(n, s + self.chunk_tokens)
            logits = hidden[s:e] if is_logits else self.head(hidden[s:e])
            logits = logits.float()
            lse = torch.logsumexp(logits, dim=-1)
            v, i = logits.topk(k, dim=-1)
            top_v[s:e], top_i[s:e] = v - lse[:, None], i.int()
            nxt[s:e] = logits.gather(1, next_ids[s:e].clamp_min(0)[:, None]).squeeze(1) - lse
            if pairs is not None:
                pairs.take(logits, lse, s)
        return top_i, top_v, nxt

    @torch.inference_mode()
    def score(self, batch: Sequence[np.ndarray], top_k: int,
              gather: Sequence[Gather | None] | None = None) -> list[ScoreOutput]:
        ids, mask = self._inputs(batch)
        index, next_ids = self._rows(batch)
        lengths = [len(s) for s in batch]
        pairs = GatherPairs.of(lengths, gather, self.vocab_size) if gather is not None else None
        if self.split_head:
            hidden = self._base(input_ids=ids, attention_mask=mask)[0][index[0], index[1]]
        else:  # full logits; rows picked afterwards
            hidden = self.model(input_ids=ids, attention_mask=mask).logits[index[0], index[1]]
        top_i, top_v, nxt = self._head_logprobs(hidden, next_ids, top_k, not self.split_head, pairs)
        top_i, top_v, nxt = top_i.cpu().numpy(), top_v.cpu().numpy(), nxt.cpu().numpy()
        gathered = pairs.split(gather) if pairs is not None and gather is not None else [None] * len(batch)
        bounds = np.cumsum(lengths)[:-1]
        return [
            ScoreOutput(i, v, n[:-1], g)
            for i, v, n, g in zip(np.split(top_i, bounds), np.split(top_v, bounds), np.split(nxt, bounds), gathered,
                                  strict=True)
        ]


def _placement(config: TeacherConfig) -> dict:
    """``from_pretrained`` arguments that shard the model with accelerate (``device_map``), or none."""
    if config.device_map is None:
        return {}
    memory = {int(k) if k.isdigit() else k: int(v) if v.isdigit() else v for k, v in (config.max_memory or {}).items()}
    return {"device_map": config.device_map, "max_memory": memory or None, "offload_folder": config.offload_folder}


def load_hf(config: TeacherConfig) -> tuple[HFBackend, TeacherTokenizer]:
    """Loads model and tokenizer as the config says and returns the ready backend."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    device = resolve_device(config.device)
    dtype = resolve_dtype(config.dtype, device)
    t0 = time.perf_counter()
    extra = {"gguf_file": config.gguf_file} if config.gguf_file else {}
    attn = {} if config.attn_implementation == "auto" else {"attn_implementation": config.attn_implementation}
    tokenizer = AutoTokenizer.from_pretrained(config.tokenizer or config.model, trust_remote_code=config.trust_remote_code,
                                              **extra)
    placement = _placement(config)
    model = AutoModelForCausalLM.from_pretrained(
        config.model, dtype=dtype, trust_remote_code=config.trust_remote_code, **attn, **extra, **placement,
    )
    if not placement:
        model = model.to(device)
    teacher_tok = TeacherTokenizer(tokenizer)
    backend = HFBackend(model, bos_id=teacher_tok.bos_id if config.add_bos else None,
                        chunk_tokens=config.logprob_chunk_tokens, pad_to_multiple_of=config.pad_to_multiple_of,
                        compile=config.compile)
    log.info("model loaded", extra={"fields": {"model": config.model, "architecture": backend.architecture,
                                               "device": backend.device, "dtype": backend.dtype,
                                               "seconds": round(time.perf_counter() - t0, 2)}})
    return backend, teacher_tok
