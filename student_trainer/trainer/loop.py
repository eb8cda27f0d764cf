"""The training loop: λ·CLM + (1−λ)·fusion with teacher distributions fetched live, under DeepSpeed.

    livefuse-train --config configs/tiny_cpu.yaml                      # one process
    deepspeed --num_gpus 8 -m student_trainer --config run.yaml        # many GPUs (or torchrun)

One optimizer step = ``gradient_accumulation_steps`` micro-batches: corpus blocks with prefetched teacher
distributions, and with ``on_policy.share`` > 0 some rollouts (the student's own continuations, generated and
scored when their step comes: ``rollouts.py``). Losses are normalised by the number of predicted tokens in the
whole step, over all micro-batches and ranks.
"""

from __future__ import annotations

import time
from pathlib import Path

import torch
import torch.distributed as dist

from student_trainer.core.losses import clm_and_fusion_loss, clm_loss, sparse_divergence
from student_trainer.trainer import checkpoint
from student_trainer.trainer.agreement import SourceError, agreed_failure, failure_flag
from student_trainer.trainer.config import TrainerConfig
from student_trainer.trainer.prefetch import FusedBatch, Prefetcher, waited
from student_trainer.trainer.rollouts import Pending, Rollouts
from student_trainer.trainer.run_setup import Run, build_run
from student_trainer.trainer.sources import SourceChanged, SourceFailed
from student_trainer.trainer.stats import FusionStats, RolloutStats, StepRecord
from student_trainer.trainer.stopping import Interrupted, RunPosition, StopFlag


def _tensor(x, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def micro_loss(run: Run, p: FusedBatch, num_tokens: float) -> tuple[torch.Tensor, float, float]:
    """Loss of one micro-batch (scaled for the step's global token count) and its CLM / fusion parts."""
    device, method = run.engine.device, run.config.method
    ids = _tensor(p.batch.input_ids, device)
    logits = run.engine(input_ids=ids, attention_mask=_tensor(p.batch.attention_mask, device)).logits
    mask = _tensor(p.loss_mask, device)
    if method.lambda_clm >= 1.0 or p.fuse_ids is None:
        clm = clm_loss(logits, ids, mask, num_tokens=num_tokens)
        return clm, float(clm.detach()), 0.0
    loss, clm, fuse = clm_and_fusion_loss(logits, ids, _tensor(p.fuse_ids, device), _tensor(p.fuse_logprobs, device),
                                          mask, lam=method.lambda_clm, temperature=method.temperature,
                                          kind=method.fusion_loss, num_tokens=num_tokens)
    return loss, float(clm), float(fuse)


def rollout_loss(run: Run, p: FusedBatch, num_tokens: float) -> tuple[torch.Tensor, float]:
    """Loss of one rollout micro-batch (scaled for the step's global token count): the divergence between the
    fused teachers and the student at ``p.loss_mask`` (the continuation's positions with a source distribution);
    no CLM term on the student's own text."""
    device, cfg = run.engine.device, run.config.on_policy
    ids = _tensor(p.batch.input_ids, device)
    logits = run.engine(input_ids=ids, attention_mask=_tensor(p.batch.attention_mask, device)).logits
    loss = sparse_divergence(logits, _tensor(p.fuse_ids, device), _tensor(p.fuse_logprobs, device),
                             _tensor(p.loss_mask, device), kind=cfg.divergence, beta=cfg.jsd_beta,
                             num_tokens=num_tokens)
    return loss, float(loss.detach())


def _fetch_corpus(prefetcher: Prefetcher, n: int, stop: StopFlag | None) -> tuple[list[FusedBatch], SourceError | None]:
    """The step's ``n`` corpus micro-batches, or the source error that stopped fetching them (kept, not raised:
    the ranks agree on it first)."""
    window: list[FusedBatch] = []
    try:
        for _ in range(n):
            window.append(prefetcher.get(stop))
    except (SourceFailed, SourceChanged) as err:
        return window, err
    return window, None


def _scored(pending: list[Pending], stop: StopFlag | None) -> tuple[list[FusedBatch], SourceError | None, float, float]:
    """The rollouts' scores (or the source error that stopped one), the seconds waited for them and of those the
    seconds after their teachers had answered."""
    out, wait, fuse_wait = [], 0.0, 0.0
    try:
        for rollout in pending:
            fused, seconds, fusing = waited(rollout.future, stop)
            out, wait, fuse_wait = [*out, fused], wait + seconds, fuse_wait + fusing
    except (SourceFailed, SourceChanged) as err:
        return out, err, wait, fuse_wait
    return out, None, wait, fuse_wait


def _agree(run: Run, tokens: float, stop: StopFlag | None, failure: SourceError | None) -> float:
    """Sums the step's token count over the ranks with a stop request and a source failure flag in the same
    all-reduce; raises the failure (the same one on every rank, see ``agreement``) or Interrupted."""
    count = torch.tensor([tokens, float(bool(stop and stop.requested)), failure_flag(failure)],
                         device=run.engine.device)
    if run.world > 1:
        dist.all_reduce(count)
    if count[2] > 0:
        raise agreed_failure(failure, run.rank, run.world)
    if count[1] > 0:
        raise Interrupted("stop requested")
    return float(count[0])


def _train(run: Run, window: list[FusedBatch], num_tokens: float) -> torch.Tensor:
    """Forward and backward of each micro-batch (DeepSpeed updates after the step's last one); the summed
    [loss, clm, fusion, on-policy] parts."""
    totals = torch.zeros(4, device=run.engine.device)
    for p in window:
        if p.rollout is None:
            loss, clm, fuse = micro_loss(run, p, num_tokens)
            parts = [clm, fuse, 0.0]
        else:
            loss, on_policy = rollout_loss(run, p, num_tokens)
            parts = [0.0, 0.0, on_policy]
        run.engine.backward(loss)
        run.engine.step()
        totals += torch.tensor([float(loss.detach()), *parts], device=run.engine.device)
    return totals


def train_step(run: Run, prefetcher: Prefetcher, stop: StopFlag | None = None, rollouts: Rollouts | None = None,
               first: int = 0) -> StepRecord:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches (the first one is ``first``).

    The rollouts among them are generated first, on every rank alike (ZeRO-3 gathers the parameters of every
    forward collectively) and before anything can fail; each one's scoring starts at once, so the next is
    generated while the previous is scored, and the corpus micro-batches are trained on while the last ones are
    scored. Nothing is updated before every micro-batch is in: the ranks agree on a stop request and on a source
    failure in the same all-reduce as the token count (a rollout's count, its continuation positions, is known
    once it is generated), and again on a failure while the rollouts were scored (see ``agreement``): then no rank
    updates, and every rank raises the same error.
    """
    gas, world = run.engine.gradient_accumulation_steps(), run.world
    stop = stop if world == 1 else None  # more ranks: they agree on a stop in the step's all-reduce
    t0 = time.perf_counter()
    pending = [rollouts.start(m) for m in range(first, first + gas) if rollouts and rollouts.is_rollout(m)]
    generate_seconds = time.perf_counter() - t0 if pending else 0.0
    wait0, fuse0 = prefetcher.wait_seconds, prefetcher.fuse_wait_seconds
    corpus, failure = _fetch_corpus(prefetcher, gas - len(pending), stop)
    corpus_wait, corpus_fuse_wait = prefetcher.wait_seconds - wait0, prefetcher.fuse_wait_seconds - fuse0
    tokens = _agree(run, float(sum(p.loss_mask.sum() for p in corpus) + sum(r.positions for r in pending)),
                    stop, failure)
    num_tokens = max(tokens, 1.0) / (gas * world)  # DeepSpeed divides by gas and averages over ranks
    t1 = time.perf_counter()
    totals = _train(run, corpus, num_tokens)
    train_seconds = time.perf_counter() - t1
    scored, failure, wait, fuse_wait = _scored(pending, stop)
    if pending:  # every rank has the same rollout indices: the same collectives
        _agree(run, 0.0, None, failure)
    t2 = time.perf_counter()
    totals += _train(run, scored, num_tokens)
    train_seconds += time.perf_counter() - t2
    if world > 1:
        dist.all_reduce(totals)
    loss, clm, fuse, on_policy = (totals / (gas * world)).tolist()  # = sums over the step / global token count
    window = corpus + scored
    return StepRecord(0, loss, clm, fuse, tokens, fusion=FusionStats.total([p.stats for p in window]),
                      on_policy_loss=on_policy, generate_seconds=generate_seconds,
                      teacher_wait_seconds=corpus_wait + wait, fuse_wait_seconds=corpus_fuse_wait + fuse_wait,
                      train_seconds=train_seconds,
                      rollouts=sum((p.rollout for p in scored if p.rollout is not None), RolloutStats()))


def _run_steps(run: Run, prefetcher: Prefetcher, at: RunPosition, stop: StopFlag,
               rollouts: Rollouts | None = None) -> None:
    """Steps until ``max_steps``; ``at`` always names the last completed step (for a checkpoint on exit)."""
    cfg, ckpt_dir = run.config.run, Path(run.config.run.output_dir) / "checkpoints"
    gas = run.engine.gradient_accumulation_steps()
    while at.step < run.max_steps:
        t0, lr = time.perf_counter(), run.engine.get_lr()[0]  # the lr this step uses
        record = train_step(run, prefetcher, stop, rollouts, at.micro_index)
        at.step, at.micro_index = at.step + 1, at.micro_index + gas
        record.step, record.lr, record.step_seconds = at.step, lr, time.perf_counter() - t0
        run.logger.step(record)
        if cfg.checkpoint_every and at.step % cfg.checkpoint_every == 0:
            checkpoint.save(run.engine, ckpt_dir, at.step, at.micro_index)
        if cfg.eval_every and at.step % cfg.eval_every == 0 and at.step < run.max_steps:
            run.logger.eval(at.step, run.evaluate())


def train(config: TrainerConfig) -> dict[str, float]:
    """Runs (or resumes) the configured training; returns the final metrics.

    Ctrl-C or SIGTERM stops at the next step boundary, saves a checkpoint and raises ``Interrupted`` (a second
    Ctrl-C stops at once, without one); a source failure saves one and raises ``SourceFailed``/``SourceChanged``.
    Sources, prefetcher and logs are closed on every exit. Rerunning the same command resumes.
    """
    run = build_run(config)
    ckpt_dir = Path(config.run.output_dir) / "checkpoints"
    at, prefetcher, rollouts = RunPosition(), None, None
    with StopFlag() as stop:
        try:
            resumed = checkpoint.load(run.engine, ckpt_dir) if config.run.resume else None
            if resumed is not None:
                at.step, at.micro_index = resumed
                run.logger.info(f"resumed from step {at.step} (micro-batch {at.micro_index})")
            run.logger.open_metrics(after_step=at.step)
            fusing = run.sources if config.method.lambda_clm < 1.0 else []  # λ = 1: nothing to fetch
            run.sampler.seek(at.micro_index)  # a stream skips what a resumed run has trained on
            if config.on_policy.share > 0:
                rollouts = Rollouts(run, run.engine.gradient_accumulation_steps())
            prefetcher = Prefetcher(run.sampler.batch, fusing, config.method, at.micro_index,
                                    config.run.prefetch_depth, rollouts.is_rollout if rollouts else None)
            _run_steps(run, prefetcher, at, stop, rollouts)
            checkpoint.save(run.engine, ckpt_dir, at.step, at.micro_index)
            final = run.evaluate()
            run.logger.eval(at.step, final)
            if config.run.export:
                run.export(Path(config.run.output_dir) / "final")
            return final
        except (SourceFailed, SourceChanged, Interrupted) as err:
            checkpoint.save(run.engine, ckpt_dir, at.step, at.micro_index)
            run.logger.info(f"stopped at step {at.step}: {err}; checkpoint saved, rerun the same command to resume")
            raise
        finally:
            run.close(prefetcher, rollouts)
