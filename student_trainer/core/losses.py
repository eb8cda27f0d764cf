"""Losses on sparse teacher targets: ``L = λ·L_CLM + (1−λ)·L_fuse``, never a dense (B, T, V) target.

Pure torch. The teacher side is ``ids (B, T, K)`` + ``logprobs (B, T, K)`` (temperature-1 log-probs,
``-inf`` = no entry); the student side is ``logits (B, T, V)``. The loss gathers the student's
log-softmax at the K kept ids. Forward and backward both run over chunks of T in fp32, and the
backward recomputes the softmax per chunk instead of keeping it, so extra memory is one
``(B, chunk, V)`` fp32 block; the only (B, T, V) tensor made is the logits' gradient itself.

Numerics: fp32; teacher probabilities are softmax(logprobs/τ) renormalised over the kept entries. Every
loss here averages over the same positions (:func:`counted_positions`): set in ``mask`` and not the last
of the sequence (position t predicts token t+1). The sum is divided by the number of counted positions (or
by ``num_tokens``, the global count under gradient accumulation); a counted position whose teacher row is
empty adds 0 to a fusion loss (the trainer never sends one: unaligned positions get the one-hot fallback);
an all-masked batch gives 0, not NaN.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

DEFAULT_CHUNK = 256
TAIL_FLOOR = 1e-6  # least mass a tail bucket holds (a teacher whose known ids sum to 1 leaves none)
DIVERGENCES = ("forward_kl", "reverse_kl", "jsd")  # sparse_divergence's kinds (on-policy fusion)


def teacher_probs(logprobs: torch.Tensor, temperature: float = 1.0) -> torch.Tensor:
    """softmax(logprobs/τ) over the finite entries of each row, fp32; an empty row gives zeros.

    ``logprobs (..., K)`` → ``(..., K)``.
    """
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0, got {temperature}")
    z = logprobs.float() / temperature
    empty = ~torch.isfinite(z).any(dim=-1, keepdim=True)
    z = z.masked_fill(empty, 0.0)
    return torch.softmax(z, dim=-1).masked_fill(empty, 0.0)


def _upcast(x: torch.Tensor) -> torch.Tensor:
    """At least fp32 (bf16/fp16 logits are computed in fp32; fp64 stays fp64)."""
    return x.float() if x.element_size() < 4 else x


class _SparseCrossEntropy(torch.autograd.Function):
    """Σ_positions w · (−Σ_k c_k·P_k · log softmax(z)[ids_k]), chunked over T in forward and backward.

    Entries ``[:split]`` are scaled by c = ``lam``, the rest by c = 1 − ``lam`` (split = 0: one plain
    soft CE). Returns the scaled total (differentiable) and the two unscaled parts (for logging), so
    λ·CLM + (1−λ)·fusion is one pass over the logits with one (B, T, V) gradient.
    """

    @staticmethod
    def forward(ctx, logits: torch.Tensor, ids: torch.Tensor, probs: torch.Tensor, weight: torch.Tensor,
                chunk: int, split: int = 0, lam: float = 0.0):
        parts = _upcast(logits.new_zeros(2))
        for s in range(0, logits.shape[1], chunk):
            z = _upcast(logits[:, s:s + chunk])
            logq = z.gather(-1, ids[:, s:s + chunk]) - torch.logsumexp(z, dim=-1, keepdim=True)
            nll = -(probs[:, s:s + chunk] * logq) * weight[:, s:s + chunk].unsqueeze(-1)
            parts[0] += nll[..., :split].sum()
            parts[1] += nll[..., split:].sum()
        ctx.save_for_backward(logits, ids, probs, weight)
        ctx.chunk, ctx.split, ctx.lam = chunk, split, lam
        total = lam * parts[0] + (1.0 - lam) * parts[1] if split else parts[1].clone()
        ctx.mark_non_differentiable(parts)
        return total, parts

    @staticmethod
    def backward(ctx, grad: torch.Tensor, _grad_parts: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        logits, ids, probs, weight = ctx.saved_tensors
        if ctx.split:
            scale = torch.full((probs.shape[-1],), 1.0 - ctx.lam, dtype=probs.dtype, device=probs.device)
            scale[:ctx.split] = ctx.lam
            probs = probs * scale
        out = torch.empty_like(logits)
        for s in range(0, logits.shape[1], ctx.chunk):
            sl = slice(s, s + ctx.chunk)
            p, w = probs[:, sl], weight[:, sl] * grad
            g = torch.softmax(_upcast(logits[:, sl]), dim=-1) * p.sum(-1, keepdim=True)
            g.scatter_add_(-1, ids[:, sl], -p.to(g.dtype))
            out[:, sl] = (g * w.unsqueeze(-1)).to(logits.dtype)
        return out, None, None, None, None, None, None


def counted_positions(mask: torch.Tensor) -> torch.Tensor:
    """The positions every loss averages over, ``(B, T) bool``: set in ``mask`` and not the last one (it has
    no next token to predict). The one definition: CLM, soft CE and KL parts count the same positions."""
    counted = mask.bool().clone()
    counted[:, -1] = False
    return counted


def _weights(mask: torch.Tensor, num_tokens: float | None) -> torch.Tensor:
    """Per-position weight ``(B, T)``: counted positions over the normaliser, 0 elsewhere."""
    counted = counted_positions(mask)
    denom = float(counted.sum()) if num_tokens is None else float(num_tokens)
    return counted.float() / max(denom, 1.0)


def _next_tokens(input_ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """The gold next token of every position as a one-entry sparse target: ``ids (B, T, 1)`` and probabilities
    ``(B, T, 1)`` (1 where there is a next token; the last position has none)."""
    ids = torch.zeros(input_ids.shape + (1,), dtype=torch.long, device=input_ids.device)
    ids[:, :-1, 0] = input_ids[:, 1:]
    probs = torch.zeros(ids.shape, dtype=torch.float32, device=input_ids.device)
    probs[:, :-1] = 1.0
    return ids, probs


def _entropy(probs: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Σ_positions w · H(P): what separates the forward KL from the soft CE (it has no gradient)."""
    plogp = torch.where(probs > 0, probs * torch.log(probs.clamp_min(1e-30)), torch.zeros_like(probs))
    return -(plogp.sum(-1) * weight).sum()


def sparse_cross_entropy(logits: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor,
                         mask: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
                         num_tokens: float | None = None) -> torch.Tensor:
    """Soft cross-entropy −Σ P·log q, averaged over counted positions. Returns a scalar fp32 tensor.

    ``logits (B, T, V)``, ``target_ids (B, T, K)`` int64, ``target_logprobs (B, T, K)``,
    ``mask (B, T)`` bool (False = ignore, e.g. padding).
    """
    probs = teacher_probs(target_logprobs, temperature)
    return _SparseCrossEntropy.apply(logits, target_ids.long(), probs, _weights(mask, num_tokens), chunk_size)[0]


def sparse_kl(logits: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor,
              mask: torch.Tensor, *, temperature: float = 1.0, chunk_size: int = DEFAULT_CHUNK,
              num_tokens: float | None = None) -> torch.Tensor:
    """Forward KL(P ‖ q) = soft CE − H(P); same gradient as the soft CE, 0 when q matches P on its ids."""
    probs = teacher_probs(target_logprobs, temperature)
    weight = _weights(mask, num_tokens)
    return _SparseCrossEntropy.apply(logits, target_ids.long(), probs, weight, chunk_size)[0] - _entropy(probs, weight)


def clm_loss(logits: torch.Tensor, input_ids: torch.Tensor, mask: torch.Tensor, *,
             chunk_size: int = DEFAULT_CHUNK, num_tokens: float | None = None) -> torch.Tensor:
    """Next-token cross-entropy: position i predicts ``input_ids[:, i+1]``; the last position is unused.

    ``logits (B, T, V)``, ``input_ids (B, T)``, ``mask (B, T)`` on the predicting positions.
    """
    ids, probs = _next_tokens(input_ids)
    return _SparseCrossEntropy.apply(logits, ids, probs, _weights(mask, num_tokens), chunk_size)[0]


def clm_and_fusion_loss(logits: torch.Tensor, input_ids: torch.Tensor, target_ids: torch.Tensor,
                        target_logprobs: torch.Tensor, mask: torch.Tensor, *, lam: float = 0.9,
                        temperature: float = 1.0, kind: str = "ce", chunk_size: int = DEFAULT_CHUNK,
                        num_tokens: float | None = None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """λ·CLM + (1−λ)·fusion in one pass: the gold next token is entry 0 of a (K+1)-wide sparse target.

    Equal to ``λ·clm_loss(...) + (1−λ)·sparse_cross_entropy(...)`` (or ``sparse_kl``) when both
    parts are normalised by the same ``num_tokens`` (the trainer's case), with one (B, T, V) gradient
    instead of two. Returns (total, clm, fusion); the last two are detached, for logging.
    ``logits (B, T, V)``, ``input_ids (B, T)``, ``target_ids``/``target_logprobs (B, T, K)``, ``mask (B, T)``.
    """
    if kind not in FUSION_LOSSES:
        raise ValueError(f"unknown fusion loss {kind!r}; valid: {sorted(FUSION_LOSSES)}")
    if not 0.0 <= lam <= 1.0:
        raise ValueError(f"lambda must be in [0, 1], got {lam}")
    gold_ids, gold_p = _next_tokens(input_ids)
    teacher = teacher_probs(target_logprobs, temperature)
    weight = _weights(mask, num_tokens)
    ids = torch.cat([gold_ids, target_ids.long()], dim=-1)
    probs = torch.cat([gold_p.to(teacher.dtype), teacher], dim=-1)
    total, parts = _SparseCrossEntropy.apply(logits, ids, probs, weight, chunk_size, 1, lam)
    fusion = parts[1]
    if kind == "kl":  # KL = CE − H(P); H(P) has no gradient
        entropy = _entropy(teacher, weight)
        total, fusion = total - (1.0 - lam) * entropy, fusion - entropy
    return total, parts[0], fusion


def _tail(probs: torch.Tensor) -> torch.Tensor:
    """The mass a distribution puts outside its known ids, ``(..., 1)``, floored so its log stays finite."""
    return (1.0 - probs.sum(-1, keepdim=True)).clamp_min(TAIL_FLOOR)


def _kl_terms(p: torch.Tensor, logp: torch.Tensor, logq: torch.Tensor) -> torch.Tensor:
    """Σ p (log p − log q) over the last axis; entries with p = 0 add 0."""
    return torch.where(p > 0, p * (logp - logq), torch.zeros_like(p)).sum(-1)


def sparse_divergence(logits: torch.Tensor, target_ids: torch.Tensor, target_logprobs: torch.Tensor,
                      mask: torch.Tensor, *, kind: str = "forward_kl", beta: float = 0.5,
                      num_tokens: float | None = None) -> torch.Tensor:
    """Teacher-student divergence at each position over the teacher's known ids plus one tail bucket.

    On-policy fusion (GKD, Agarwal et al. 2024): ``target_logprobs (B, T, K)`` are the teacher's *true*
    log-probs (temperature 1, not renormalised) at ``target_ids (B, T, K)`` — its top-k and the ids gathered
    at the student's candidates — with ``-inf`` for no entry; ``logits (B, T, V)`` the student's. Each side is a
    proper distribution over those ids and one bucket for the rest of the vocabulary (TRL's tail bucket), the
    student's from its full log-softmax. ``kind``: ``forward_kl`` KL(p_T ‖ p_S), ``reverse_kl`` KL(p_S ‖ p_T),
    ``jsd`` β·KL(p_T ‖ m) + (1−β)·KL(p_S ‖ m) with m = β·p_T + (1−β)·p_S. Averaged over
    :func:`counted_positions` (or divided by ``num_tokens``); no ``(B, T, V)`` tensor beyond the log-softmax's
    normaliser and the logits' gradient.
    """
    if kind not in DIVERGENCES:
        raise ValueError(f"unknown divergence {kind!r}; valid: {', '.join(DIVERGENCES)}")
    if kind == "jsd" and not 0.0 < beta < 1.0:
        raise ValueError(f"jsd needs 0 < beta < 1 (its limits are forward_kl and reverse_kl), got {beta}")
    z = _upcast(logits)
    present = torch.isfinite(target_logprobs)
    ids = target_ids.long().masked_fill(~present, 0)
    logq = (z.gather(-1, ids) - torch.logsumexp(z, dim=-1, keepdim=True)).masked_fill(~present, float("-inf"))
    logp = target_logprobs.float().masked_fill(~present, float("-inf"))
    p, q = torch.exp(logp), torch.exp(logq)
    p_all, q_all = torch.cat([p, _tail(p)], -1), torch.cat([q, _tail(q)], -1)
    logp_all, logq_all = torch.log(p_all.clamp_min(1e-30)), torch.log(q_all.clamp_min(1e-30))
    if kind == "forward_kl":
        per_pos = _kl_terms(p_all, logp_all, logq_all)
    elif kind == "reverse_kl":
        per_pos = _kl_terms(q_all, logq_all, logp_all)
    else:
        m = beta * p_all + (1.0 - beta) * q_all
        logm = torch.log(m.clamp_min(1e-30))
        per_pos = beta * _kl_terms(p_all, logp_all, logm) + (1.0 - beta) * _kl_terms(q_all, logq_all, logm)
    return (per_pos * _weights(mask, num_tokens)).sum()


FusionLoss = Callable[..., torch.Tensor]
FUSION_LOSSES: dict[str, FusionLoss] = {"ce": sparse_cross_entropy, "kl": sparse_kl}
