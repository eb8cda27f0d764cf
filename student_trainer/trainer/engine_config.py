"""The DeepSpeed config of a run: the paper's defaults under the user's ``train.deepspeed``, merged once
into a typed view that the rest of the trainer reads (never the raw dict by string keys).

Merging is by key, recursively — except the ``optimizer`` and ``scheduler`` blocks: a user block that names a
``type`` other than the default's replaces the default block whole (SGD must not inherit AdamW's ``betas``);
one without a ``type`` (or with the same) refines the default's ``params``. ``scheduler: null`` turns the
schedule off (a constant learning rate). A ``torch.optim`` optimizer (``type: SGD``) is allowed under ZeRO.
"""

from __future__ import annotations

import copy
from dataclasses import dataclass
from typing import Any

from student_trainer.trainer.config import ConfigError

DEEPSPEED_DEFAULTS: dict[str, Any] = {
    "train_micro_batch_size_per_gpu": 2,
    "gradient_accumulation_steps": 1,
    "gradient_clipping": 1.0,
    # 5e7-element buckets (200 MB fp32): DeepSpeed's 5e8 default holds 1.9 GB even for a tiny model
    "zero_optimization": {"stage": 2, "reduce_bucket_size": 50_000_000, "allgather_bucket_size": 50_000_000},
    "bf16": {"enabled": False},
    "optimizer": {"type": "AdamW", "params": {"lr": 1e-5, "betas": [0.9, 0.95], "eps": 1e-8, "weight_decay": 0.1}},
    "scheduler": {"type": "WarmupDecayLR", "params": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto",
                                                      "warmup_num_steps": "auto", "total_num_steps": "auto"}},
    "steps_per_print": 1_000_000_000,
}
TYPED_BLOCKS = ("optimizer", "scheduler")  # a new ``type`` replaces the default block instead of merging into it
ADAM_TYPES = {"adam", "adamw"}  # DeepSpeed's own Adam family: on CPU it must use torch's (``torch_adam``)
# DeepSpeed's own optimizers (lower case); any other ``type`` is a ``torch.optim`` class, which ZeRO calls
# "untested" and refuses unless ``zero_allow_untested_optimizer`` is set (SGD under ZeRO-2 trains: tested)
DEEPSPEED_OPTIMIZERS = {"adam", "adamw", "lamb", "lion", "adagrad", "muon", "onebitadam", "zerooneadam", "onebitlamb"}


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else copy.deepcopy(v)
    return out


def merge_user(defaults: dict[str, Any], user: dict[str, Any]) -> dict[str, Any]:
    """``user`` over ``defaults`` (module docstring: typed blocks are replaced when their type changes)."""
    out = _merge({k: v for k, v in defaults.items() if k not in TYPED_BLOCKS},
                 {k: v for k, v in user.items() if k not in TYPED_BLOCKS})
    for key in TYPED_BLOCKS:
        base, mine = defaults.get(key), user.get(key, {})
        if mine is None:
            continue  # turned off
        if not isinstance(mine, dict):
            raise ConfigError(f"train.deepspeed.{key}: expected a mapping with type and params, got {mine!r}")
        same_type = base is not None and mine.get("type", base["type"]) == base["type"]
        out[key] = _merge(base, mine) if same_type else copy.deepcopy(mine)
        if "type" not in out[key]:
            raise ConfigError(f"train.deepspeed.{key}: needs a type (e.g. {DEEPSPEED_DEFAULTS[key]['type']})")
    return out


@dataclass(frozen=True)
class EngineConfig:
    """The merged DeepSpeed config (``raw``, what ``deepspeed.initialize`` gets once the schedule is filled in)
    and the settings the trainer reads from it."""

    raw: dict[str, Any]

    @property
    def micro_batch(self) -> int:
        return int(self.raw["train_micro_batch_size_per_gpu"])

    @property
    def grad_accum(self) -> int:
        return int(self.raw["gradient_accumulation_steps"])

    @property
    def zero_stage(self) -> int:
        return int(self.raw.get("zero_optimization", {}).get("stage", 0))

    @property
    def bf16(self) -> bool:
        return bool(self.raw.get("bf16", {}).get("enabled", False))

    @property
    def optimizer(self) -> str:
        return str(self.raw["optimizer"]["type"])

    @property
    def lr(self) -> float:
        return float(self.raw["optimizer"].get("params", {}).get("lr", 1e-3))

    def for_run(self, max_steps: int) -> dict[str, Any]:
        """The config ``deepspeed.initialize`` gets: the scheduler's ``auto`` values taken from the run
        (total steps, 0.8% warmup as in the paper, the optimizer's lr)."""
        cfg = copy.deepcopy(self.raw)
        sched = (cfg.get("scheduler") or {}).get("params", {})
        auto = {"total_num_steps": max_steps, "warmup_num_steps": max(1, round(0.008 * max_steps)),
                "warmup_max_lr": self.lr}
        for key, value in auto.items():
            if sched.get(key) == "auto":
                sched[key] = value
        return cfg


def engine_config(user: dict[str, Any], on_gpu: bool) -> EngineConfig:
    """The user's ``train.deepspeed`` over the paper's defaults (AdamW 0.9/0.95, wd 0.1, clip 1.0, ZeRO-2,
    warmup 0.8%); on CPU, DeepSpeed's Adam is torch's (its fused one needs CUDA)."""
    cfg = merge_user(DEEPSPEED_DEFAULTS, user)
    kind = str(cfg["optimizer"]["type"]).lower()
    if not on_gpu and kind in ADAM_TYPES:
        cfg["optimizer"].setdefault("params", {}).setdefault("torch_adam", True)
    if kind not in DEEPSPEED_OPTIMIZERS:
        cfg.setdefault("zero_allow_untested_optimizer", True)
    return EngineConfig(cfg)
