"""What a run reports: a progress bar (loss, tokens/s, teacher wait), per-step metrics to ``metrics.jsonl``
(always) and to the trackers of ``run.report_to`` (TensorBoard, W&B, trackio), evaluations, and the resolved
config — rank 0 only. Messages go to the ``livefuse`` logger (``protos.logs``: the CLI sets it up), written
above the progress bar while there is one."""

from __future__ import annotations

import importlib.util
import json
import logging
import time
import uuid
from contextlib import ExitStack
from pathlib import Path
from typing import Any, Protocol

from student_trainer.trainer.config import ConfigError
from student_trainer.trainer.stats import StepRecord, summary

log = logging.getLogger("livefuse.trainer")


class Tracker(Protocol):
    """Where metrics go besides metrics.jsonl: one class per tool, which imports its package only when chosen.
    Keys arrive prefixed (``train/loss``, ``eval/student/ppl_token``); the last eval is the run's final one."""

    def log(self, metrics: dict[str, float], step: int) -> None: ...

    def close(self) -> None: ...


class TensorBoardTracker:
    def __init__(self, output_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        from torch.utils.tensorboard import SummaryWriter

        self.writer = SummaryWriter(str(output_dir / "tensorboard"))
        self.writer.add_text("config", f"```json\n{json.dumps(config, indent=2, default=str)}\n```")

    def log(self, metrics: dict[str, float], step: int) -> None:
        for key, value in metrics.items():
            self.writer.add_scalar(key, value, step)

    def close(self) -> None:
        self.writer.close()


class WandbTracker:
    """Weights & Biases; ``WANDB_MODE=offline`` keeps the run on disk (``wandb sync`` uploads it later). A
    resumed training continues the same W&B run (its id is kept in output_dir)."""

    def __init__(self, output_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        import wandb

        self.run = wandb.init(project=project, name=name, id=_run_id(output_dir, "wandb"), resume="allow",
                              config=config, dir=str(output_dir))

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


class TrackioTracker:
    """trackio: local-first (a SQLite file under ``TRACKIO_DIR``; ``trackio show`` opens the dashboard)."""

    def __init__(self, output_dir: Path, project: str, name: str, config: dict[str, Any]) -> None:
        import trackio

        self.run = trackio.init(project=project, name=name, config=config, resume="allow", embed=False)

    def log(self, metrics: dict[str, float], step: int) -> None:
        self.run.log(metrics, step=step)

    def close(self) -> None:
        self.run.finish()


# run.report_to name -> (tracker, the package it imports)
TRACKERS: dict[str, tuple[type, str]] = {"tensorboard": (TensorBoardTracker, "tensorboard"),
                                         "wandb": (WandbTracker, "wandb"), "trackio": (TrackioTracker, "trackio")}


def _run_id(output_dir: Path, tool: str) -> str:
    """A run id kept in output_dir, so a resumed training logs into the same tracker run."""
    path = output_dir / f".{tool}-run-id"
    if not path.exists():
        path.write_text(uuid.uuid4().hex[:16])
    return path.read_text().strip()


def check_trackers(names: list[str]) -> None:
    """Every tracker's package is installed (fails before the model loads, not at the first step)."""
    for name in names:
        package = TRACKERS[name][1]
        if importlib.util.find_spec(package) is None:
            raise ConfigError(f"run.report_to: {name!r} needs the {package} package, which is not installed: "
                             "pip install 'livefuse[track]' (or remove it from run.report_to)")


class RunLogger:
    def __init__(self, output_dir: Path, rank: int, config: Any) -> None:
        self.rank, self.config = rank, config
        self.output_dir = output_dir
        self.active = rank == 0
        self._bar = self._jsonl = None
        self._redirect = ExitStack()  # log lines above the progress bar while it is shown
        self._trackers: list[Tracker] = []
        self._t0 = time.perf_counter()
        self._window: list[StepRecord] = []
        check_trackers(config.run.report_to)  # every rank: a missing package stops them all before they start
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
        """A line for the user, from rank 0 (the other ranks would repeat it)."""
        if self.active:
            log.info(message)

    def start(self, max_steps: int, **facts: Any) -> None:
        if not self.active:
            return
        config = self.config.model_dump()
        self.info(f"config: {json.dumps(config, default=str)}")
        self.info(f"run: {json.dumps({'max_steps': max_steps, **facts}, default=str)}")
        if self.config.run.progress:
            from tqdm import tqdm
            from tqdm.contrib.logging import logging_redirect_tqdm

            self._redirect.enter_context(logging_redirect_tqdm([logging.getLogger("livefuse")]))
            self._bar = tqdm(total=max_steps, desc="train", unit="step", dynamic_ncols=True)
        run = self.config.run
        name = run.run_name or Path(run.output_dir).resolve().name
        self._trackers = [TRACKERS[t][0](self.output_dir, run.project, name, config) for t in run.report_to]
        if self._trackers:
            self.info(f"reporting to {', '.join(run.report_to)} (project {run.project!r}, run {name!r})")

    def _write(self, record: dict[str, Any]) -> None:
        assert self._jsonl is not None, "open_metrics() first"
        self._jsonl.write(json.dumps(record) + "\n")
        self._jsonl.flush()

    def _track(self, prefix: str, metrics: dict[str, float], step: int) -> None:
        for tracker in self._trackers:
            tracker.log({f"{prefix}/{k}": v for k, v in metrics.items()}, step)

    def step(self, record: StepRecord) -> None:
        if not self.active:
            return
        metrics = record.metrics()
        self._write({"step": record.step, "time": round(time.perf_counter() - self._t0, 3), **metrics})
        self._track("train", metrics, record.step)
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
        self._track("eval", metrics, step)
        self.info(f"eval at step {step}: " + ", ".join(f"{k}={v:.4f}" for k, v in sorted(metrics.items())))

    def close(self) -> None:
        for handle in (self._bar, self._jsonl, *self._trackers, self._redirect):
            if handle is not None:
                handle.close()
        self._bar = self._jsonl = None
        self._trackers = []
