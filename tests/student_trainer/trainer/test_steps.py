"""A few real ZeRO-2 steps on CPU: a tiny Llama target (Mistral SentencePiece) fused from live GPT-2 and MPT
teachers (two more tokenizers) served on loopback. Pinned losses, λ = 1 = CLM only, learning on a repeated
batch, metrics, evaluation and the export."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from student_trainer.trainer.config import load_trainer_config
from student_trainer.trainer.loop import train

from .helpers import (
    losses_by_step,
    read_metrics,
    source,
    trainer_config,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# Losses of the first steps of the fused run below (seed 0, fp32, ZeRO-2, torch CPU kernels).
PINNED = {1: 10.384672, 2: 10.383126, 3: 10.375426, 4: 10.337404}


def _run(tmp: Path, name: str, target: Path, sources: list, **sections) -> Path:
    out = tmp / name
    train(load_trainer_config(write_config(trainer_config(target, out, sources, **sections), tmp / f"{name}.yaml")))
    return out


def _sources(teachers) -> list:
    return [source(name, t) for name, t in teachers.items()]


@pytest.fixture(scope="module")
def fused_run(tmp_path_factory, target, teachers) -> Path:
    return _run(tmp_path_factory.mktemp("fused"), "run", target, _sources(teachers))


def test_fused_losses_for_a_fixed_seed(fused_run):
    steps, _ = read_metrics(fused_run)
    print({r["step"]: r["loss"] for r in steps})
    assert [r["step"] for r in steps] == [1, 2, 3, 4]
    for r in steps:
        assert r["loss"] == pytest.approx(PINNED[r["step"]], rel=1e-4)
        assert r["loss"] == pytest.approx(0.9 * r["clm_loss"] + 0.1 * r["fusion_loss"], rel=1e-5)
        assert r["fusion_loss"] > 0 and 0 < r["aligned_share"] <= 1
        assert r["selected/gpt2"] + r["selected/mpt"] == pytest.approx(1.0)  # MinCE picks one source per sequence
        assert r["skipped/gpt2"] == r["skipped/mpt"] == 0
        assert r["tokens"] > 0
    # the lr each step used: DeepSpeed's WarmupDecayLR warms up over at least 2 steps and starts at its
    # min_lr before its first step, so steps 1-2 run at 0; then linear decay from 1e-3 towards 0 at step 4
    assert [r["lr"] for r in steps] == pytest.approx([0.0, 0.0, 1e-3, 1e-3])


def test_metrics_evaluation_and_tensorboard(fused_run):
    _, evals = read_metrics(fused_run)
    (final,) = evals
    assert final["step"] == 4
    report = final["eval"]
    for who in ("student", "gpt2", "mpt"):
        assert math.isfinite(report[f"{who}/ce_per_token"]) and report[f"{who}/ce_per_token"] > 0
        assert math.isfinite(report[f"{who}/nats_per_char"])
    assert report["student/perplexity"] == pytest.approx(math.exp(report["student/ce_per_token"]))
    assert report["gpt2/ce_per_token"] != report["mpt/ce_per_token"]
    assert list((fused_run / "tensorboard").glob("events.out.tfevents.*"))


def test_export_loads_with_plain_transformers(fused_run, target):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(fused_run / "final")
    initial = AutoModelForCausalLM.from_pretrained(target)
    tok = AutoTokenizer.from_pretrained(fused_run / "final")
    assert type(model).__name__ == "LlamaForCausalLM" and len(tok) == len(AutoTokenizer.from_pretrained(target))
    trained, start = model.state_dict(), initial.state_dict()
    assert trained.keys() == start.keys()
    assert any(not torch.equal(trained[k], start[k]) for k in trained)  # the export is the trained model


def test_lambda_one_reproduces_the_clm_only_run(tmp_path, target, teachers, fused_run):
    clm = {"lambda_clm": 1.0}
    with_sources = losses_by_step(_run(tmp_path, "with", target, _sources(teachers), method=clm))
    alone = losses_by_step(_run(tmp_path, "alone", target, [], method=clm))
    assert with_sources == alone  # exactly: at λ = 1 the teachers are not even asked
    assert with_sources != losses_by_step(fused_run)


def test_loss_falls_when_one_batch_is_repeated(tmp_path, target, teachers):
    from transformers import AutoTokenizer

    tok = AutoTokenizer.from_pretrained(target)
    text = Path(__file__).read_text()[:2000]
    ids = tok(text, add_special_tokens=False)["input_ids"]
    doc = tmp_path / "one.txt"
    doc.write_text(tok.decode(ids[:110]))  # two blocks (64 + ~46 tokens) = one micro-batch of 2, every step
    out = _run(tmp_path, "repeat", target, _sources(teachers),
               data={"train_files": [str(doc)], "validation_fraction": 0.0},
               train={"max_steps": 8, "seed": 0, "deepspeed": {"train_micro_batch_size_per_gpu": 2,
                                                               "optimizer": {"params": {"lr": 3e-3}}}})
    losses = list(losses_by_step(out).values())
    assert len(losses) == 8
    assert losses[0] == losses[1] == losses[2]  # the same batch, and steps 1-2 run at lr 0 (warmup)
    assert all(losses[i + 1] < losses[i] for i in range(2, 7))  # then every update lowers it
    assert losses[-1] < losses[2] - 0.5
