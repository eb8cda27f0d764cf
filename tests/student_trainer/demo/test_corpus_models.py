"""The demo's corpus split (train / validation / held-out by file, disjoint) and the cache key of its
pretrained models (a changed training text is a different model)."""

from __future__ import annotations

import json

import pytest

from student_trainer.demo.corpus import FILE_SPLITS, read_jsonl, write_corpus, write_mixed_validation
from student_trainer.demo.models import Recipe


def test_splits_are_disjoint_by_file_and_the_held_out_files_stay_put(tmp_path):
    paths = write_corpus(tmp_path / "c", held_out=0.1, validation=0.1, max_files=60)
    assert set(paths) == {f"{d}_{s}" for d in ("code", "prose") for s in FILE_SPLITS}
    texts = {name: read_jsonl(path) for name, path in paths.items()}
    for domain in ("code", "prose"):
        sets = [set(texts[f"{domain}_{s}"]) for s in FILE_SPLITS]
        assert all(sets) and not (sets[0] & sets[1] or sets[0] & sets[2] or sets[1] & sets[2])
    # the held-out (test) files are the first of the seeded permutation whatever the validation share
    again = write_corpus(tmp_path / "d", held_out=0.1, validation=0.0, max_files=60)
    assert read_jsonl(again["code_heldout"]) == texts["code_heldout"]
    mixed = [json.loads(line)["text"] for line in write_mixed_validation(paths, chars=100, docs=6).read_text().splitlines()]
    assert mixed[0] == texts["code_valid"][0][:100] and mixed[1] == texts["prose_valid"][0][:100]
    assert write_corpus(tmp_path / "c") == paths  # written once, then reused


def test_a_models_cache_key_covers_its_recipe_and_its_training_text():
    recipe = Recipe("llama", "llama-spm", ("code",), steps=10)
    assert recipe.key(["a", "b"]) == Recipe("llama", "llama-spm", ("code",), steps=10).key(["a", "b"])
    assert recipe.key(["a", "b"]) != recipe.key(["a", "c"]) != recipe.key(["ab"])
    assert recipe.key(["a"]) != Recipe("llama", "llama-spm", ("code",), steps=11).key(["a"])


def test_pretrain_publishes_once_and_an_interrupted_build_leaves_nothing(tmp_path, monkeypatch):
    from student_trainer.demo import models

    monkeypatch.setattr("student_trainer.demo.assets.tokenizer_dir", _cached_tokenizer_dir())  # before the cache moves
    monkeypatch.setenv("LIVEFUSE_CACHE", str(tmp_path))
    recipe, texts = Recipe("llama", "llama-spm", ("code",), steps=2, batch=2, seq_len=16), ["def f(x):\n    return x\n" * 40]

    def interrupted(tmp, *args):
        (tmp / "half-written").write_text("x")
        raise KeyboardInterrupt

    with monkeypatch.context() as m:
        m.setattr(models, "_pretrain_into", interrupted)
        with pytest.raises(KeyboardInterrupt):
            models.pretrain(recipe, texts, "code")
    assert not list((tmp_path / "demo-models").iterdir())  # no half-built folder, no leftover temporary
    folder = models.pretrain(recipe, texts, "code")
    assert (folder / "config.json").exists() and [p.name for p in (tmp_path / "demo-models").iterdir()] == [folder.name]
    assert models.pretrain(recipe, texts, "code") == folder  # cached


def _cached_tokenizer_dir():
    """The real tokenizers from the user's cache (downloaded once by ./scripts/test.sh), whatever LIVEFUSE_CACHE
    the test sets for the models."""
    from student_trainer.demo.assets import tokenizer_dir

    folders = {name: tokenizer_dir(name) for name in ("llama-spm",)}
    return folders.__getitem__
