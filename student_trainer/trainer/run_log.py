"""What a run reports: a progress bar (loss, tokens/s, teacher wait), per-step metrics to
``metrics.jsonl`` and TensorBoard, evaluations, and the resolved config — rank 0 only."""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path
from typing import Any

from student_trainer.trainer.stats import StepRecord, summary


class RunLogger:
    def __init__(self, output_dir: Path, rank: int, config: Any) -> None:
        self.rank, self.config = rank, config
        self.output_dir = output_dir
        self.active = rank == 0
        self._bar = self._tb = self._jsonl = None
        self._t0 = time.perf_counter()
        self._window: list[StepRecord] = []
        if self.active:
            output_dir.mkdir(parents=True, exist_ok=True)
            (output_dir / "config.json").write_text(json.dumps(config.model_dump(), indent=2))

    def open_metrics(self, after_step: int) -> None:
        """Opens metrics.jsonl for appending, keeping only the records up to ``after_step`` (the step the run
        resumes from; 0 for a fresh run): steps redone after a resume appear once."""
        if not self.active:
            return
        path = self.output_dir / "metrics.jsonl"
        kept = [line for line in (path.read_text().splitlines() if path.exists() else [])
                if line.strip() and json.loads(line).get("step", 0) <= after_step]
        tmp = path.with_suffix(".jsonl.tmp")
        tmp.write_text("".join(line + "\n" for line in kept))
        tmp.replace(path)
        self._jsonl = open(path, "a")  # noqa: SIM115

    def info(self, message: str) -> None:
        """A line for the user on rank 0 (above the progress bar when there is one)."""
        if self.active:
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
        assert self._jsonl is not None, "open_metrics() first"
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def step(self, record: StepRecord) -> None:
        if not self.active:
            return
        metrics = record.metrics()
        self._write({"step": record.step, "time": round(time.perf_counter() - self._t0, 3), **metrics})
        if self._tb is not None:
            for key, value in metrics.items():
                self._tb.add_scalar(f"train/{key}", value, record.step)
        if self._bar is not None:
            self._bar.update(record.step - self._bar.n)
            self._bar.set_postfix(loss=f"{record.loss:.3f}", tok_s=f"{record.tokens_per_s:.0f}",
                                  teacher_wait=f"{record.teacher_wait_seconds:.2f}s")
        if record.step % self.config.run.log_every == 0 and self._bar is None:
            self.info(f"step {record.step} loss {record.loss:.4f} clm {record.clm_loss:.4f} "
                      f"fusion {record.fusion_loss:.4f} tok/s {record.tokens_per_s:.0f}")
        self._window.append(record)
        every = self.config.run.summary_every
        if every and record.step % every == 0:
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
