"""The HF backend with a model sharded by accelerate (``device_map``): the same scores as in one piece.

No GPUs here, so the split is forced on CPU: a memory budget that holds the input embeddings but not the
rest sends the decoder layers and the output layer to disk (accelerate loads them per forward).
"""

from __future__ import annotations

import numpy as np

from teacher_server.backends.hf import load_hf

from ..conftest import make_config

TEXTS = ["def f(x):\n    return x + 1\n", "The quick brown fox jumps over the lazy dog."]


def test_a_model_split_over_cpu_and_disk_scores_like_the_whole_model(tiny_model_dirs, loaded, tmp_path):
    whole, tokenizer = loaded["llama"]
    embedding = whole.model.get_input_embeddings().weight
    budget = 2 * embedding.numel() * embedding.element_size() + 64_000  # accelerate keeps one layer's room free
    split, _ = load_hf(make_config(tiny_model_dirs["llama"], device_map="auto", max_memory={"cpu": str(budget)},
                                   offload_folder=str(tmp_path / "offload")))
    placed = set(split.model.hf_device_map.values())
    assert placed == {"cpu", "disk"}, split.model.hf_device_map
    assert split.device == "cpu,disk" or split.device == "disk,cpu"
    ids = [e.ids for e in tokenizer.encode(TEXTS)]
    for a, b in zip(whole.score(ids, 5), split.score(ids, 5), strict=True):
        np.testing.assert_array_equal(a.topk_ids, b.topk_ids)
        np.testing.assert_allclose(a.topk_logprobs, b.topk_logprobs, atol=1e-5)
        np.testing.assert_allclose(a.next_logprobs, b.next_logprobs, atol=1e-5)


def test_device_map_settings_are_checked_together():
    import pytest

    with pytest.raises(ValueError, match="only apply with device_map"):
        make_config("m", max_memory={"cpu": "1GB"})
    with pytest.raises(ValueError, match="compile does not apply"):
        make_config("m", device_map="auto", compile=True)
    assert make_config("m", device_map="auto", max_memory='{0: "70GiB", cpu: 100GiB}').max_memory == \
        {"0": "70GiB", "cpu": "100GiB"}
