"""Everything a training run needs before its first step: distributed setup, target model and tokenizer,
data, teacher connections, the DeepSpeed engine, logging. ``trainer.py`` holds the loop itself."""

from __future__ import annotations

import copy
import os
import socket
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist

from protos.vocabulary import raw_vocab, tokenizer_fingerprint
from student_trainer.trainer import evaluation
from student_trainer.trainer.config import TrainerConfig
from student_trainer.trainer.data import Block, BlockSampler, make_blocks, read_documents, split_documents
from student_trainer.trainer.extensions import clear_stale_locks
from student_trainer.trainer.prefetch import Prefetcher
from student_trainer.trainer.run_log import RunLogger
from student_trainer.trainer.sources import Source
from student_trainer.trainer.vocab_cache import default_cache_dir

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


def _merge(base: dict[str, Any], over: dict[str, Any]) -> dict[str, Any]:
    out = copy.deepcopy(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def deepspeed_config(user: dict[str, Any], max_steps: int, on_gpu: bool) -> dict[str, Any]:
    """User settings over the paper's defaults (AdamW 0.9/0.95, wd 0.1, clip 1.0, ZeRO-2, warmup 0.8%)."""
    cfg = _merge(DEEPSPEED_DEFAULTS, user)
    opt = cfg.get("optimizer", {}).get("params", {})
    if not on_gpu:
        opt.setdefault("torch_adam", True)  # DeepSpeed's fused Adam needs CUDA
    sched = cfg.get("scheduler", {}).get("params", {})
    auto = {"total_num_steps": max_steps, "warmup_num_steps": max(1, round(0.008 * max_steps)),
            "warmup_max_lr": opt.get("lr", 1e-5)}
    for key, value in auto.items():
        if sched.get(key) == "auto":
            sched[key] = value
    return cfg


def init_distributed() -> tuple[int, int]:
    """Joins the process group the launcher set up, or makes a one-process group; returns (rank, world)."""
    import deepspeed

    if "RANK" not in os.environ:  # plain `livefuse-train`: a group of one (DeepSpeed reads these later too)
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
        os.environ.update(RANK="0", WORLD_SIZE="1", LOCAL_RANK="0", MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    if not dist.is_initialized():
        deepspeed.init_distributed(dist_backend="nccl" if torch.cuda.is_available() else "gloo")
    return dist.get_rank(), dist.get_world_size()


@dataclass
class Run:
    config: TrainerConfig
    engine: Any
    tokenizer: Any
    sampler: BlockSampler
    val_blocks: list[Block]
    sources: list[Source]
    logger: RunLogger
    rank: int
    world: int
    max_steps: int
    _source_eval: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate(self) -> dict[str, float]:
        """Student and sources on this rank's share of the held-out blocks, summed over ranks."""
        blocks = self.val_blocks[: self.config.run.eval_blocks][self.rank::self.world]
        micro = self.engine.train_micro_batch_size_per_gpu()
        out = {f"student/{k}": v for k, v in self._reduced(
            evaluation.nll_sums(self.engine, blocks, self.tokenizer.pad_token_id, micro)).items()}
        for source in self.sources:
            if source.name not in self._source_eval:  # teachers are frozen: score the held-out text once
                self._source_eval[source.name] = evaluation.source_sums(source, blocks)
            out.update({f"{source.name}/{k}": v for k, v in self._reduced(self._source_eval[source.name]).items()})
        return out

    def _reduced(self, sums: np.ndarray) -> dict[str, float]:
        if self.world > 1:
            t = torch.tensor(sums, dtype=torch.float64, device=self.engine.device)
            dist.all_reduce(t)
            sums = t.cpu().numpy()
        return evaluation.summarise(sums)

    def export(self, folder: Path) -> None:
        """save_pretrained (model + tokenizer) that plain transformers loads; gathers ZeRO-3 shards."""
        import deepspeed

        model = self.engine.module
        params = list(model.parameters())
        with deepspeed.zero.GatheredParameters(params, modifier_rank=None, enabled=self.engine.zero_optimization_stage() == 3):
            if self.rank == 0:
                model.save_pretrained(folder)
                self.tokenizer.save_pretrained(folder)
        if self.world > 1:
            dist.barrier()
        self.logger.info(f"exported the trained model to {folder}")

    def close(self, prefetcher: Prefetcher | None = None) -> None:
        """Stops prefetching, closes every source (in-flight fetches end at once) and the logs."""
        if prefetcher is not None:
            prefetcher.close()
        for source in self.sources:
            source.close()
        if prefetcher is not None:
            prefetcher.join()
        self.logger.close()


def _load_target(config: TrainerConfig):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(config.target.tokenizer or config.target.model)
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(f"target.tokenizer: {type(tokenizer).__name__} is not a fast (Rust) tokenizer; the "
                         "trainer needs character offsets (save the tokenizer with a tokenizer.json)")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token or tokenizer.convert_ids_to_tokens(0)
    model = AutoModelForCausalLM.from_pretrained(config.target.model, dtype=getattr(torch, config.target.dtype))
    return tokenizer, model


def _data(config: TrainerConfig, tokenizer) -> tuple[list[Block], list[Block]]:
    d = config.data
    docs = read_documents(d.train_files, d.text_field)
    if d.validation_files:
        train_docs, val_docs = docs, read_documents(d.validation_files, d.text_field)
    else:
        train_docs, val_docs = split_documents(docs, d.validation_fraction, d.shuffle_seed)
    return (make_blocks(train_docs, tokenizer, d.seq_len, d.min_block_tokens),
            make_blocks(val_docs, tokenizer, d.seq_len, d.min_block_tokens))


def build_run(config: TrainerConfig) -> Run:
    import deepspeed

    clear_stale_locks()  # a build killed earlier would make DeepSpeed wait forever
    rank, world = init_distributed()
    torch.manual_seed(config.train.seed)
    logger = RunLogger(Path(config.run.output_dir), rank, config)
    tokenizer, model = _load_target(config)
    train_blocks, val_blocks = _data(config, tokenizer)
    target_vocab = raw_vocab(tokenizer, model.get_output_embeddings().weight.shape[0])
    target_fingerprint = tokenizer_fingerprint(tokenizer)
    vocab_cache = Path(config.run.vocab_cache_dir) if config.run.vocab_cache_dir else default_cache_dir() / "vocab-maps"
    sources: list[Source] = []
    try:
        for s in config.sources:
            sources.append(Source.connect(s, target_vocab, target_fingerprint, vocab_cache, config.run.connect_timeout_s))
    except BaseException:
        for source in sources:
            source.close()
        logger.close()
        raise
    user_ds = config.train.deepspeed
    merged = _merge(DEEPSPEED_DEFAULTS, user_ds)
    micro, gas = int(merged["train_micro_batch_size_per_gpu"]), int(merged["gradient_accumulation_steps"])
    sampler = BlockSampler(train_blocks, micro, tokenizer.pad_token_id, seed=config.data.shuffle_seed,
                           rank=rank, world=world)
    max_steps = config.train.max_steps or max(1, int(config.train.epochs * sampler.per_epoch / gas))
    ds_cfg = deepspeed_config(user_ds, max_steps, torch.cuda.is_available())
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_cfg)
    logger.start(train_blocks=len(train_blocks), val_blocks=len(val_blocks), max_steps=max_steps, world=world,
                 sources={s.name: s.info.model_name for s in sources}, deepspeed=ds_cfg)
    return Run(config, engine, tokenizer, sampler, val_blocks, sources, logger, rank, world, max_steps)
