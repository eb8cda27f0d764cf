"""``data.streaming: true``: micro-batches from a stream tokenized on the fly are still a pure function of
(seed, rank, world, m) — so a resumed run gets the same batch — ranks read different documents, epochs
restart the stream in a new order, and held-out documents never reach training."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from student_trainer.__main__ import main
from student_trainer.demo.assets import named_tokenizer
from student_trainer.trainer.config import DataConfig, load_trainer_config
from student_trainer.trainer.data.stream import StreamSampler, held_out, rank_blocks, stream_data
from student_trainer.trainer.loop import train
from tests.student_trainer.trainer.helpers import read_metrics, trainer_config, write_config

N_DOCS = 40


def _doc(i: int) -> str:
    return f"document number {i}.\n" + f"def f{i}(x):\n    return x * {i}\n" * (3 + i % 5)


@pytest.fixture(scope="module")
def tok():
    tokenizer = named_tokenizer("mistral-spm")
    tokenizer.pad_token = tokenizer.eos_token  # as the trainer sets it
    return tokenizer


@pytest.fixture
def corpus(tmp_path) -> Path:
    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in [_doc(i) for i in range(N_DOCS)] + ["", " "]))
    return path


def _config(corpus: Path, **extra) -> DataConfig:
    return DataConfig(train_files=[str(corpus)], streaming=True, seq_len=32, min_block_tokens=4, shuffle_buffer=8,
                      validation_fraction=0.2, **extra)


def _doc_ids(batch) -> set[int]:
    """The documents whose first block is in ``batch``."""
    return {int(b.text.split("number ")[1].split(".")[0]) for b in batch.blocks if "number " in b.text}


def _sampler(d: DataConfig, tok, rank: int = 0, world: int = 1) -> StreamSampler:
    return StreamSampler(rank_blocks(d, tok, rank, world), 2, tok.pad_token_id)


def test_a_resumed_sampler_holds_no_micro_batches_before_its_start(corpus, tok):
    """Defect: fast-forwarding to a resumed run's first micro-batch kept up to 256 earlier ones in memory for the
    rest of the run (never asked for again). ``seek`` skips them without collating; only the window of
    micro-batches the prefetch threads may still ask for is held."""
    d = _config(corpus)
    straight = _sampler(d, tok)
    expected = [straight.batch(m) for m in range(40)]
    resumed = _sampler(d, tok)
    resumed.seek(30)
    assert resumed.held() == 0
    for m in (31, 30, 32):  # prefetch threads: slightly out of order
        got = resumed.batch(m)
        assert [b.text for b in got.blocks] == [b.text for b in expected[m].blocks]
    assert resumed.held() == 0  # 31 and 30 handed out; nothing earlier was kept


def test_a_fresh_sampler_gives_micro_batch_m_exactly_as_a_run_that_got_there(corpus, tok):
    d = _config(corpus)
    straight = _sampler(d, tok)
    batches = [straight.batch(m) for m in range(30)]  # past the end of the first epoch
    resumed = _sampler(d, tok)
    for m in (25, 26, 28, 27):  # a resumed run starts at m; prefetch threads may ask slightly out of order
        got = resumed.batch(m)
        assert [b.text for b in got.blocks] == [b.text for b in batches[m].blocks]
        assert (got.input_ids == batches[m].input_ids).all()
    with pytest.raises(RuntimeError, match="already handed out"):
        resumed.batch(26)


def _epoch_docs(d: DataConfig, tok, epoch: int) -> tuple[list[str], list[set[str]]]:
    """Rank 0's block texts and each of 2 ranks' documents in one epoch."""
    texts = [[b.text for b in rank_blocks(d, tok, r, 2)(epoch)] for r in range(2)]
    return texts[0], [{t.split(".")[0] for t in ts if t.startswith("document number")} for ts in texts]


def test_ranks_read_different_documents_and_epochs_reshuffle(corpus, tok):
    d = _config(corpus)
    first, docs = _epoch_docs(d, tok, 0)
    assert docs[0] and docs[1] and not docs[0] & docs[1]  # each document goes to one rank per epoch
    assert _epoch_docs(d, tok, 0)[0] == first  # seeded
    second, docs_next = _epoch_docs(d, tok, 1)
    assert second != first and not docs_next[0] & docs_next[1]  # another order in the next epoch
    assert docs_next[0] | docs_next[1] == docs[0] | docs[1]


def test_held_out_documents_are_evaluated_never_trained_on(corpus, tok):
    d = _config(corpus)
    held = {i for i in range(N_DOCS) if held_out(_doc(i), 0.2, 0)}
    assert 0 < len(held) < N_DOCS
    sampler, val, facts = stream_data(d, tok, 2, rank=0, world=1, eval_blocks=1000)
    seen: set[int] = set()
    for m in range(150):  # more than an epoch
        seen |= _doc_ids(sampler.batch(m))
    assert seen == set(range(N_DOCS)) - held
    assert {int(b.text.split("number ")[1].split(".")[0]) for b in val if "number " in b.text} == held
    assert facts["streaming"] and facts["val_blocks"] == len(val)


@pytest.mark.slow
@pytest.mark.integration
def test_a_streaming_run_trains_and_prepare_has_nothing_to_do(tmp_path, corpus, target, capsys):
    config = trainer_config(target, tmp_path / "out", [], method={"lambda_clm": 1.0},
                            data={"train_files": [str(corpus)], "streaming": True, "seq_len": 32},
                            train={"max_steps": 3, "seed": 0, "deepspeed": {"train_micro_batch_size_per_gpu": 2}})
    path = write_config(config, tmp_path / "run.yaml")
    assert main(["prepare", "--config", str(path)]) == 0
    assert "nothing to prepare" in capsys.readouterr().err
    train(load_trainer_config(path))
    steps, evals = read_metrics(tmp_path / "out")
    assert [r["step"] for r in steps] == [1, 2, 3] and all(r["tokens"] > 0 for r in steps)
    assert evals[0]["eval"]["student/ce_per_token"] > 0
