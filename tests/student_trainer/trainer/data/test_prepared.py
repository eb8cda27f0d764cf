"""The prepared corpus cache: the same blocks as the in-memory path, built once and reused, a new key for
changed inputs, one build among racing processes, half-written or corrupt caches rebuilt, long documents
tokenized in pieces, and the CLI's ``prepare`` step."""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from protos.vocabulary import tokenizer_fingerprint
from student_trainer.__main__ import main
from student_trainer.demo.assets import named_tokenizer
from student_trainer.trainer.config import DataConfig
from student_trainer.trainer.data import prepared as prepared_module
from student_trainer.trainer.data.blocks import (
    BlockSampler,
    make_blocks,
    split_documents,
    text_pieces,
)
from student_trainer.trainer.data.build import CorpusMeta
from student_trainer.trainer.data.documents import identity, read_documents
from student_trainer.trainer.data.prepared import PreparedCorpus, cache_folder, prepare_corpus, problem
from tests import REPO
from tests.student_trainer.trainer.helpers import (
    corpus_files,
    free_port,
    subprocess_env,
    trainer_config,
    write_config,
)

DOCS = ["def f(x):\n    return x + 1\n" * 40, "Plain prose about tokenizers, offsets and blocks. " * 60,
        "Ünïcödé — mixed text 😀 with tabs\tand  double spaces.\n" * 30, "class A:\n    pass\n" * 50]


@pytest.fixture(scope="module")
def tok():
    return named_tokenizer("mistral-spm")


def _jsonl(path: Path, texts: list[str | None]) -> Path:
    path.write_text("".join(json.dumps({"text": t}) + "\n" for t in texts))
    return path


def _config(tmp_path: Path, **data) -> DataConfig:
    return DataConfig(**{"cache_dir": str(tmp_path / "cache"), "seq_len": 48, "min_block_tokens": 4, **data})


def _same(a, b) -> bool:
    return (len(a) == len(b) and all(np.array_equal(x.ids, y.ids) and np.array_equal(x.offsets, y.offsets)
                                     and x.text == y.text for x, y in zip(a, b, strict=True)))


def _no_build(monkeypatch) -> None:
    def refuse(*_args, **_kwargs):
        raise AssertionError("the cache was built again")
    monkeypatch.setattr(prepared_module, "build", refuse)


def test_prepared_blocks_equal_the_in_memory_path_and_a_second_run_does_not_tokenize(tmp_path, tok, monkeypatch):
    files = [str(_jsonl(tmp_path / "a.jsonl", [DOCS[0], "", DOCS[1], "   ", None, DOCS[2]])),
             str(_jsonl(tmp_path / "b.jsonl", [DOCS[3]] * 3))]
    d = _config(tmp_path, train_files=files, validation_fraction=0.3, shuffle_seed=4)
    prepared = prepare_corpus(d, tok, progress=False)
    train, held = split_documents([DOCS[0], DOCS[1], DOCS[2]] + [DOCS[3]] * 3, 0.3, 4)
    assert _same(prepared.blocks("train")[:], make_blocks(train, tok, 48, 4))
    assert _same(prepared.blocks("validation")[:], make_blocks(held, tok, 48, 4))
    facts = prepared.facts()
    assert facts["empty_documents_skipped"] == 3 and facts["documents"] == 4 and facts["validation_documents"] == 2
    assert facts["cache_bytes"] == sum(p.stat().st_size for p in prepared.folder.rglob("*") if p.is_file()
                                       and p.name != "meta.json")
    ids = np.memmap(prepared.folder / "train" / "ids.bin", np.uint16, "r")  # a 32k vocabulary: 2 bytes per id
    assert len(ids) == facts["train_tokens"] == sum(len(b.ids) for b in make_blocks(train, tok, 48, 4))

    _no_build(monkeypatch)
    again = prepare_corpus(d, tok, progress=False)  # a second run only opens it
    assert again.folder == prepared.folder and _same(again.blocks("train")[:], prepared.blocks("train")[:])


def test_changed_input_tokenizer_or_block_settings_give_a_new_key(tmp_path, tok):
    doc = _jsonl(tmp_path / "a.jsonl", DOCS)
    d = _config(tmp_path, train_files=[str(doc)])
    first = prepare_corpus(d, tok, progress=False).folder
    keys = {first}
    for changed in (d.model_copy(update={"seq_len": 32}), d.model_copy(update={"min_block_tokens": 8}),
                    d.model_copy(update={"validation_fraction": 0.5})):
        keys.add(prepare_corpus(changed, tok, progress=False).folder)
    keys.add(prepare_corpus(d, named_tokenizer("gpt-2"), progress=False).folder)
    _jsonl(doc, DOCS[:3])  # the file changes
    keys.add(prepare_corpus(d, tok, progress=False).folder)
    assert len(keys) == 6 and all(problem(k) is None for k in keys)
    assert len(prepare_corpus(d, tok, progress=False).blocks("train")) < len(
        PreparedCorpus(first, CorpusMeta.read(first)).blocks("train"))


@pytest.mark.parametrize("damage", ["truncated ids", "changed block table", "no meta.json", "killed build"])
def test_a_half_written_or_corrupt_cache_is_detected_and_rebuilt(tmp_path, tok, damage, caplog):
    d = _config(tmp_path, train_files=[str(_jsonl(tmp_path / "a.jsonl", DOCS))])
    folder = prepare_corpus(d, tok, progress=False).folder
    good = prepare_corpus(d, tok, progress=False).blocks("train")[:]
    if damage == "truncated ids":
        with open(folder / "train" / "ids.bin", "r+b") as f:
            f.truncate(10)
    elif damage == "changed block table":
        table = np.fromfile(folder / "train" / "blocks.bin", np.int64)
        table[4] += 1  # the first block's text ends one byte later; the file keeps its size
        table.tofile(folder / "train" / "blocks.bin")
    elif damage == "no meta.json":
        (folder / "meta.json").unlink()
    else:  # a build killed before its rename: only a .partial folder is left
        folder.rename(folder.with_name(folder.name + ".partial-999999"))
    assert problem(folder) is not None
    caplog.clear()
    rebuilt = prepare_corpus(d, tok, progress=False)
    assert problem(folder) is None and _same(rebuilt.blocks("train")[:], good)
    assert not list(folder.parent.glob("*.partial-*"))
    if damage != "killed build":
        assert "rebuilding it" in caplog.text  # a warning of the livefuse logger (the CLI shows it on stderr)


class _Spy:
    """The tokenizer, recording the longest text it was given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer, self.longest = tokenizer, 0

    def __call__(self, texts, **kwargs):
        self.longest = max([self.longest, *map(len, texts)])
        return self.tokenizer(texts, **kwargs)

    def __len__(self) -> int:
        return len(self.tokenizer)

    def __getattr__(self, name: str):
        return getattr(self.tokenizer, name)


def test_a_document_longer_than_a_piece_is_tokenized_in_pieces(tmp_path, tok):
    long_doc = "".join(f"line {i}: " + "word " * (i % 17) + "\n" for i in range(3000))  # ~50k characters
    d = _config(tmp_path, train_files=[str(_jsonl(tmp_path / "a.jsonl", [long_doc, DOCS[0]]))],
                max_piece_chars=4000, validation_fraction=0)
    spy = _Spy(tok)
    blocks = prepare_corpus(d, spy, progress=False).blocks("train")
    assert 3000 < spy.longest <= 4000  # the tokenizer never saw more than a piece
    assert _same(blocks[:], make_blocks([long_doc, DOCS[0]], tok, 48, 4, max_piece_chars=4000))
    texts = [b.text for b in blocks[:]]
    assert all(t in long_doc or t in DOCS[0] for t in texts)
    pieces = text_pieces(long_doc, 4000)
    assert "".join(pieces) == long_doc and len(pieces) > 12 and all(p.endswith("\n") for p in pieces)


def test_a_cached_sampler_is_a_pure_function_of_seed_rank_world_and_index(tmp_path, tok):
    d = _config(tmp_path, train_files=corpus_files(), seq_len=32, validation_fraction=0)
    blocks = prepare_corpus(d, tok, progress=False).blocks("train")
    in_memory = make_blocks(read_documents(corpus_files(), "text"), tok, 32, 4)
    for rank in range(2):
        a = BlockSampler(blocks, 2, 0, seed=5, rank=rank, world=2)
        b = BlockSampler(in_memory, 2, 0, seed=5, rank=rank, world=2)
        fresh = BlockSampler(prepare_corpus(d, tok, progress=False).blocks("train"), 2, 0, seed=5, rank=rank, world=2)
        for m in (0, 3, a.per_epoch + 1):  # a resumed run's sampler starts at any m
            assert _same(a.batch(m).blocks, b.batch(m).blocks) and _same(fresh.batch(m).blocks, a.batch(m).blocks)
            assert np.array_equal(a.batch(m).input_ids, b.batch(m).input_ids)


_RACER = """
import sys
from protos.logs import setup_logging
from student_trainer.demo.assets import named_tokenizer
from student_trainer.trainer.config import DataConfig
from student_trainer.trainer.data.prepared import prepare_corpus
setup_logging("console", "INFO")  # the process shows the cache's messages, as livefuse-train does
d = DataConfig.model_validate_json(sys.argv[1])
print(prepare_corpus(d, named_tokenizer("mistral-spm"), progress=False).folder)
"""


@pytest.mark.slow
def test_racing_processes_build_once_and_the_others_wait(tmp_path, tok):
    from filelock import FileLock

    d = _config(tmp_path, train_files=corpus_files())
    folder = cache_folder(d, tokenizer_fingerprint(tok), identity(d))
    folder.parent.mkdir(parents=True)
    logs = [tmp_path / f"racer{i}.err" for i in range(2)]
    lock = FileLock(str(folder) + ".lock")
    lock.acquire()  # both start while "another process" holds the lock: neither may build yet
    procs = [subprocess.Popen([sys.executable, "-c", _RACER, d.model_dump_json()], cwd=REPO, env=subprocess_env(),
                              stdout=subprocess.PIPE, stderr=log.open("w"), text=True) for log in logs]
    try:
        deadline = time.monotonic() + 120
        while (sum("waiting for another process" in log.read_text() for log in logs) < 2
               and time.monotonic() < deadline):
            time.sleep(0.2)
        assert not folder.exists()
    finally:
        lock.release()
    outs = [p.communicate(timeout=300)[0] for p in procs]
    errs = [log.read_text() for log in logs]
    assert [p.returncode for p in procs] == [0, 0], [e[-2000:] for e in errs]
    assert {o.strip() for o in outs} == {str(folder)}
    assert sum(e.count("preparing the corpus") for e in errs) == 1  # one build; the other read its result


@pytest.mark.slow
def test_prepare_cli_builds_then_reuses_and_a_killed_build_is_redone(tmp_path, target):
    big = [Path(f).read_text() for f in corpus_files()] * 40  # a build that lasts a few seconds
    data = {"train_files": [str(_jsonl(tmp_path / "big.jsonl", big))], "cache_dir": str(tmp_path / "cache"),
            "seq_len": 64}
    config = write_config(trainer_config(target, tmp_path / "out", [], method={"lambda_clm": 1.0}, data=data),
                          tmp_path / "run.yaml")
    cmd = [sys.executable, "-m", "student_trainer", "prepare", "--config", str(config)]
    first = subprocess.Popen(cmd, cwd=REPO, env=subprocess_env(), stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while not list((tmp_path / "cache").glob("*.partial-*/train")) and time.monotonic() < deadline:
        time.sleep(0.05)
    first.send_signal(signal.SIGKILL)  # killed mid-build: only a .partial folder remains
    first.wait(60)
    assert not [p for p in (tmp_path / "cache").iterdir() if p.is_dir() and ".partial-" not in p.name]

    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    assert "preparing the corpus" in done.stderr and "MB on disk" in done.stderr
    facts = json.loads(done.stdout)
    assert problem(Path(facts["cache"])) is None and facts["documents"] > 0
    assert not list((tmp_path / "cache").glob("*.partial-*"))
    again = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert again.returncode == 0 and "preparing" not in again.stderr and json.loads(again.stdout) == facts


def test_prepare_cli_fails_fast_on_a_missing_file(tmp_path, target, capsys):
    config = write_config(trainer_config(target, tmp_path / "out", [], method={"lambda_clm": 1.0}),
                          tmp_path / "run.yaml")
    assert main(["prepare", "--config", str(config), f"data.train_files=[{tmp_path}/gone.jsonl]"]) == 2
    assert f"data file '{tmp_path}/gone.jsonl' does not exist" in capsys.readouterr().err


@pytest.mark.slow
@pytest.mark.integration
def test_two_ranks_share_one_build_and_log_the_skipped_documents(tmp_path, target):
    texts = [Path(f).read_text() for f in corpus_files()] + ["", "  \n"]
    data = {"train_files": [str(_jsonl(tmp_path / "docs.jsonl", texts))], "cache_dir": str(tmp_path / "cache"),
            "seq_len": 64, "validation_fraction": 0.2}
    config = trainer_config(target, tmp_path / "out", [], method={"lambda_clm": 1.0}, data=data,
                            train={"max_steps": 2, "deepspeed": {"train_micro_batch_size_per_gpu": 2}},
                            run={"export": False})
    cmd = [str(Path(sys.executable).with_name("deepspeed")), "--num_gpus", "2", "--master_port", str(free_port()),
           "--module", "student_trainer", "--config", str(write_config(config, tmp_path / "run.yaml"))]
    done = subprocess.run(cmd, cwd=REPO, env=subprocess_env(), capture_output=True, text=True, timeout=400)
    log = done.stdout + done.stderr
    assert done.returncode == 0, log[-4000:]
    assert log.count("preparing the corpus") == 1 and '"world": 2' in log  # two ranks, one build
    assert '"empty_documents_skipped": 2' in log and '"documents": 4' in log  # the start-up log counts them
    (folder,) = [p for p in (tmp_path / "cache").iterdir() if p.is_dir()]
    assert problem(folder) is None


@pytest.mark.parametrize("change", ["older format", "foreign file", "another cache's"])
def test_a_cache_of_another_format_or_program_is_refused_naming_the_file(tmp_path, tok, change):
    d = _config(tmp_path, train_files=[str(_jsonl(tmp_path / "a.jsonl", DOCS))])
    folder = prepare_corpus(d, tok, progress=False).folder
    meta = json.loads((folder / "meta.json").read_text())
    if change == "older format":
        meta["format"] = 1
    elif change == "foreign file":
        meta = {"format": meta["format"], "name": "someone else's"}
    else:
        meta["key"] = "other-0123"
    (folder / "meta.json").write_text(json.dumps(meta))
    with pytest.raises(ValueError, match=rf"{folder}/meta.json: .*delete {folder}"):
        prepare_corpus(d, tok, progress=False)
    assert (folder / "train" / "ids.bin").exists()  # refused, never deleted: it may be someone else's
