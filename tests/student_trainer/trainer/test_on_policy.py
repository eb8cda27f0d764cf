"""On-policy fusion (issue 21): the student's own samples, scored live by the teachers.

Units: which micro-batches are rollouts; a rollout's text and character offsets equal what the target tokenizer
gives for the same tokens; sampling is seeded and leaves the training RNG alone; the loss touches only the
continuation's aligned positions; a source down under ``skip`` is left out of a rollout's fusion and counted;
bad settings are refused naming the field. Runs (real teachers on loopback, real DeepSpeed steps): share 0 is
today's training exactly; a teacher that fails while rollouts are scored stops the run under ``fail`` and the
same command resumes with the straight run's samples and weights; two ranks under ZeRO-3, whose generations
end at different steps, train on rollouts together.
"""

from __future__ import annotations

import re
import typing
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from protos.vocabulary import raw_vocab, tokenizer_fingerprint
from student_trainer.trainer import rollouts as rollouts_module
from student_trainer.trainer.config import (
    ConfigError,
    MethodConfig,
    OnPolicyConfig,
    SourceConfig,
    load_trainer_config,
)
from student_trainer.trainer.data.blocks import Block, collate, load_target_tokenizer, tokenize_texts
from student_trainer.trainer.loop import rollout_loss, train
from student_trainer.trainer.prefetch import FusedBatch
from student_trainer.trainer.rollouts import (
    TokenText,
    continuation_mask,
    gather_plan,
    is_rollout,
    prompt_length,
    rollout_block,
    rollout_seed,
    sample,
)
from student_trainer.trainer.sources import Source, SourceFailed
from student_trainer.trainer.stats import FusionStats, RolloutStats, StepRecord, summary
from student_trainer.trainer.vocab_cache import default_vocab_dir
from tests import REPO

from .helpers import (
    Teacher,
    launch_ranks,
    losses_by_step,
    read_metrics,
    source,
    trainer_config,
    write_config,
)

TEXT = "def f(x):\n    return  x + 1  # café ☃ 日本\n\nclass A:  pass\t\tdone 😀!"


# ---------------------------------------------------------------- units


def test_rollouts_are_evenly_spread_a_pure_function_of_the_index():
    assert not any(is_rollout(0.0, m) for m in range(1000))
    assert all(is_rollout(1.0, m) for m in range(1000))
    quarter = [m for m in range(400) if is_rollout(0.25, m)]
    assert len(quarter) == 100 and set(np.diff(quarter)) == {4}  # one in every four, evenly
    assert sum(is_rollout(0.3, m) for m in range(1000)) == 300
    assert all(sum(is_rollout(0.3, m) for m in range(s, s + 10)) == 3 for s in range(0, 1000, 10))
    seeds = {rollout_seed(0, r, m) for r in range(2) for m in range(100)}
    assert len(seeds) == 200 and rollout_seed(0, 1, 7) == rollout_seed(0, 1, 7) != rollout_seed(1, 1, 7)


@pytest.mark.parametrize("name", ["mistral-spm", "llama-spm", "gpt-2", "mpt"])
def test_a_rollouts_text_and_offsets_are_the_tokenizers_own(name, tokenizers):
    """Treat the tokens after every possible prompt as if the student had sampled them: the rollout block
    rebuilds the text exactly, with the offsets the fast tokenizer gives (byte tokens inside a multi-byte
    character span it; SentencePiece's ▁ is a space after other text; MPT's literal whitespace tokens)."""
    tok = tokenizers(name)
    text = TokenText(raw_vocab(tok, len(tok) + 40), tok.all_special_ids)
    ((ids, offsets),) = tokenize_texts(tok, [TEXT])
    block = Block(ids, offsets, TEXT)
    for want in range(1, len(ids)):
        prompt = prompt_length(block, OnPolicyConfig(prompt_tokens=want))
        assert prompt <= want and (prompt == len(ids) or offsets[prompt, 0] >= offsets[prompt - 1, 1])
        rolled, kept = rollout_block(block, prompt, ids[prompt:], text)
        assert kept == len(ids) - prompt
        assert rolled.text == TEXT, (want, rolled.text)
        np.testing.assert_array_equal(rolled.offsets, offsets)
        np.testing.assert_array_equal(rolled.ids, ids)


def test_a_continuation_ends_before_its_first_token_without_text(tokenizers):
    tok = tokenizers("mistral-spm")
    text = TokenText(raw_vocab(tok, len(tok) + 40), tok.all_special_ids)
    ((ids, offsets),) = tokenize_texts(tok, [TEXT])
    block = Block(ids, offsets, TEXT)
    for stop in (tok.eos_token_id, tok.bos_token_id, len(tok) + 3):  # EOS, another special, a padded output row
        rolled, kept = rollout_block(block, 5, np.array([*ids[5:9], stop, *ids[9:12]]), text)
        assert kept == 4 and len(rolled.ids) == 9 and rolled.text == TEXT[:offsets[8, 1]]
    assert text.padded_rows == list(range(len(tok), len(tok) + 40))
    invalid = text.text(np.array([tok.convert_tokens_to_ids("<0xE2>"), ids[1]]))
    assert invalid[0] == "\ufffd" + " f" and invalid[1].tolist() == [[0, 1], [1, 3]]  # a lone byte: U+FFFD


def test_sampling_is_seeded_uses_only_temperature_and_top_p_and_leaves_the_training_rng_alone(target):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(target)
    prompts = [np.array([1, 300, 400, 500]), np.array([600, 700])]  # left-padded together
    cfg = OnPolicyConfig(share=0.5, max_new_tokens=6)
    kw = {"pad_id": 0, "eos_id": None, "suppress": [], "synced": False}
    torch.manual_seed(123)
    before = torch.get_rng_state()
    a = [x.ids for x in sample(model, prompts, cfg, seed=5, **kw)]
    assert torch.equal(torch.get_rng_state(), before)  # fork_rng: the training RNG did not move
    b = [x.ids for x in sample(model, prompts, cfg, seed=5, **kw)]
    c = [x.ids for x in sample(model, prompts, cfg, seed=6, **kw)]
    assert [x.tolist() for x in a] == [x.tolist() for x in b] != [x.tolist() for x in c]
    assert [len(x) for x in a] == [6, 6]
    model.generation_config.top_k, model.generation_config.min_p = 2, 0.9  # a checkpoint's generation defaults
    assert [x.ids.tolist() for x in sample(model, prompts, cfg, seed=5, **kw)] == [x.tolist() for x in a]
    assert model.generation_config.top_k == 2  # put back
    greedy = OnPolicyConfig(share=0.5, max_new_tokens=6, temperature=0)
    alone = sample(model, prompts[1:], greedy, seed=0, **kw)
    padded = sample(model, prompts, greedy, seed=0, candidates=3, **kw)
    assert alone[0].ids.tolist() == padded[1].ids.tolist()  # greedy: left padding does not change a row
    assert padded[1].candidates.shape == (6, 3) and alone[0].candidates is None
    assert padded[1].candidates[:, 0].tolist() == padded[1].ids.tolist()  # greedy picks each step's top candidate


def test_the_rollout_loss_touches_only_the_continuations_aligned_positions():
    """The gradient of the on-policy loss w.r.t. the logits is zero at the prompt's positions, at positions
    without a source distribution and at padding; non-zero at every other continuation position."""
    vocab, width = 11, 9
    blocks = [Block(np.arange(9) % vocab, np.stack([np.arange(9), np.arange(1, 10)], 1), "x" * 9),
              Block(np.arange(6) % vocab, np.stack([np.arange(6), np.arange(1, 7)], 1), "x" * 6)]
    batch = collate(3, blocks, pad_id=0)
    prompts = [4, 2]
    aligned = np.ones((2, width), bool)
    aligned[0, 5] = False  # the one-hot fallback here: left out
    mask = continuation_mask(batch.attention_mask, prompts) & aligned
    expected = np.zeros((2, width), bool)
    expected[0, [3, 4, 6, 7]] = True  # row 0: positions 3..7 predict tokens 4..8; 5 is not aligned
    expected[1, [1, 2, 3, 4]] = True  # row 1: 6 tokens, prompt 2 -> positions 1..4
    np.testing.assert_array_equal(mask, expected)
    rng = np.random.default_rng(0)
    ids = np.stack([rng.permutation(vocab)[:3] for _ in range(2 * width)]).reshape(2, width, 3)
    fused = FusedBatch(batch, mask, ids, np.log(np.full((2, width, 3), 0.3, np.float32)), FusionStats(),
                       rollout=RolloutStats(1, 2))
    logits = torch.randn(2, width, vocab, requires_grad=True)

    def engine(**_):
        return SimpleNamespace(logits=logits)

    engine.device = torch.device("cpu")
    run = SimpleNamespace(engine=engine, config=SimpleNamespace(on_policy=OnPolicyConfig()))
    loss, value = rollout_loss(run, fused, num_tokens=float(mask.sum()))
    loss.backward()
    touched = logits.grad.abs().sum(-1).numpy() > 0
    np.testing.assert_array_equal(touched, expected)
    assert value > 0


@pytest.mark.integration
def test_a_source_down_under_skip_is_left_out_of_a_rollouts_fusion_and_counted(target, tiny_model_dirs):
    """The rollouts' scoring goes through each source's failure policy: gpt2 killed under ``skip`` is skipped
    (counted), mpt alone fills the targets; with both down no position has a source distribution and none
    is trained on (all counted as unaligned)."""
    tok = load_target_tokenizer(str(target))
    vocab = raw_vocab(tok, len(tok) + 64)
    running = {name: Teacher(tiny_model_dirs[name]) for name in ("gpt2", "mpt")}
    sources = [Source.connect(SourceConfig(name=n, endpoints=[t.address], failure="skip", timeout_s=10), vocab,
                              tokenizer_fingerprint(tok), default_vocab_dir(), 10) for n, t in running.items()]
    try:
        ((ids, offsets),) = tokenize_texts(tok, [Path(__file__).read_text()[:400]])
        text = TokenText(vocab, tok.all_special_ids)
        rolled = [rollout_block(Block(ids[:40], offsets[:40], Path(__file__).read_text()[:offsets[39, 1]]), 12,
                                ids[40:40 + n], text)[0] for n in (20, 14)]
        batch = collate(1, rolled, tok.pad_token_id)
        running["gpt2"].kill()
        with ThreadPoolExecutor(4) as pool:
            fused = rollouts_module.score(batch, [12, 12], 34, sources, MethodConfig(), pool)
            cont = continuation_mask(batch.attention_mask, [12, 12])
            assert fused.stats.sources["gpt2"].skipped == 2 and fused.stats.sources["mpt"].selected == 2
            assert fused.rollout == RolloutStats(1, 2, 34, int(cont.sum()), int(fused.loss_mask.sum()))
            assert 0 < fused.loss_mask.sum() <= cont.sum() and not (fused.loss_mask & ~cont).any()
            running["mpt"].kill()
            fused = rollouts_module.score(batch, [12, 12], 34, sources, MethodConfig(), pool)
    finally:
        for t in running.values():
            t.stop()
        for s in sources:
            s.close()
    assert fused.stats.no_teacher_sequences == 2 and fused.loss_mask.sum() == 0
    assert fused.rollout.unaligned_positions == int(cont.sum())


@pytest.mark.parametrize(("override", "message"), [
    ("on_policy.share=1.5", "on_policy.share: Input should be less than or equal to 1 (got 1.5)"),
    ("on_policy.divergence=kl", "on_policy.divergence: Input should be 'forward_kl', 'reverse_kl' or 'jsd'"),
    ("on_policy.gather_candidates=0", "on_policy.gather_candidates: Input should be greater than or equal to 1"),
    ("on_policy.jsd_beta=1", "on_policy.jsd_beta: Input should be less than 1 (got 1)"),
    ("on_policy.top_p=0", "on_policy.top_p: Input should be greater than 0 (got 0)"),
    ("on_policy.temperature=-1", "on_policy.temperature: Input should be greater than or equal to 0 (got -1)"),
    ("on_policy.max_new_tokens=0", "on_policy.max_new_tokens: Input should be greater than or equal to 1"),
    ("on_policy.prompt_fraction=1", "on_policy.prompt_fraction: Input should be less than 1 (got 1)"),
    ("on_policy.prompt_tokens=64", "on_policy.prompt_tokens=64 must be less than data.seq_len=64"),
    ("on_policy={prompt_tokens: 8, prompt_fraction: 0.5}", "on_policy: set prompt_tokens or prompt_fraction, not both"),
    ("sources=[]", "on_policy.share=0.5 needs at least one source"),
    ("on_policy.rollouts=3", "on_policy.rollouts: Extra inputs are not permitted"),
])
def test_bad_on_policy_settings_are_refused_naming_the_field(override, message, tmp_path):
    config = trainer_config(tmp_path / "target", tmp_path / "out", [{"name": "a", "endpoints": ["127.0.0.1:1"]}],
                            on_policy={"share": 0.5}, method={"lambda_clm": 1.0})
    with pytest.raises(ConfigError) as err:
        load_trainer_config(write_config(config, tmp_path / "run.yaml"), [override])
    assert message in str(err.value)


def test_share_zero_accepts_any_divergence_and_the_names_are_the_cores():
    from student_trainer.core.losses import DIVERGENCES

    assert OnPolicyConfig(divergence="jsd").share == 0  # nothing is refused while no rollout is drawn
    assert set(typing.get_args(OnPolicyConfig.model_fields["divergence"].annotation)) == set(DIVERGENCES)


def test_the_docs_list_every_on_policy_setting_and_the_summarys_lines():
    trainer_md = (REPO / "docs" / "TRAINER.md").read_text()
    for name in OnPolicyConfig.model_fields:
        assert f"| `on_policy.{name}` |" in trainer_md, name
    record = StepRecord(7, 6.0, 5.9, 7.0, tokens=1000, step_seconds=2.0, teacher_wait_seconds=0.5,
                        fusion=FusionStats(micro_batches=4), on_policy_loss=1.5, generate_seconds=0.6,
                        fuse_wait_seconds=0.1, train_seconds=0.8, rollouts=RolloutStats(1, 2, 60, 62, 50))
    lines = summary([record]).splitlines()
    assert lines[-2:] == ["  on-policy: loss 1.5000, 1 rollouts (25.0% of micro-batches), 60 new tokens, trained "
                          "positions 80.6% (no source distribution: 12)",
                          "  step time: generate 30.0%, wait for teachers 20.0%, align and fuse 5.0%, train 40.0%"]
    documented = {re.sub(r"\d+(\.\d+)?", "N", line.strip()) for line in trainer_md.splitlines()}
    assert all(re.sub(r"\d+(\.\d+)?", "N", line.strip()) in documented for line in lines[-2:])
    assert len(summary([StepRecord(7, 6.0, 5.9, 7.0, tokens=1000)]).splitlines()) == 1  # no rollouts: as before


# ---------------------------------------------------------------- runs

SGD = {"optimizer": {"type": "SGD", "params": {"lr": 0.5}}, "scheduler": None}  # every step moves the weights
ON_POLICY = {"share": 0.5, "prompt_tokens": 16, "max_new_tokens": 12}  # micro-batches 1, 3, 5, ... are rollouts


@pytest.fixture
def recorded(monkeypatch):
    """micro-batch index -> the rollouts' (ids, text) as they went to the teachers (every run in this process)."""
    seen: dict[int, list[tuple[list[int], str]]] = {}
    score = rollouts_module.score

    def spy(batch, *args, **kwargs):
        seen[batch.index] = [(b.ids.tolist(), b.text) for b in batch.blocks]
        return score(batch, *args, **kwargs)

    monkeypatch.setattr(rollouts_module, "score", spy)
    return seen


def _config(tmp_path: Path, name: str, target: Path, sources: list, **sections) -> Path:
    config = trainer_config(target, tmp_path / name, sources, **{
        "method": {"lambda_clm": 1.0}, "on_policy": ON_POLICY,
        "train": {"max_steps": 4, "seed": 0, "deepspeed": {"train_micro_batch_size_per_gpu": 2,
                                                           "gradient_accumulation_steps": 2, **SGD}},
        "run": {"output_dir": str(tmp_path / name), "eval_blocks": 2, "progress": False, "prefetch_depth": 2,
                "connect_timeout_s": 10, "summary_every": 2}, **sections})
    return write_config(config, tmp_path / f"{name}.yaml")


def _weights(out: Path) -> dict[str, torch.Tensor]:
    return load_file(out / "final" / "model.safetensors")


@pytest.mark.integration
@pytest.mark.slow
def test_a_teacher_failing_during_rollouts_stops_the_run_and_the_rerun_draws_the_same_samples(
        tmp_path, target, teachers, tiny_model_dirs, recorded, caplog):
    """λ = 1: the corpus micro-batches train on CLM alone, so the teachers score nothing but rollouts. gpt2
    (policy ``fail``) answers the rollouts of steps 1 and 2 and dies scoring step 3's: the run stops with a
    checkpoint of step 2, the same command resumes, and every rollout, loss and weight equals a straight run's."""
    caplog.set_level("INFO", logger="livefuse")
    train(load_trainer_config(_config(tmp_path, "straight", target, [source("gpt2", teachers["gpt2"], failure="fail"),
                                                                      source("mpt", teachers["mpt"])])))
    straight = dict(recorded)
    assert sorted(straight) == [1, 3, 5, 7]
    steps, _ = read_metrics(tmp_path / "straight")
    for r in steps:
        assert r["rollouts"] == 1 and r["rollout_new_tokens"] > 0 and r["rollout_trained_positions"] > 0
        assert r["on_policy_loss"] > 0 and r["fusion_loss"] == 0  # λ = 1: no fusion term on the corpus
        assert r["loss"] == pytest.approx(r["clm_loss"] + r["on_policy_loss"], rel=1e-5)
        assert r["generate_seconds"] > 0 and r["train_seconds"] > 0 and r["teacher_wait_seconds"] >= 0
    assert "  on-policy: loss " in caplog.text and "  step time: generate " in caplog.text
    assert all(16 < len(ids) <= 16 + 12 and text for rows in straight.values() for ids, text in rows)  # prompt + new

    recorded.clear()
    flaky = Teacher(tiny_model_dirs["gpt2"], hold_after=2)
    try:
        chaos = flaky.kill_when_held()
        config = load_trainer_config(_config(tmp_path, "failed", target, [source("gpt2", flaky, failure="fail"),
                                                                          source("mpt", teachers["mpt"])]))
        with pytest.raises(SourceFailed, match="source 'gpt2' failed: "):
            train(config)
        chaos.join(60)
        assert (tmp_path / "failed" / "checkpoints" / "latest").read_text().strip() == "step2"
        first = dict(recorded)
        recorded.clear()
        flaky.start(tiny_model_dirs["gpt2"])  # back on the same port: the same command goes on
        train(config)
    finally:
        flaky.stop()
    assert "resumed from step 2" in caplog.text
    assert sorted(first) == [1, 3, 5] and sorted(recorded) == [5, 7]  # step 3's rollout was drawn twice
    assert {**first, **recorded} == straight and first[5] == recorded[5]
    assert losses_by_step(tmp_path / "failed") == losses_by_step(tmp_path / "straight")  # exactly
    got, expected, initial = _weights(tmp_path / "failed"), _weights(tmp_path / "straight"), load_file(
        target / "model.safetensors")
    assert all(torch.equal(got[k], expected[k]) for k in expected)  # bit-identical
    assert any(not torch.equal(expected[k], initial[k]) for k in expected)


@pytest.mark.integration
def test_share_zero_is_todays_training_exactly(tmp_path, target, teachers, recorded):
    """The first steps of tests/student_trainer/trainer/test_steps.py's pinned fused run (the same config: AdamW
    at a constant lr, so step 2's loss comes after a real update), with every other on-policy setting changed:
    share 0 draws no rollout and changes nothing."""
    from tests.student_trainer.trainer.test_steps import PINNED, TRAIN

    pinned = {step: PINNED[step] for step in (1, 2)}
    config = trainer_config(target, tmp_path / "out", [source(n, t) for n, t in teachers.items()],
                            on_policy={"share": 0.0, "prompt_tokens": 8, "max_new_tokens": 4, "temperature": 0.5},
                            train={**TRAIN, "max_steps": 2},
                            run={"output_dir": str(tmp_path / "out"), "eval_blocks": 2, "progress": False,
                                 "prefetch_depth": 2, "connect_timeout_s": 10, "export": False})
    train(load_trainer_config(write_config(config, tmp_path / "run.yaml")))
    steps, _ = read_metrics(tmp_path / "out")
    assert {r["step"]: r["loss"] for r in steps} == pytest.approx(pinned, rel=1e-6)
    assert not recorded and all(r["rollouts"] == 0 and r["generate_seconds"] == 0 for r in steps)


@pytest.mark.integration
@pytest.mark.slow
def test_two_ranks_under_zero3_train_on_their_rollouts_together(tmp_path, target, teachers):
    """ZeRO-3 gathers every layer's parameters across the ranks in each forward, generation's included. The
    ranks' generations end at different steps (max_new_tokens 6 on rank 0, 14 on rank 1, as when one samples
    EOS early): rank 0 keeps joining the gathers until rank 1 is done, the run completes and exports."""
    configs = []
    for rank, new in enumerate((6, 14)):
        config = trainer_config(target, tmp_path / "out", [source(n, t) for n, t in teachers.items()],
                                on_policy={**ON_POLICY, "max_new_tokens": new},
                                train={"max_steps": 2, "seed": 0, "deepspeed": {
                                    "train_micro_batch_size_per_gpu": 2, "gradient_accumulation_steps": 2,
                                    "zero_optimization": {"stage": 3}, **SGD}},
                                run={"output_dir": str(tmp_path / "out"), "eval_blocks": 4, "progress": False,
                                     "prefetch_depth": 2, "connect_timeout_s": 30, "summary_every": 2})
        configs.append(write_config(config, tmp_path / f"rank{rank}.yaml"))
    done = launch_ranks(configs)
    assert all(d.returncode == 0 for d in done), done[0].stderr[-3000:] + done[1].stderr[-3000:]
    steps, evals = read_metrics(tmp_path / "out")
    assert [r["step"] for r in steps] == [1, 2] and len(evals) == 1
    for r in steps:  # rank 0's rollouts (one per step); the losses and the token count are over both ranks
        assert r["rollouts"] == 1 and 0 < r["rollout_new_tokens"] <= 2 * 6 and r["on_policy_loss"] > 0
        assert r["loss"] == pytest.approx(0.9 * r["clm_loss"] + 0.1 * r["fusion_loss"] + r["on_policy_loss"], rel=1e-5)
    assert "  on-policy: loss " in done[0].stderr
    trained, initial = _weights(tmp_path / "out"), load_file(target / "model.safetensors")
    assert any(not torch.equal(trained[k], initial[k]) for k in initial)


def test_the_gather_plan_asks_at_character_boundaries_for_each_positions_candidates(tokenizers):
    """Where the teachers are asked for the student's candidates: each continuation position (the prompt's last
    position predicts the first new token) whose token ends on a character boundary — not a byte fragment inside
    a character, which no teacher position has read to — at the character it ends at."""
    tok = tokenizers("mistral-spm")
    text = "def f(x): 🦙 done"  # the llama is four byte tokens in this vocabulary
    ((ids, offsets),) = tokenize_texts(tok, [text])
    block = Block(ids, offsets, text)
    prompt = 3
    candidates = np.arange(len(ids) * 2).reshape(-1, 2)[: len(ids) - prompt]
    plan = gather_plan(block, prompt, candidates)
    fragments = {i for i in range(len(ids) - 1) if offsets[i + 1, 0] < offsets[i, 1]}
    assert fragments, "the text has no byte-fragment tokens"
    expected = [i for i in range(prompt - 1, len(ids) - 1) if i not in fragments]
    assert plan.positions.tolist() == expected and plan.ends.tolist() == offsets[expected, 1].tolist()
    assert (np.diff(plan.ends) > 0).all()
    assert plan.candidates.tolist() == candidates[np.array(expected) - (prompt - 1)].tolist()


@pytest.mark.integration
def test_gathered_log_probs_equal_a_direct_forward_and_join_the_fused_support(target, tiny_model_dirs):
    """reverse_kl / jsd: each teacher gives its log-probs at the student's candidates where its token ends with
    the target's — same tokenizer (gpt-neox with Mistral's, the target's) and another (gpt2, byte-level BPE) — equal
    to a direct forward of the teacher model; candidates without an exact counterpart are left out and counted;
    the gathered entries join the fused rows; a teacher that cannot gather is refused when the run connects."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = load_target_tokenizer(str(target))
    vocab = raw_vocab(tok, len(tok) + 64)
    text_all = Path(__file__).read_text()[:600]
    ((ids, offsets),) = tokenize_texts(tok, [text_all])
    block = Block(ids[:48], offsets[:48], text_all[:offsets[47, 1]])
    rng = np.random.default_rng(0)
    candidates = np.concatenate([ids[12:47, None], rng.integers(3, len(tok), (35, 3))], 1)  # the true next + 3
    plan = gather_plan(block, 12, candidates)
    running = {name: Teacher(tiny_model_dirs[name]) for name in ("gpt-neox", "gpt2")}
    sources = [Source.connect(SourceConfig(name=n, endpoints=[t.address], timeout_s=30), vocab,
                              tokenizer_fingerprint(tok), default_vocab_dir(), 10, gather_ids=35 * 4)
               for n, t in running.items()]
    try:
        for source, name in zip(sources, running, strict=True):
            ends, teacher_ids = plan.for_source(source)
            (out,) = source.fetch([block.text], [(ends, teacher_ids)])
            model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[name])
            t_tok = AutoTokenizer.from_pretrained(tiny_model_dirs[name])
            enc = t_tok(block.text, add_special_tokens=False, return_offsets_mapping=True)
            with torch.no_grad():
                logp = torch.log_softmax(model(torch.tensor([enc["input_ids"]])).logits[0].float(), -1)
            t_end = np.asarray(enc["offset_mapping"])[:, 1]
            checked = 0
            for r, e in enumerate(ends.tolist()):
                at = np.flatnonzero(t_end == e)
                for c, tid in enumerate(teacher_ids[r].tolist()):
                    if tid < 0 or not len(at):
                        assert np.isneginf(out.gathered_logprobs[r, c])
                        continue
                    assert out.gathered_logprobs[r, c] == pytest.approx(float(logp[at[-1], tid]), rel=1e-3)  # fp16
                    checked += 1
            assert checked > 20, name
            if name == "gpt-neox":  # the target's own tokenizer: every candidate has its counterpart
                assert (teacher_ids >= 0).all()
        batch = collate(1, [block], tok.pad_token_id)
        with ThreadPoolExecutor(4) as pool:
            fused = rollouts_module.score(batch, [12], 35, sources, MethodConfig(), pool, [plan])
        row = plan.positions[5]
        held = set(fused.fuse_ids[0, row][np.isfinite(fused.fuse_logprobs[0, row])].tolist())
        assert set(plan.candidates[5].tolist()) <= held  # MinCE's pick holds every candidate at an aligned row
        assert fused.rollout.gather_candidates == 2 * plan.candidates.size
        assert 0 < fused.rollout.gather_no_counterpart < plan.candidates.size  # gpt2 lacks some of Mistral's tokens
        with Teacher(tiny_model_dirs["gpt2"], max_gather_ids=0) as cannot, pytest.raises(
                ConfigError, match=r"source 'x' cannot gather \(backend hf: TeacherInfo.max_gather_ids = 0\)"):
            Source.connect(SourceConfig(name="x", endpoints=[cannot.address], timeout_s=10), vocab,
                           tokenizer_fingerprint(tok), default_vocab_dir(), 10, gather_ids=8)
    finally:
        for t in running.values():
            t.stop()
        for s in sources:
            s.close()


@pytest.mark.integration
@pytest.mark.slow
def test_reverse_kl_and_jsd_train_on_the_teachers_log_probs_at_the_students_candidates(tmp_path, target, teachers):
    """The divergences that need gather, end to end: every rollout asks both teachers for the student's
    candidates, counts those without a counterpart, and trains (the loss is finite and positive, the weights
    move)."""
    sources = [source(n, t) for n, t in teachers.items()]
    for kind in ("reverse_kl", "jsd"):
        train(load_trainer_config(_config(tmp_path, kind, target, sources, on_policy={
            **ON_POLICY, "divergence": kind, "gather_candidates": 4}, train={
                "max_steps": 2, "seed": 0, "deepspeed": {"train_micro_batch_size_per_gpu": 2,
                                                         "gradient_accumulation_steps": 2, **SGD}})))
        steps, _ = read_metrics(tmp_path / kind)
        assert [r["rollouts"] for r in steps] == [1, 1]
        assert all(0 < r["on_policy_loss"] < 50 for r in steps), steps
        assert all(0 <= r["gather_no_counterpart_share"] < 1 for r in steps)
        moved = _weights(tmp_path / kind)
        assert any(not torch.equal(moved[k], w) for k, w in load_file(target / "model.safetensors").items())
