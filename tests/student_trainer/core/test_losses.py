"""Sparse losses: equal to the dense reference, chunking-invariant, masked, never a dense target."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.utils._python_dispatch import TorchDispatchMode

from student_trainer.core.losses import (
    DIVERGENCES,
    FUSION_LOSSES,
    clm_and_fusion_loss,
    clm_loss,
    counted_positions,
    sparse_cross_entropy,
    sparse_divergence,
    sparse_kl,
    teacher_probs,
)


def make_batch(seed: int, b: int = 2, t: int = 7, v: int = 11, k: int = 4, dtype=torch.float32):
    """Logits, sparse targets with padding (-inf) and duplicates-free ids, a mask, an empty row."""
    g = torch.Generator().manual_seed(seed)
    logits = (torch.randn(b, t, v, generator=g) * 2).to(dtype).requires_grad_(True)
    ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    lp = torch.log_softmax(torch.randn(b, t, k + 2, generator=g), -1)[..., :k]
    lp[..., -1] = torch.where(torch.rand(b, t, generator=g) < 0.5, float("-inf"), lp[..., -1])
    lp[:, -1] = float("-inf")  # the last position has no target
    mask = torch.rand(b, t, generator=g) < 0.8
    return logits, ids, lp, mask


def dense_reference(logits, ids, lp, mask, temperature: float, kind: str) -> torch.Tensor:
    """The obvious dense computation: a (B, T, V) target distribution, full log-softmax."""
    p = teacher_probs(lp, temperature)
    dense = torch.zeros(logits.shape, dtype=torch.float32).scatter_add_(-1, ids, p)
    logq = torch.log_softmax(logits.float(), -1)
    per_pos = -(dense * logq).sum(-1)
    if kind == "kl":
        per_pos = per_pos + torch.where(dense > 0, dense * dense.clamp_min(1e-30).log(), 0.0).sum(-1)
    counted = mask.clone()
    counted[:, -1] = False  # the last position predicts nothing
    return (per_pos * counted).sum() / max(int(counted.sum()), 1)


def paper_objective(clm: torch.Tensor, fusion: torch.Tensor, lam: float) -> torch.Tensor:
    """The paper's λ·L_CLM + (1−λ)·L_fuse from its two parts, the reference for the one-pass loss."""
    return lam * clm + (1.0 - lam) * fusion


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(sorted(FUSION_LOSSES)), st.floats(0.3, 3.0),
       st.integers(1, 8))
def test_sparse_loss_equals_dense_reference(seed, kind, temperature, chunk):
    logits, ids, lp, mask = make_batch(seed)
    loss = FUSION_LOSSES[kind](logits, ids, lp, mask, temperature=temperature, chunk_size=chunk)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = dense_reference(logits, ids, lp, mask, temperature, kind)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(loss, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_chunked_equals_unchunked():
    logits, ids, lp, mask = make_batch(1, t=33)
    whole = sparse_cross_entropy(logits, ids, lp, mask, chunk_size=1000)
    (g_whole,) = torch.autograd.grad(whole, logits)
    for chunk in (1, 5, 32):
        part = sparse_cross_entropy(logits, ids, lp, mask, chunk_size=chunk)
        (g_part,) = torch.autograd.grad(part, logits)
        assert torch.allclose(part, whole, rtol=1e-6) and torch.allclose(g_part, g_whole, atol=1e-7)


def test_gradcheck_in_double():
    logits, ids, lp, mask = make_batch(2, b=1, t=3, v=5, k=2)
    logits = logits.detach().double().requires_grad_(True)
    assert torch.autograd.gradcheck(lambda z: sparse_cross_entropy(z, ids, lp, mask, chunk_size=2), (logits,))


@settings(max_examples=30, deadline=None)
@given(st.integers(0, 10_000), st.floats(0.2, 5.0))
def test_teacher_probabilities_sum_to_one(seed, temperature):
    _, _, lp, _ = make_batch(seed)
    p = teacher_probs(lp, temperature)
    has_entry = torch.isfinite(lp).any(-1)
    assert torch.allclose(p.sum(-1)[has_entry], torch.ones(int(has_entry.sum())), atol=1e-6)
    assert (p.sum(-1)[~has_entry] == 0).all() and (p[~torch.isfinite(lp)] == 0).all()
    expected = torch.softmax(lp[0, 0] / temperature, -1)
    assert torch.allclose(p[0, 0], expected, atol=1e-6)


def test_all_masked_batch_gives_zero_not_nan():
    logits, ids, lp, mask = make_batch(3)
    for loss_fn in FUSION_LOSSES.values():
        loss = loss_fn(logits, ids, lp, torch.zeros_like(mask))
        (grad,) = torch.autograd.grad(loss, logits)
        assert loss.item() == 0.0 and torch.equal(grad, torch.zeros_like(grad))
    empty = torch.full_like(lp, float("-inf"))
    assert sparse_cross_entropy(logits, ids, empty, mask).item() == 0.0


def test_normalised_by_token_count_or_global_count():
    logits, ids, lp, mask = make_batch(4)
    counted = int(counted_positions(mask).sum())
    mean = sparse_cross_entropy(logits, ids, lp, mask)
    total = sparse_cross_entropy(logits, ids, lp, mask, num_tokens=1)
    assert torch.allclose(total / counted, mean)
    assert torch.allclose(sparse_cross_entropy(logits, ids, lp, mask, num_tokens=4 * counted), mean / 4)


def test_bf16_logits_are_computed_in_fp32():
    logits, ids, lp, mask = make_batch(5, dtype=torch.bfloat16)
    loss = sparse_cross_entropy(logits, ids, lp, mask)
    (grad,) = torch.autograd.grad(loss, logits)
    ref = dense_reference(logits.detach().float(), ids, lp, mask, 1.0, "ce")
    assert loss.dtype == torch.float32 and grad.dtype == torch.bfloat16
    assert torch.allclose(loss, ref, rtol=1e-6)


def test_kl_is_zero_when_student_matches_teacher():
    v = 6
    ids = torch.tensor([[[0, 3, 5]]])
    lp = torch.log(torch.tensor([[[0.5, 0.3, 0.2]]]))
    logits = torch.full((1, 1, v), -1e4)
    logits[0, 0, ids[0, 0]] = lp[0, 0]
    assert abs(sparse_kl(logits, ids, lp, torch.ones(1, 1, dtype=torch.bool)).item()) < 1e-6


class _BigTensors(TorchDispatchMode):
    """Counts new tensors (not views of an input) with at least ``limit`` elements."""

    def __init__(self, limit: int):
        super().__init__()
        self.limit, self.count = limit, 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        inputs = {a.untyped_storage().data_ptr() for a in args if isinstance(a, torch.Tensor)}
        outs = out if isinstance(out, tuple | list) else (out,)
        self.count += sum(isinstance(o, torch.Tensor) and o.numel() >= self.limit
                          and o.untyped_storage().data_ptr() not in inputs for o in outs)
        return out


def test_loss_never_allocates_a_dense_target():
    """Defect: the original built [seq × vocab] targets. Forward makes no (B, T, V)-sized tensor;
    backward makes exactly one, the logits' gradient. The dense reference trips the same counter."""
    b, t, v, chunk = 2, 64, 50, 8
    logits, ids, lp, mask = make_batch(6, b=b, t=t, v=v)
    with _BigTensors(b * t * v) as fwd:
        loss = sparse_cross_entropy(logits, ids, lp, mask, chunk_size=chunk)
    with _BigTensors(b * t * v) as bwd:
        loss.backward()
    assert fwd.count == 0 and bwd.count == 1
    with _BigTensors(b * t * v) as dense:
        dense_reference(logits, ids, lp, mask, 1.0, "ce")
    assert dense.count >= 2


def test_clm_loss_predicts_the_next_token():
    logits, _, _, _ = make_batch(7)
    tokens = torch.randint(0, logits.shape[-1], logits.shape[:2], generator=torch.Generator().manual_seed(0))
    mask = torch.ones(tokens.shape, dtype=torch.bool)
    ref = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]).float(), tokens[:, 1:].reshape(-1))
    assert torch.allclose(clm_loss(logits, tokens, mask, chunk_size=3), ref, rtol=1e-6)


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(sorted(FUSION_LOSSES)), st.sampled_from([0.0, 0.3, 0.9, 1.0]),
       st.floats(0.5, 2.0), st.integers(1, 8))
def test_one_pass_objective_equals_the_two_losses(seed, kind, lam, temperature, chunk):
    """λ·CLM + (1−λ)·fusion computed in one pass equals the separate losses, in value and gradient."""
    logits, ids, lp, mask = make_batch(seed)
    tokens = torch.randint(0, logits.shape[-1], logits.shape[:2], generator=torch.Generator().manual_seed(seed))
    mask[:, -1] = False
    n = float(mask.sum())
    total, clm, fuse = clm_and_fusion_loss(logits, tokens, ids, lp, mask, lam=lam, temperature=temperature,
                                           kind=kind, chunk_size=chunk, num_tokens=n)
    (grad,) = torch.autograd.grad(total, logits)
    ref_clm = clm_loss(logits, tokens, mask, chunk_size=chunk, num_tokens=n)
    ref_fuse = FUSION_LOSSES[kind](logits, ids, lp, mask, temperature=temperature, chunk_size=chunk, num_tokens=n)
    ref = paper_objective(ref_clm, ref_fuse, lam)
    (ref_grad,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(total, ref, rtol=1e-5, atol=1e-6)
    assert torch.allclose(clm, ref_clm, rtol=1e-5, atol=1e-6) and torch.allclose(fuse, ref_fuse, rtol=1e-5, atol=1e-6)
    assert torch.allclose(grad, ref_grad, rtol=1e-4, atol=1e-6)


def test_one_pass_objective_makes_one_logits_sized_gradient_not_two():
    b, t, v = 2, 64, 50
    logits, ids, lp, mask = make_batch(3, b=b, t=t, v=v)
    tokens = torch.randint(0, v, (b, t), generator=torch.Generator().manual_seed(1))
    total, _, _ = clm_and_fusion_loss(logits, tokens, ids, lp, mask, lam=0.9, chunk_size=8)
    with _BigTensors(b * t * v) as one_pass:
        total.backward()
    separate = paper_objective(clm_loss(logits, tokens, mask, chunk_size=8),
                             sparse_cross_entropy(logits, ids, lp, mask, chunk_size=8), 0.9)
    with _BigTensors(b * t * v) as two_losses:
        separate.backward()
    assert one_pass.count == 1 and two_losses.count >= 2


@settings(max_examples=20, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(sorted(FUSION_LOSSES)), st.sampled_from([0.3, 0.9]))
def test_every_loss_counts_the_same_positions(seed, kind, lam):
    """CLM, soft CE and KL average over one set of positions (mask, not the last), also where a teacher row is
    empty: the one-pass parts equal the separate losses each normalised by its own count."""
    logits, ids, lp, mask = make_batch(seed, t=9)
    mask[:, 2] = True
    lp[:, 2] = float("-inf")  # a counted position without a teacher distribution
    mask[:, -1] = True  # the last position is never counted, whatever the mask says
    tokens = torch.randint(0, logits.shape[-1], logits.shape[:2], generator=torch.Generator().manual_seed(seed))
    _, clm, fuse = clm_and_fusion_loss(logits, tokens, ids, lp, mask, lam=lam, kind=kind)
    assert torch.allclose(clm, clm_loss(logits, tokens, mask), rtol=1e-5, atol=1e-6)
    assert torch.allclose(fuse, FUSION_LOSSES[kind](logits, ids, lp, mask), rtol=1e-5, atol=1e-6)
    expected = mask.clone()
    expected[:, -1] = False
    assert torch.equal(counted_positions(mask), expected)


def _dense_divergence(logits, teacher_lp_dense, known, mask, kind, beta):
    """Reference: a (V,)-dense teacher and student, the ids outside ``known`` lumped into one tail bucket,
    per position in plain Python."""
    logq = torch.log_softmax(logits.float(), -1)
    total, count = torch.zeros(()), 0
    for b in range(logits.shape[0]):
        for t in range(logits.shape[1] - 1):
            if not mask[b, t]:
                continue
            ids = known[b][t]
            p = torch.cat([teacher_lp_dense[b, t, ids].exp(), (1 - teacher_lp_dense[b, t, ids].exp().sum()).reshape(1)])
            q = torch.cat([logq[b, t, ids].exp(), (1 - logq[b, t, ids].exp().sum()).reshape(1)])
            p, q = p.clamp_min(1e-6), q.clamp_min(1e-6)
            kl = lambda a, c: (a * (a.log() - c.log())).sum()  # noqa: E731
            m = beta * p + (1 - beta) * q
            total = total + {"forward_kl": kl(p, q), "reverse_kl": kl(q, p),
                             "jsd": beta * kl(p, m) + (1 - beta) * kl(q, m)}[kind]
            count += 1
    return total / max(count, 1)


@settings(max_examples=25, deadline=None)
@given(st.integers(0, 10_000), st.sampled_from(list(DIVERGENCES)), st.floats(0.1, 0.9), st.booleans())
def test_divergences_equal_the_dense_reference_with_a_tail_bucket(seed, kind, beta, whole_vocabulary):
    g = torch.Generator().manual_seed(seed)
    b, t, v, k = 2, 5, 9, 4
    logits = (torch.randn(b, t, v, generator=g) * 2).requires_grad_(True)
    teacher = torch.log_softmax(torch.randn(b, t, v, generator=g) * 2, -1)
    if whole_vocabulary:  # every id known: no tail, the exact full-vocabulary divergences
        ids = torch.arange(v).expand(b, t, v).clone()
    else:
        ids = torch.stack([torch.randperm(v, generator=g)[:k] for _ in range(b * t)]).view(b, t, k)
    lp = teacher.gather(-1, ids)
    lp[0, 1, -1] = float("-inf")  # an absent entry: its mass is in the tail
    mask = torch.rand(b, t, generator=g) < 0.8
    known = [[ids[i, j][torch.isfinite(lp[i, j])] for j in range(t)] for i in range(b)]
    got = sparse_divergence(logits, ids, lp, mask, kind=kind, beta=beta)
    ref = _dense_divergence(logits, teacher, known, mask, kind, beta)
    assert torch.allclose(got, ref, rtol=1e-4, atol=1e-6)
    (g_got,) = torch.autograd.grad(got, logits)
    (g_ref,) = torch.autograd.grad(ref, logits)
    assert torch.allclose(g_got, g_ref, rtol=1e-3, atol=1e-6)
    if whole_vocabulary and kind != "jsd":
        p, logq = teacher.exp(), torch.log_softmax(logits.float(), -1)
        dense = (p * (teacher - logq)).sum(-1) if kind == "forward_kl" else (logq.exp() * (logq - teacher)).sum(-1)
        counted = counted_positions(mask)
        assert torch.allclose(got, (dense * counted).sum() / counted.sum(), rtol=1e-4, atol=1e-6)


def test_divergences_vanish_when_the_student_is_the_teacher_and_refuse_bad_settings():
    logits = torch.randn(1, 3, 7)
    ids = torch.tensor([[[0, 2, 5]] * 3])
    lp = torch.log_softmax(logits, -1).gather(-1, ids)
    for kind in DIVERGENCES:
        assert abs(sparse_divergence(logits, ids, lp, torch.ones(1, 3, dtype=torch.bool), kind=kind).item()) < 1e-6
    with pytest.raises(ValueError, match="unknown divergence 'kl2'; valid: forward_kl, reverse_kl, jsd"):
        sparse_divergence(logits, ids, lp, torch.ones(1, 3, dtype=torch.bool), kind="kl2")
    with pytest.raises(ValueError, match="jsd needs 0 < beta < 1"):
        sparse_divergence(logits, ids, lp, torch.ones(1, 3, dtype=torch.bool), kind="jsd", beta=1.0)
