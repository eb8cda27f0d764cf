"""A short training run as a user starts it (the CLI, ``run.report_to: [tensorboard, wandb, trackio]``): W&B (offline),
trackio (local) and TensorBoard hold every step and the final evaluation, equal to metrics.jsonl (W&B and trackio
the run's config too); then lm-evaluation-harness scores the exported model on a local multiple-choice task
(offline), and its log-likelihoods equal a direct transformers forward on the export — the export stays
benchmark-compatible."""

from __future__ import annotations

import json
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest

from tests import REPO

from .helpers import (
    assert_tensorboard_equals_metrics,
    read_metrics,
    subprocess_env,
    trainer_config,
    write_config,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]
PROJECT = "livefuse-test"
TRACKERS = ["tensorboard", "wandb", "trackio"]


@pytest.fixture(scope="module")
def tracked_run(tmp_path_factory, target) -> tuple[Path, dict[str, str]]:
    root = tmp_path_factory.mktemp("tracked")
    out = root / "run"
    env = subprocess_env() | {"WANDB_MODE": "offline", "TRACKIO_DIR": str(root / "trackio"),
                              "WANDB_SILENT": "true", "HF_HOME": str(root / "hf")}
    config = trainer_config(target, out, [], method={"lambda_clm": 1.0}, train={"max_steps": 2, "seed": 0},
                            run={"output_dir": str(out), "progress": False, "eval_blocks": 4, "report_to": TRACKERS,
                                 "project": PROJECT})
    path = write_config(config, root / "run.yaml")
    done = subprocess.run([sys.executable, "-m", "student_trainer", "--config", str(path)], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stderr[-4000:]
    assert f"reporting to {', '.join(TRACKERS)} (project '{PROJECT}', run 'run')" in done.stderr
    return out, env


def _wandb_records(run_file: Path):
    """The protobuf records of an offline W&B run file (LevelDB log format: 7-byte file header, 32 KiB blocks,
    each chunk = crc32 (4) + length (2) + type (1: full, 2: first, 3: middle, 4: last))."""
    from wandb.proto import wandb_internal_pb2

    raw, pos, chunks = run_file.read_bytes(), 7, b""
    assert raw[:4] == b":W&B", "not a W&B run file"
    while pos + 7 <= len(raw):
        if 32768 - pos % 32768 < 7:  # block trailer too short for a header: padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", raw[pos:pos + 7])
        chunks += raw[pos + 7:pos + 7 + length]
        pos += 7 + length
        if kind in (1, 4):
            record = wandb_internal_pb2.Record()
            record.ParseFromString(chunks)
            chunks = b""
            yield record


def _items(items) -> dict[str, object]:
    return {item.key or "/".join(item.nested_key): json.loads(item.value_json) for item in items}


def test_wandb_offline_run_has_the_config_every_step_and_the_final_eval(tracked_run):
    out, _ = tracked_run
    steps, evals = read_metrics(out)
    (run_file,) = (out / "wandb").glob("offline-run-*/run-*.wandb")
    records = list(_wandb_records(run_file))
    (run,) = [r.run for r in records if r.WhichOneof("record_type") == "run"]
    assert run.project == PROJECT and run.display_name == "run"
    config = _items(run.config.update)
    assert config["method"]["lambda_clm"] == 1.0 and config["run"]["report_to"] == TRACKERS
    history = [_items(r.history.item) for r in records if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [s["step"] for s in steps]
    assert [h["train/loss"] for h in history] == pytest.approx([s["loss"] for s in steps])
    summary: dict[str, object] = {}
    for r in records:
        if r.WhichOneof("record_type") == "summary":
            summary.update(_items(r.summary.update))
    final = evals[-1]["eval"]
    assert final and {k: summary[f"eval/{k}"] for k in final} == pytest.approx(final)
    assert [r for r in records if r.WhichOneof("record_type") == "exit"], "the run was not finished"


def test_trackio_run_has_the_config_every_step_and_the_final_eval(tracked_run):
    out, env = tracked_run
    steps, evals = read_metrics(out)
    read = ("import json, sys\nfrom trackio.sqlite_storage import SQLiteStorage as S\n"
            "print(json.dumps({'logs': S.get_logs(sys.argv[1], 'run'), 'config': S.get_run_config(sys.argv[1], 'run')}))")
    done = subprocess.run([sys.executable, "-c", read, PROJECT], env=env, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    stored = json.loads(done.stdout.strip().splitlines()[-1])
    assert stored["config"]["method"]["lambda_clm"] == 1.0 and stored["config"]["run"]["project"] == PROJECT
    train = [r for r in stored["logs"] if "train/loss" in r]
    assert [(r["step"], r["train/loss"]) for r in train] == [(s["step"], pytest.approx(s["loss"])) for s in steps]
    final = evals[-1]["eval"]
    (last,) = [r for r in stored["logs"] if any(k.startswith("eval/") for k in r)]
    assert last["step"] == evals[-1]["step"] and {k: last[f"eval/{k}"] for k in final} == pytest.approx(final)


def test_tensorboard_holds_every_step_and_the_final_eval(tracked_run):
    out, _ = tracked_run
    assert_tensorboard_equals_metrics(out)


QUESTIONS = [  # a small multiple-choice task in lm-eval's own format, over a local jsonl
    {"question": "def add(a, b):\n    return a", "choices": ["+ b", "- b", "* b"], "answer": 0},
    {"question": "import os\nprint(os.path.", "choices": ["join('a', 'b'))", "))((", "fish"], "answer": 0},
    {"question": "The standard library module for regular expressions is", "choices": ["re", "xyz"], "answer": 0},
    {"question": "for i in range(10):\n   ", "choices": ["print(i)", "]]]"], "answer": 0},
]


def _task(folder: Path) -> str:
    folder.mkdir()
    (folder / "questions.jsonl").write_text("".join(json.dumps(q) + "\n" for q in QUESTIONS))
    (folder / "livefuse_tiny_mc.yaml").write_text(
        "task: livefuse_tiny_mc\ndataset_path: json\n"
        f"dataset_kwargs:\n  data_files:\n    test: {folder / 'questions.jsonl'}\n"
        "test_split: test\noutput_type: multiple_choice\n"
        'doc_to_text: "{{question}}"\ndoc_to_choice: "{{choices}}"\ndoc_to_target: "{{answer}}"\n'
        "metric_list:\n  - metric: acc\n    aggregation: mean\n    higher_is_better: true\n")
    return "livefuse_tiny_mc"


def _direct_loglikelihood(model, tokenizer, context: str, choice: str) -> float:
    """What lm-eval computes for a choice: context + " " + choice tokenized whole (no BOS); the continuation's
    tokens = those past the context's (trailing whitespace of the context counts as continuation); their summed
    log-probabilities."""
    import torch

    whole = tokenizer(context + " " + choice, add_special_tokens=False).input_ids
    n = len(whole) - len(tokenizer(context.rstrip(), add_special_tokens=False).input_ids)
    with torch.no_grad():
        logprobs = torch.log_softmax(model(torch.tensor([whole])).logits[0].float(), dim=-1)
    return sum(float(logprobs[len(whole) - n - 1 + i, whole[len(whole) - n + i]]) for i in range(n))


def test_lm_eval_scores_the_export_offline_as_transformers_does(tracked_run, tmp_path):
    pytest.importorskip("lm_eval", reason="lm-eval (livefuse[eval]) not installed")
    out, env = tracked_run
    export = out / "final"
    task = _task(tmp_path / "task")
    offline = env | {"HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    cmd = [str(Path(sys.executable).with_name("lm_eval")), "--model", "hf",
           "--model_args", f"pretrained={export},dtype=float32", "--include_path", str(tmp_path / "task"),
           "--tasks", task, "--device", "cpu", "--batch_size", "4", "--output_path", str(tmp_path / "results"),
           "--log_samples"]
    done = subprocess.run(cmd, env=offline, capture_output=True, text=True, timeout=400, cwd=tmp_path)
    assert done.returncode == 0, (done.stdout + done.stderr)[-4000:]
    (results_file,) = (tmp_path / "results").glob("*/results_*.json")
    acc = json.loads(results_file.read_text())["results"][task]["acc,none"]
    (samples_file,) = (tmp_path / "results").glob(f"*/samples_{task}_*.jsonl")
    samples = sorted((json.loads(line) for line in samples_file.read_text().splitlines()), key=lambda s: s["doc_id"])
    assert len(samples) == len(QUESTIONS)

    from transformers import AutoModelForCausalLM, AutoTokenizer

    model, tokenizer = AutoModelForCausalLM.from_pretrained(export).eval(), AutoTokenizer.from_pretrained(export)
    right = 0
    for sample, question in zip(samples, QUESTIONS, strict=True):
        theirs = [float(r[0][0]) for r in sample["resps"]]
        ours = [_direct_loglikelihood(model, tokenizer, question["question"], c) for c in question["choices"]]
        assert theirs == pytest.approx(ours, rel=1e-4, abs=1e-4), question["question"]
        right += int(max(range(len(ours)), key=ours.__getitem__) == question["answer"])
    assert acc == pytest.approx(right / len(QUESTIONS))
    assert os.path.isdir(export) and (export / "tokenizer.json").exists()
