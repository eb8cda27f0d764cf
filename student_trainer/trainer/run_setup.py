"""Everything a training run needs before its first step: distributed setup, target model and tokenizer,
data, teacher connections, the DeepSpeed engine, logging. ``loop.py`` holds the loop itself."""

from __future__ import annotations

import os
import socket
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

import numpy as np
import torch
import torch.distributed as dist

from protos.vocabulary import raw_vocab, tokenizer_fingerprint
from student_trainer.trainer import evaluation
from student_trainer.trainer.agreement import agreed_failure, failure_flag
from student_trainer.trainer.config import TrainerConfig
from student_trainer.trainer.data.blocks import Block, BlockSampler, Sampler, load_target_tokenizer
from student_trainer.trainer.data.prepared import prepare_corpus
from student_trainer.trainer.engine_config import engine_config
from student_trainer.trainer.extensions import clear_stale_locks
from student_trainer.trainer.run_log import RunLogger
from student_trainer.trainer.sources import Source, SourceChanged, SourceFailed
from student_trainer.trainer.vocab_cache import default_vocab_dir


class Worker(Protocol):
    """Threads that talk to the sources (the prefetcher, the rollouts' scoring): ``close`` cancels what is
    queued, ``join`` waits for what runs."""

    def close(self) -> None: ...

    def join(self) -> None: ...


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
    sampler: Sampler
    val_blocks: Sequence[Block]
    sources: list[Source]
    logger: RunLogger
    rank: int
    world: int
    max_steps: int
    target_vocab: list[str] = field(default_factory=list)  # raw token strings of the output rows (id = index)
    _source_eval: dict[str, np.ndarray] = field(default_factory=dict)

    def evaluate(self) -> dict[str, float]:
        """Student and sources on this rank's share of the held-out blocks, summed over ranks."""
        everyone = self.val_blocks[: self.config.run.eval_blocks]
        blocks = everyone[self.rank::self.world]
        micro = self.engine.train_micro_batch_size_per_gpu()
        most = -(-len(everyone[::self.world]) // micro)  # rank 0's forwards: every rank runs as many (ZeRO-3)
        student = self._summed(evaluation.nll_sums(self.engine, blocks, self.tokenizer.pad_token_id, micro,
                                                   forwards=most, spare=everyone[0] if everyone else None))
        out = {f"student/{k}": v for k, v in evaluation.summarise(student).items()}
        for source in self.sources:
            out.update({f"{source.name}/{k}": v for k, v in evaluation.summarise(self._source_eval_sums(source,
                                                                                                        blocks)).items()})
        return out

    def _source_eval_sums(self, source: Source, blocks: Sequence[Block]) -> np.ndarray:
        """A source's sums over all ranks' held-out blocks. Teachers are frozen, so a success is kept for the
        rest of the run; a skip (the source was down) gives NaN now and is asked again next time. The ranks
        agree on a failure before anything else happens (see ``agreement``)."""
        if source.name in self._source_eval:
            return self._source_eval[source.name]
        sums, failure = None, None
        try:
            sums = evaluation.source_sums(source, blocks)
        except (SourceFailed, SourceChanged) as err:
            failure = err
        local = np.zeros(3) if sums is None else sums
        total = self._summed(np.array([*local, float(sums is None and failure is None), failure_flag(failure)]))
        if total[4] > 0:
            raise agreed_failure(failure, self.rank, self.world)
        if total[3] > 0:  # skipped on some rank: no score this time
            return np.full(3, np.nan)
        self._source_eval[source.name] = total[:3]
        return total[:3]

    def _summed(self, sums: np.ndarray) -> np.ndarray:
        """``sums`` added over the ranks."""
        if self.world > 1:
            t = torch.tensor(sums, dtype=torch.float64, device=self.engine.device)
            dist.all_reduce(t)
            sums = t.cpu().numpy()
        return sums

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

    def close(self, *workers: Worker | None) -> None:
        """Stops prefetching and scoring rollouts, closes every source (in-flight fetches end at once) and the
        logs."""
        running = [w for w in workers if w is not None]
        for worker in running:
            worker.close()
        for source in self.sources:
            source.close()
        for worker in running:
            worker.join()
        self.logger.close()


def _load_model(config: TrainerConfig):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(config.target.model, dtype=getattr(torch, config.target.dtype))


def _data(config: TrainerConfig, tokenizer, micro: int, rank: int, world: int
          ) -> tuple[Sampler, Sequence[Block], dict[str, Any]]:
    """This rank's sampler, the held-out blocks and what the start-up log says about the data.

    Prepared (default): the corpus cache is opened, or built once by whichever rank gets its lock first while
    the others wait; blocks are read from it on demand. Streaming: documents are tokenized on the fly.
    """
    d = config.data
    if d.streaming:
        from student_trainer.trainer.data.stream import stream_data

        return stream_data(d, tokenizer, micro, rank=rank, world=world, eval_blocks=config.run.eval_blocks)
    prepared = prepare_corpus(d, tokenizer, progress=config.run.progress)
    train, val = prepared.blocks("train"), prepared.blocks("validation")
    sampler = BlockSampler(train, micro, tokenizer.pad_token_id, seed=d.shuffle_seed, rank=rank, world=world)
    return sampler, val, {**prepared.facts(), "train_blocks": len(train), "val_blocks": len(val)}


def build_run(config: TrainerConfig) -> Run:
    import deepspeed

    clear_stale_locks()  # a build killed earlier would make DeepSpeed wait forever
    rank, world = init_distributed()
    torch.manual_seed(config.train.seed)
    logger = RunLogger(Path(config.run.output_dir), rank, config)
    engine_cfg = engine_config(config.train.deepspeed, torch.cuda.is_available())
    micro, gas = engine_cfg.micro_batch, engine_cfg.grad_accum
    tokenizer = load_target_tokenizer(config.target.tokenizer or config.target.model)
    sampler, val_blocks, data_facts = _data(config, tokenizer, micro, rank, world)  # before the model: fail early
    model = _load_model(config)
    target_vocab = raw_vocab(tokenizer, model.get_output_embeddings().weight.shape[0])
    target_fingerprint = tokenizer_fingerprint(tokenizer)
    vocab_cache = Path(config.run.vocab_cache_dir) if config.run.vocab_cache_dir else default_vocab_dir()
    sources: list[Source] = []
    try:
        for s in config.sources:
            sources.append(Source.connect(s, target_vocab, target_fingerprint, vocab_cache, config.run.connect_timeout_s,
                                          gather_ids=config.on_policy.gather_ids * s.texts_per_request))
    except BaseException:
        for source in sources:
            source.close()
        logger.close()
        raise
    assert sampler.per_epoch is not None or config.train.max_steps, "streaming needs max_steps (config check)"
    max_steps = config.train.max_steps or max(1, int(config.train.epochs * (sampler.per_epoch or 0) / gas))
    ds_cfg = engine_cfg.for_run(max_steps)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=[p for p in model.parameters() if p.requires_grad],
                                      config=ds_cfg)
    logger.start(max_steps=max_steps, world=world, data=data_facts,
                 sources={s.name: s.info.model_name for s in sources}, deepspeed=ds_cfg)
    return Run(config, engine, tokenizer, sampler, val_blocks, sources, logger, rank, world, max_steps, target_vocab)
