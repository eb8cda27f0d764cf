"""What a run reports: a progress bar (loss, tokens/s, teacher wait), per-step metrics to
``metrics.jsonl`` and TensorBoard, evaluations, and the resolved config — rank 0 only."""

from __future__ import annotations

import json
import logging
import sys
import time
from pathlib import Path
from typing import Any

log = logging.getLogger("livefuse.trainer")


class RunLogger:
    def __init__(self, output_dir: Path, rank: int, config: Any) -> None:
        self.rank, self.config = rank, config
        self.output_dir = output_dir
        self.active = rank == 0
        self._bar = self._tb = self._jsonl = None
        self._t0 = time.perf_counter()
        self._window: list[dict[str, Any]] = []
        if self.active:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "config.json").write_text(json.dumps(config.model_dump(), indent=2))
            # a resumed run appends; a fresh one (run.resume=false) starts a new file
            self._jsonl = open(output_dir / "metrics.jsonl", "a" if config.run.resume else "w")  # noqa: SIM115

    def info(self, message: str) -> None:
        if self.active:
            log.info(message)
            if self._bar is not None:
                self._bar.write(f"[livefuse] {message}")
            else:
                print(f"[livefuse] {message}", file=sys.stderr, flush=True)

    def start(self, max_steps: int, **facts: Any) -> None:
        if not self.active:
            return
        self.info(f"config: {json.dumps(self.config.model_dump(), default=str)}")
        self.info(f"run: {json.dumps({'max_steps': max_steps, **facts}, default=str)}")
        if self.config.run.progress:
            from tqdm import tqdm

            self._bar = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True)
        try:
            from torch.utils.tensorboard import SummaryWriter

            self._tb = SummaryWriter(str(self.output_dir / "tensorboard"))
        except ImportError:
            self.info("tensorboard is not installed: metrics go to metrics.jsonl only")

    def _write(self, record: dict[str, Any]) -> None:
        assert self._jsonl is not None
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def step(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        tokens_per_s = metrics["tokens"] / max(metrics["step_seconds"], 1e-9)
        record = {"step": step, "time": round(time.perf_counter() - self._t0, 3), "tokens_per_s": tokens_per_s,
                  **metrics}
        self._write(record)
        if self._tb is not None:
            for key, value in record.items():
                if key != "step":
                    self._tb.add_scalar(f"train/{key}", value, step)
        if self._bar is not None:
            self._bar.update(step - self._bar.n)
            self._bar.set_postfix(loss=f"{metrics['loss']:.3f}", tok_s=f"{tokens_per_s:.0f}",
                                  teacher_wait=f"{metrics['teacher_wait_seconds']:.2f}s")
        if step % self.config.run.log_every == 0 and self._bar is None:
            self.info(f"step {step} loss {metrics['loss']:.4f} clm {metrics['clm_loss']:.4f} "
                      f"fusion {metrics['fusion_loss']:.4f} tok/s {tokens_per_s:.0f}")
        self._window.append(record)
        every = self.config.run.summary_every
        if every and step % every == 0:
            self.info(summary(self._window))
            self._window = []

    def eval(self, step: int, metrics: dict[str, float]) -> None:
        if not self.active:
            return
        self._write({"step": step, "eval": metrics})
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"eval/{key}", value, step)
        self.info(f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def close(self) -> None:
        for handle in (self._bar, self._tb, self._jsonl):
            if handle is not None:
                handle.close()
        self._bar = self._tb = self._jsonl = None


def _mean(records: list[dict[str, Any]], key: str) -> float:
    values = [r[key] for r in records if key in r]
    return sum(values) / len(values) if values else float("nan")


def summary(records: list[dict[str, Any]]) -> str:
    """One text block over the steps since the last summary: the numbers a dashboard would show."""
    steps = f"{records[0]['step']}-{records[-1]['step']}"
    seconds = sum(r["step_seconds"] for r in records)
    wait = sum(r["teacher_wait_seconds"] for r in records)
    lines = [f"summary steps {steps}: loss {_mean(records, 'loss'):.4f} (clm {_mean(records, 'clm_loss'):.4f}, "
             f"fusion {_mean(records, 'fusion_loss'):.4f}), {sum(r['tokens'] for r in records) / max(seconds, 1e-9):.0f} "
             f"tokens/s, waited for teachers {100 * wait / max(seconds, 1e-9):.1f}% of the time, "
             f"aligned positions {100 * _mean(records, 'aligned_share'):.1f}%"]
    sources = sorted({k.split("/", 1)[1] for r in records for k in r if k.startswith("selected/")})
    for name in sources:
        lines.append(f"  source {name}: latency {_mean(records, f'latency/{name}'):.3f}s/micro-batch, "
                     f"CE {_mean(records, f'ce/{name}'):.3f}, selected {100 * _mean(records, f'selected/{name}'):.1f}%, "
                     f"weight {_mean(records, f'weight/{name}'):.3f}, skipped {100 * _mean(records, f'skipped/{name}'):.1f}%")
    return "\n".join(lines)
