"""Sources of data users have: local .txt / .jsonl / .parquet files, a ``save_to_disk`` folder and a local dataset folder (read by the same
``load_dataset(name, config, split=...)`` call a hub id takes; the hub itself is unreachable here), and bad
data settings failing when the config is read (exit 2, naming the field or the file)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from student_trainer.__main__ import main
from student_trainer.demo.assets import named_tokenizer
from student_trainer.trainer.config import DataConfig, load_trainer_config
from student_trainer.trainer.data import documents
from student_trainer.trainer.data.blocks import first_blocks, iter_blocks, make_blocks
from student_trainer.trainer.data.documents import check_data, read_documents
from student_trainer.trainer.data.prepared import prepare_corpus
from tests import REPO
from tests.student_trainer.trainer.helpers import trainer_config, write_config

BLOCK_DOCS = ["def f(x):\n    return x + 1\n" * 20, "Plain prose about tokenizers, offsets and blocks. " * 30,
              "Ünïcödé — mixed text 😀 with tabs\tand  double spaces.\n" * 15]
DOCS = [f"doc {i}: " + "def f(x):\n    return x + 1\n" * (20 + i) for i in range(4)] + \
       ["Plain prose about tokenizers, offsets and blocks. " * 40]


def test_reads_text_jsonl_and_parquet_files(tmp_path):
    import pyarrow as pa
    import pyarrow.parquet as pq

    (tmp_path / "a.txt").write_text(BLOCK_DOCS[0])
    (tmp_path / "b.jsonl").write_text(json.dumps({"body": BLOCK_DOCS[1]}) + "\n" + json.dumps({"body": "  "}) + "\n")
    pq.write_table(pa.table({"body": [BLOCK_DOCS[2]]}), tmp_path / "c.parquet")
    docs = read_documents([str(tmp_path / n) for n in ("a.txt", "b.jsonl", "c.parquet")], "body")
    assert docs == BLOCK_DOCS  # one document per .txt file, one per row; blank rows dropped
    with pytest.raises(ValueError, match=r"no field 'text'.*\['body'\].*data.text_field"):
        read_documents([str(tmp_path / "b.jsonl")], "text")
    with pytest.raises(ValueError, match="unknown extension '.csv'"):
        read_documents([str(tmp_path / "x.csv")], "text")
    with pytest.raises(ValueError, match="does not exist"):
        read_documents([str(tmp_path / "missing.txt")], "text")


@pytest.fixture(scope="module")
def tok():
    return named_tokenizer("mistral-spm")


def _same(a, b) -> bool:
    return len(a) == len(b) and all(x.text == y.text and x.ids.tolist() == y.ids.tolist() for x, y in zip(a, b, strict=True))


def test_first_blocks_are_the_first_of_all_blocks_and_later_documents_are_not_tokenized(tok):
    everything = make_blocks(DOCS, tok, 48, 4)
    for n in (0, 1, 5, len(everything), len(everything) + 3):
        assert _same(first_blocks(DOCS, tok, 48, 4, n), everything[:n])
    read = []

    def docs():  # records how far the documents were read
        for d in DOCS:
            read.append(d)
            yield d

    assert len(first_blocks(docs(), tok, 48, 4, 1, batch_chars=1)) == 1 and len(read) < len(DOCS)
    assert len(list(iter_blocks(DOCS, tok, 48, 4))) == len(everything)


def _saved(folder: Path) -> Path:
    import datasets

    datasets.DatasetDict({
        "train": datasets.Dataset.from_dict({"body": DOCS[:4] + ["", "  \n"], "n": list(range(6))}),
        "validation": datasets.Dataset.from_dict({"body": DOCS[4:], "n": [9]}),
    }).save_to_disk(str(folder))
    return folder


def test_a_save_to_disk_folder_is_prepared_like_files(tmp_path, tok):
    d = DataConfig(dataset=str(_saved(tmp_path / "saved")), validation_split="validation", text_field="body",
                   cache_dir=str(tmp_path / "cache"), seq_len=48, min_block_tokens=4)
    check_data(d)
    prepared = prepare_corpus(d, tok, progress=False)
    assert _same(prepared.blocks("train")[:], make_blocks(DOCS[:4], tok, 48, 4))
    assert _same(prepared.blocks("validation")[:], make_blocks(DOCS[4:], tok, 48, 4))
    assert prepared.facts()["empty_documents_skipped"] == 2
    assert prepared.folder.name.startswith("saved-")


def test_a_local_dataset_folder_goes_through_the_hub_ids_load_dataset_call(tmp_path, tok, monkeypatch):
    import datasets

    folder = tmp_path / "corpus"
    folder.mkdir()
    (folder / "train.jsonl").write_text("".join(json.dumps({"text": t}) + "\n" for t in DOCS[:4]))
    (folder / "validation.jsonl").write_text(json.dumps({"text": DOCS[4]}) + "\n")
    calls = []
    real = datasets.load_dataset

    def spy(*args, **kwargs):
        calls.append((args, kwargs))
        return real(*args, **kwargs)

    monkeypatch.setattr(datasets, "load_dataset", spy)
    d = DataConfig(dataset=str(folder), validation_split="validation", cache_dir=str(tmp_path / "cache"),
                   seq_len=48, min_block_tokens=4)
    check_data(d)
    prepared = prepare_corpus(d, tok, progress=False)
    assert [c[0] for c in calls] == [(str(folder), None), (str(folder), None)]  # name, config: as for a hub id
    assert [c[1]["split"] for c in calls] == ["train", "validation"]
    assert _same(prepared.blocks("train")[:], make_blocks(DOCS[:4], tok, 48, 4))
    assert _same(prepared.blocks("validation")[:], make_blocks(DOCS[4:], tok, 48, 4))
    (folder / "train.jsonl").write_text(json.dumps({"text": DOCS[0]}) + "\n")  # the folder's files are the key
    assert prepare_corpus(d, tok, progress=False).folder != prepared.folder


def test_hub_ids_resolve_their_revision_for_the_key_and_fail_clearly_when_unreachable(monkeypatch):
    d = DataConfig(dataset="livefuse-tests/no-such-dataset", dataset_revision="v1")
    assert documents.dataset_kind("JeanKaddour/minipile") == "hub"
    with pytest.raises(ValueError, match=r"data.dataset: cannot find 'livefuse-tests/no-such-dataset' \(revision v1\)"):
        check_data(d)  # no hub from this machine, or no such dataset on it: either way a clear message
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    assert documents.identity(d)["revision"] == "v1"  # offline: the revision as given is the key
    check_data(d)


def _argv(tmp_path: Path, target: Path, **data) -> list[str]:
    config = trainer_config(target, tmp_path / "out", [], method={"lambda_clm": 1.0})
    config["data"] = data
    return ["--config", str(write_config(config, tmp_path / "run.yaml"))]


@pytest.mark.parametrize(("data", "message"), [
    ({"dataset": "/nowhere/corpus"}, "data.dataset: folder '/nowhere/corpus' does not exist"),
    ({"dataset": "SAVED", "validation_split": "test"}, "data.validation_split: 'SAVED' has no split 'test'; "
                                                      "splits: ['train', 'validation']"),
    ({"dataset": "livefuse-tests/no-such-dataset"}, "cannot find 'livefuse-tests/no-such-dataset'"),
    ({"train_files": ["README.md"], "dataset": "x/y"}, "set either train_files"),
    ({}, "set either train_files"),
    ({"train_files": ["README.md"], "validation_split": "v"}, "with files use validation_files"),
    ({"train_files": ["README.md"], "streaming": True}, "data.streaming: true needs train.max_steps"),
])
def test_bad_data_settings_exit_2_before_anything_starts(data, message, tmp_path, target, capsys):
    saved = str(_saved(tmp_path / "saved"))
    data = {k: saved if v == "SAVED" else v for k, v in data.items()}
    argv = _argv(tmp_path, target, **data)
    if data.get("streaming"):
        argv.append("train.max_steps=null")
    assert main(argv) == 2
    assert message.replace("SAVED", saved) in capsys.readouterr().err
    assert not (tmp_path / "out").exists()


def test_a_config_for_another_machine_is_read_without_checking_its_data():
    config = load_trainer_config(REPO / "configs" / "paper_llama2.yaml")
    assert config.data.dataset == "JeanKaddour/minipile" and config.data.validation_split == "validation"
