"""The demo's generation scores end to end, against a real teacher server on loopback: a teacher serving the
target itself scores the held-out text's own continuation exactly as a direct forward does (the boundary between
prompt and continuation is where it should be), and the student's continuations are seeded and paired."""

from __future__ import annotations

import numpy as np
import pytest
import torch

from student_trainer.demo.generations import continue_prompts, generation_scores, heldout_prompts
from student_trainer.trainer.config import OnPolicyConfig
from student_trainer.trainer.data.blocks import load_target_tokenizer
from student_trainer.trainer.rollouts import TokenText
from tests.student_trainer.conftest import code_text, prose_text
from tests.student_trainer.trainer.helpers import Teacher

pytestmark = pytest.mark.integration
CFG = OnPolicyConfig(prompt_fraction=0.5, max_new_tokens=16)


@pytest.fixture(scope="module")
def served(target):
    teacher = Teacher(target)
    yield teacher
    teacher.stop()


def _setup(target):
    from transformers import AutoModelForCausalLM

    tokenizer = load_target_tokenizer(str(target))
    model = AutoModelForCausalLM.from_pretrained(target)
    text = TokenText([tokenizer.convert_ids_to_tokens(i) or "" for i in range(model.get_output_embeddings()
                                                                               .weight.shape[0])],
                     tokenizer.all_special_ids)
    prompts = heldout_prompts([code_text(4000), prose_text(4000)], tokenizer, 64, 6, CFG)
    return tokenizer, model, text, prompts


@torch.no_grad()
def _direct_nats_per_char(model, prompts, n_new: int) -> float:
    """The model's own NLL of each block's next ``n_new`` tokens after its prompt, per character they cover."""
    nll = chars = 0.0
    for block, p in zip(prompts.blocks, prompts.lengths, strict=True):
        ids = torch.from_numpy(block.ids[:p + n_new])[None]
        logp = torch.log_softmax(model(input_ids=ids).logits.float(), -1)[0, :-1].gather(-1, ids[0, 1:, None])
        nll -= float(logp[p - 1:].sum())
        chars += float(block.offsets[p + n_new - 1, 1] - block.offsets[p, 0])
    return nll / chars


def test_a_teacher_serving_the_model_scores_the_continuation_as_a_direct_forward(target, served):
    _, model, text, prompts = _setup(target)
    assert len(prompts.blocks) == 6 and all(p == 32 for p in prompts.lengths)
    judged = generation_scores(prompts.reference(16), prompts, text, {"self": served.address}, expert="self")
    direct = _direct_nats_per_char(model, prompts, 16)
    assert judged["gen_nats_per_char"] == judged["gen_expert_nats_per_char"]  # one source: MinCE is that source
    assert judged["gen_nats_per_char"] == pytest.approx(direct, rel=2e-3)  # float16 log-probs on the wire
    assert judged["gen_tokens"] == 16.0


def test_no_expert_no_expert_score(target, served):
    _, _, text, prompts = _setup(target)
    judged = generation_scores(prompts.reference(16), prompts, text, {"self": served.address}, expert=None)
    assert np.isnan(judged["gen_expert_nats_per_char"]) and np.isfinite(judged["gen_nats_per_char"])


def test_continuations_are_seeded_and_the_training_rng_is_untouched(target):
    tokenizer, model, text, prompts = _setup(target)
    torch.manual_seed(0)
    state = torch.random.get_rng_state()
    first = continue_prompts(model, tokenizer, prompts, CFG, text)
    assert torch.equal(torch.random.get_rng_state(), state)
    again = continue_prompts(model, tokenizer, prompts, CFG, text)
    assert all(np.array_equal(a, b) for a, b in zip(first, again, strict=True))
    assert all(1 <= len(c) <= 16 for c in first) and len(first) == 6
    greedy = continue_prompts(model, tokenizer, prompts, OnPolicyConfig(prompt_fraction=0.5, max_new_tokens=16,
                                                                         temperature=0.0), text)
    assert any(not np.array_equal(a, b) for a, b in zip(first, greedy, strict=True))  # sampled, not greedy
