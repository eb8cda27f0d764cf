"""The DeepSpeed config: the paper's defaults under the user's settings, merged once into a typed view; an
optimizer or scheduler of another type replaces the default block instead of inheriting its params."""

from __future__ import annotations

import pytest
import torch

from student_trainer.trainer.engine_config import DEEPSPEED_DEFAULTS, engine_config, merge_user

# The optimizers and schedulers docs/TRAINER.md names (each must build and step under DeepSpeed).
OPTIMIZERS = {"AdamW": {"lr": 1e-2}, "Adam": {"lr": 1e-2}, "SGD": {"lr": 0.1}}
SCHEDULERS = {"WarmupDecayLR": {"warmup_num_steps": 1, "total_num_steps": "auto"},
              "WarmupLR": {"warmup_min_lr": 0.0, "warmup_max_lr": "auto", "warmup_num_steps": 1},
              "WarmupCosineLR": {"total_num_steps": "auto", "warmup_num_steps": 1}, None: None}


def test_auto_fields_come_from_the_run():
    cfg = engine_config({"optimizer": {"params": {"lr": 3e-4}}}, on_gpu=False).for_run(max_steps=1000)
    sched = cfg["scheduler"]["params"]
    assert (sched["total_num_steps"], sched["warmup_num_steps"], sched["warmup_max_lr"]) == (1000, 8, 3e-4)
    assert cfg["optimizer"]["params"]["torch_adam"] is True  # DeepSpeed's fused Adam needs CUDA
    assert cfg["optimizer"]["params"]["betas"] == [0.9, 0.95]  # same type: the user's params refine the default's
    assert cfg["zero_optimization"]["stage"] == 2 and cfg["gradient_clipping"] == 1.0
    gpu = engine_config({"scheduler": {"params": {"warmup_num_steps": 5}}}, on_gpu=True).for_run(max_steps=10)
    assert gpu["scheduler"]["params"]["warmup_num_steps"] == 5 and "torch_adam" not in gpu["optimizer"]["params"]
    assert engine_config({}, on_gpu=False).for_run(max_steps=10)["scheduler"]["params"]["warmup_num_steps"] == 1


def test_another_optimizer_or_scheduler_type_replaces_the_default_block():
    cfg = engine_config({"optimizer": {"type": "SGD", "params": {"lr": 0.1}},
                         "scheduler": {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}}, on_gpu=False)
    assert cfg.raw["optimizer"] == {"type": "SGD", "params": {"lr": 0.1}}  # no betas, eps, weight_decay, torch_adam
    assert cfg.raw["zero_allow_untested_optimizer"] is True  # ZeRO refuses a torch.optim optimizer otherwise
    assert cfg.raw["scheduler"] == {"type": "WarmupLR", "params": {"warmup_num_steps": 3}}
    assert (cfg.optimizer, cfg.lr, cfg.micro_batch, cfg.grad_accum, cfg.zero_stage, cfg.bf16) == ("SGD", 0.1, 2, 1, 2,
                                                                                                    False)
    assert "scheduler" not in engine_config({"scheduler": None}, on_gpu=False).raw
    assert DEEPSPEED_DEFAULTS["optimizer"]["params"]["betas"] == [0.9, 0.95]  # the defaults are never modified


def test_a_typed_block_without_a_type_or_of_the_wrong_kind_is_refused():
    with pytest.raises(ValueError, match="train.deepspeed.optimizer: expected a mapping"):
        merge_user(DEEPSPEED_DEFAULTS, {"optimizer": "SGD"})
    with pytest.raises(ValueError, match=r"train.deepspeed.scheduler: needs a type \(e.g. WarmupDecayLR\)"):
        merge_user({k: v for k, v in DEEPSPEED_DEFAULTS.items() if k != "scheduler"}, {"scheduler": {"params": {}}})


@pytest.fixture(scope="module")
def process_group():
    from student_trainer.trainer.run_setup import init_distributed

    return init_distributed()


@pytest.mark.slow
@pytest.mark.parametrize("scheduler", list(SCHEDULERS), ids=str)
@pytest.mark.parametrize("optimizer", list(OPTIMIZERS))
def test_every_documented_optimizer_and_scheduler_trains_under_deepspeed(optimizer, scheduler, process_group):
    import deepspeed

    user = {"optimizer": {"type": optimizer, "params": OPTIMIZERS[optimizer]},
            "scheduler": None if scheduler is None else {"type": scheduler, "params": SCHEDULERS[scheduler]}}
    torch.manual_seed(0)
    model = torch.nn.Linear(8, 4)
    before = model.weight.detach().clone()
    cfg = engine_config(user, on_gpu=False).for_run(max_steps=8)
    engine, *_ = deepspeed.initialize(model=model, model_parameters=list(model.parameters()), config=cfg)
    for _ in range(4):  # WarmupDecayLR / WarmupLR run their first steps at the minimum lr (0)
        loss = engine(torch.randn(2, 8)).pow(2).mean()
        engine.backward(loss)
        engine.step()
    assert not torch.equal(engine.module.weight.detach(), before), "the weights did not move"
