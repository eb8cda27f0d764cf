"""Tiny causal LMs for the demo, pretrained briefly on one domain (plain torch loop, seconds to minutes on
CPU), saved like hub checkpoints and cached by their recipe."""

from __future__ import annotations

import hashlib
import json
import shutil
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import torch
from tqdm import tqdm

from student_trainer.demo.assets import build_tiny_model, named_tokenizer, new_tmp, publish
from student_trainer.paths import cache_root


@dataclass(frozen=True)
class Recipe:
    arch: str         # llama | mpt | gpt-neox | gpt2
    tokenizer: str    # a name from assets.TOKENIZERS
    domains: tuple[str, ...]
    steps: int
    hidden: int = 64
    layers: int = 2
    seq_len: int = 128
    batch: int = 8
    lr: float = 3e-3
    seed: int = 0

    def key(self, texts: list[str]) -> str:
        """Names the cached model: this recipe and the training text (a changed corpus split retrains)."""
        digest = hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode())
        for text in texts:
            digest.update(hashlib.sha256(text.encode()).digest())
        return digest.hexdigest()[:12]


def token_stream(tokenizer, texts: list[str]) -> np.ndarray:
    """All texts tokenized and joined with EOS: (N,) int64."""
    eos = tokenizer.eos_token_id if tokenizer.eos_token_id is not None else 0
    ids = tokenizer(texts, add_special_tokens=False)["input_ids"]
    return np.concatenate([np.append(np.asarray(x, np.int64), eos) for x in ids])


def pretrain(recipe: Recipe, texts: list[str], name: str) -> Path:
    """Builds (or reuses from the cache) a model pretrained per ``recipe`` on ``texts``."""
    folder = cache_root() / "demo-models" / f"{name}-{recipe.key(texts)}"
    if (folder / "config.json").exists():
        return folder
    tmp = new_tmp(folder.parent)  # a concurrent demo has its own
    try:
        _pretrain_into(tmp, recipe, texts, name)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)  # nothing half-built is left (Ctrl-C included)
        raise
    publish(tmp, folder)  # atomic; a concurrent builder of the same recipe may have won
    return folder


def _pretrain_into(tmp: Path, recipe: Recipe, texts: list[str], name: str) -> None:
    build_tiny_model(recipe.arch, recipe.tokenizer, tmp, hidden=recipe.hidden, layers=recipe.layers,
                     max_len=max(512, recipe.seq_len), seed=recipe.seed)
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(tmp)
    stream = token_stream(named_tokenizer(recipe.tokenizer), texts)
    rng = np.random.default_rng(recipe.seed)
    torch.manual_seed(recipe.seed)
    opt = torch.optim.AdamW(model.parameters(), lr=recipe.lr, weight_decay=0.01)
    sched = torch.optim.lr_scheduler.OneCycleLR(opt, max_lr=recipe.lr, total_steps=recipe.steps, pct_start=0.1)
    model.train()
    bar = tqdm(range(recipe.steps), desc=f"pretrain {name}", unit="step", dynamic_ncols=True)
    for _ in bar:
        starts = rng.integers(0, len(stream) - recipe.seq_len - 1, recipe.batch)
        x = torch.from_numpy(np.stack([stream[s:s + recipe.seq_len] for s in starts]))
        loss = model(input_ids=x, labels=x).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        bar.set_postfix(loss=f"{loss.item():.3f}")
    model.save_pretrained(tmp)
