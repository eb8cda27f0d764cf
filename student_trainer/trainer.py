"""The training loop: λ·CLM + (1−λ)·fusion with teacher distributions fetched live, under DeepSpeed.

    livefuse-train --config configs/tiny_cpu.yaml                      # one process
    deepspeed --num_gpus 8 -m student_trainer --config run.yaml        # many GPUs (or torchrun)

One optimizer step = ``gradient_accumulation_steps`` micro-batches. Losses are normalised by the number of
predicted tokens in the whole step, over all micro-batches and ranks.
"""

from __future__ import annotations

import logging
import time
from pathlib import Path

import torch
import torch.distributed as dist

from student_trainer import checkpoint
from student_trainer.config import TrainerConfig
from student_trainer.losses import clm_and_fusion_loss, clm_loss
from student_trainer.prefetch import Prefetcher, Prepared
from student_trainer.run_setup import Run, build_run
from student_trainer.teachers import SourceChanged, SourceFailed

log = logging.getLogger("livefuse.trainer")


def _tensor(x, device: torch.device) -> torch.Tensor:
    return torch.from_numpy(x).to(device)


def micro_loss(run: Run, p: Prepared, num_tokens: float) -> tuple[torch.Tensor, float, float]:
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


def train_step(run: Run, prefetcher: Prefetcher) -> dict[str, float]:
    """One optimizer step over ``gradient_accumulation_steps`` micro-batches; returns step metrics."""
    gas, world = run.engine.gradient_accumulation_steps(), run.world
    window = [prefetcher.get() for _ in range(gas)]  # all fetched before any update: a failure loses nothing
    count = torch.tensor(float(sum(p.loss_mask.sum() for p in window)), device=run.engine.device)
    if world > 1:
        dist.all_reduce(count)
    num_tokens = max(float(count), 1.0) / (gas * world)  # DeepSpeed divides by gas and averages over ranks
    totals = torch.zeros(3, device=run.engine.device)
    for p in window:
        loss, clm, fuse = micro_loss(run, p, num_tokens)
        run.engine.backward(loss)
        run.engine.step()
        totals += torch.tensor([float(loss.detach()), clm, fuse], device=run.engine.device)
    if world > 1:
        dist.all_reduce(totals)
    loss, clm, fuse = (totals / (gas * world)).tolist()  # = sums over the step / global token count
    stats = {k: sum(p.stats.get(k, 0.0) for p in window) for k in window[0].stats}
    sequences = sum(len(p.batch.blocks) for p in window)
    for key in list(stats):  # per-sequence sums -> rates and means
        kind, _, name = key.partition("/")
        if kind in ("selected", "weight", "skipped"):
            stats[key] /= sequences
        elif kind == "ce":
            stats[key] /= max(stats.pop(f"ce_count/{name}"), 1.0)
        elif kind == "latency":
            stats[key] /= gas
    stats["aligned_share"] = stats.get("aligned_share", 0.0) / gas
    return {"loss": loss, "clm_loss": clm, "fusion_loss": fuse, "tokens": float(count), **stats}


def train(config: TrainerConfig) -> dict[str, float]:
    """Runs (or resumes) the configured training; returns the final metrics. Raises SourceFailed/Changed."""
    run = build_run(config)
    ckpt_dir = Path(config.run.output_dir) / "checkpoints"
    step, micro_index = 0, 0
    resumed = checkpoint.load(run.engine, ckpt_dir) if config.run.resume else None
    if resumed is not None:
        step, micro_index = resumed
        run.logger.info(f"resumed from step {step} (micro-batch {micro_index})")
    fusing = run.sources if config.method.lambda_clm < 1.0 else []  # λ = 1: nothing to fetch (eval still uses them)
    prefetcher = Prefetcher(run.sampler.batch, fusing, config.method, micro_index, config.run.prefetch_depth)
    gas = run.engine.gradient_accumulation_steps()
    try:
        while step < run.max_steps:
            t0 = time.perf_counter()
            wait0, lr = prefetcher.wait_seconds, run.engine.get_lr()[0]  # the lr this step uses
            metrics = train_step(run, prefetcher)
            step, micro_index = step + 1, micro_index + gas
            metrics.update(step_seconds=time.perf_counter() - t0, teacher_wait_seconds=prefetcher.wait_seconds - wait0,
                           lr=lr)
            run.logger.step(step, metrics)
            if config.run.checkpoint_every and step % config.run.checkpoint_every == 0:
                checkpoint.save(run.engine, ckpt_dir, step, micro_index)
            if config.run.eval_every and step % config.run.eval_every == 0 and step < run.max_steps:
                run.logger.eval(step, run.evaluate())
    except (SourceFailed, SourceChanged) as err:
        checkpoint.save(run.engine, ckpt_dir, step, micro_index)
        run.logger.info(f"stopped at step {step}: {err}; checkpoint saved, rerun the same command to resume")
        run.close(prefetcher, wait=False)
        raise
    checkpoint.save(run.engine, ckpt_dir, step, micro_index)
    final = run.evaluate()
    run.logger.eval(step, final)
    if config.run.export:
        run.export(Path(config.run.output_dir) / "final")
    run.close(prefetcher)
    return final
