"""Compute accounting (trainers/compute.py) and training budgets: token counts from real forwards of a tiny GPT-2,
FLOPs by hand, budget → steps, and the budget's validation."""
from __future__ import annotations

import pytest
import torch

from rlhf_lab.config import ConfigError, validate_run_config
from rlhf_lab.models.sampling import sample_completions
from rlhf_lab.trainers.compute import COST_COLUMNS, ComputeMeter, budget_spent, matmul_weights, steps_for_budget
from tests.test_config import composed


def gpt2_matmul_weights(n_layer: int, d: int, vocab: int) -> int:
    """Per block: qkv (d×3d), attention output (d×d), MLP up (d×4d) and down (4d×d) = 12·d²; plus the LM head
    (vocab×d, tied to the embedding but a matmul all the same)."""
    return n_layer * 12 * d * d + vocab * d


def test_matmul_weights_of_gpt2(tiny_model):
    cfg = tiny_model.config
    assert matmul_weights(tiny_model) == gpt2_matmul_weights(cfg.n_layer, cfg.n_embd, cfg.vocab_size)


def test_meter_counts_forward_and_backward_tokens_and_flops(tiny_model):
    meter = ComputeMeter()
    meter.watch("policy", tiny_model)
    ids = torch.randint(0, tiny_model.config.vocab_size, (3, 7))
    tiny_model(input_ids=ids).logits.sum().backward()           # a training forward: 21 tokens with a backward
    with torch.no_grad():
        tiny_model(ids[:2])                                       # a scoring forward: 14 tokens
    with meter.paused(), torch.no_grad():
        tiny_model(input_ids=ids)                                 # the shared evaluation: not counted
    meter.add_samples(5)
    totals = meter.totals()
    assert list(totals) == COST_COLUMNS
    n = matmul_weights(tiny_model)
    assert (totals["tokens_backward_policy"], totals["tokens_forward_policy"]) == (21, 14)
    assert totals["train_flops"] == 6 * n * 21 + 2 * n * 14
    assert totals["train_samples"] == 5 and totals["tokens_forward_critic"] == 0
    assert totals["train_seconds"] > 0 and totals["peak_rss_mib"] > 0
    meter.close()
    tiny_model(input_ids=ids)
    assert meter.totals()["tokens_backward_policy"] == 21          # closed: hooks removed


def test_sampling_with_a_kv_cache_counts_each_new_token_once(tiny_model, tiny_tokenizer):
    meter = ComputeMeter()
    meter.watch("policy", tiny_model)
    prompts = [[5, 6, 7], [8, 9]]                                  # left-padded to width 3
    seqs = sample_completions(tiny_model, prompts, eos_id=-1, pad_id=tiny_tokenizer.pad_token_id,
                              max_new_tokens=4, generator=torch.Generator().manual_seed(0))
    assert seqs.completion_width == 4                              # no EOS: all four steps run
    # the prefill forwards 2 × 3 prompt tokens, then each of the 3 later steps 2 × 1 new tokens
    assert meter.totals()["tokens_forward_policy"] == 2 * 3 + 3 * 2


def test_resumed_meter_continues_where_the_checkpoint_left_it(tiny_model):
    first = ComputeMeter()
    first.watch("policy", tiny_model)
    with torch.no_grad():
        tiny_model(input_ids=torch.zeros(2, 4, dtype=torch.long))
    first.add_samples(2)
    state = first.state_dict()
    second = ComputeMeter()
    second.watch("policy", tiny_model)
    second.load_state_dict(state)
    with torch.no_grad():
        tiny_model(input_ids=torch.zeros(1, 4, dtype=torch.long))
    totals = second.totals()
    assert (totals["tokens_forward_policy"], totals["train_samples"]) == (8 + 4, 2)
    assert totals["train_seconds"] >= state["seconds"]


@pytest.mark.parametrize("samples, per_step, steps", [(960, 32, 30), (961, 32, 31), (1000, 32, 32), (5, 32, 1)])
def test_budget_in_samples_sets_the_steps(samples, per_step, steps):
    assert steps_for_budget(samples, per_step) == steps


def test_budget_spent_compares_the_right_column():
    class Budget:
        by, value = "flops", 1e9

    assert budget_spent(Budget, {"train_flops": 1e9, "train_seconds": 0.0})
    assert not budget_spent(Budget, {"train_flops": 9.9e8, "train_seconds": 1e12})
    Budget.by = "seconds"
    assert budget_spent(Budget, {"train_flops": 0.0, "train_seconds": 1e9})


def test_config_turns_a_samples_budget_into_steps():
    ppo = validate_run_config(composed("algo=ppo", "algo.rollout_batch_size=16", "algo.micro_batch_size=8",
                                       "train.steps=3", "train.budget.by=samples", "train.budget.value=100"))
    assert ppo.train.steps == 7                                     # ⌈100 / 16⌉ episodes per PPO step
    dpo = validate_run_config(composed("train.steps=3", "train.batch_size=8", "train.micro_batch_size=8",
                                       "train.budget.by=samples", "train.budget.value=100"))
    assert dpo.train.steps == 13                                    # ⌈100 / 8⌉ pairs per step
    flops = validate_run_config(composed("train.steps=3", "train.budget.by=flops", "train.budget.value=1e12"))
    assert flops.train.steps == 3                                   # a cap; the budget is checked while training


@pytest.mark.parametrize("by, value, key", [("tokens", 1, "train.budget.by"), ("flops", None, "train.budget.value"),
                                            ("seconds", -1, "train.budget.value")])
def test_bad_budgets_name_the_key(by, value, key):
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")):
        validate_run_config(composed(f"train.budget.by={by}", f"train.budget.value={value or 'null'}"))


def test_best_of_n_refuses_a_training_budget():
    with pytest.raises(ConfigError, match="best_of_n trains nothing"):
        validate_run_config(composed("algo=best_of_n", "train.budget.by=samples", "train.budget.value=10"))


def test_study_budget_gives_every_trained_arm_the_same_samples():
    import yaml

    from rlhf_lab.paths import study_file
    from rlhf_lab.study.runner import compose_run_config, sweep_points, validate_study_spec

    spec = yaml.safe_load(study_file("smoke").read_text())
    spec["budget"] = {"by": "samples", "value": 40}
    validate_study_spec(spec, "smoke")
    steps = {}
    for point in sweep_points(spec, []):
        cfg = compose_run_config(point.overrides)
        steps[point.arm] = (cfg.train.steps, cfg.train.budget.by)
    # 40 pairs at 8 per step (DPO, IPO) and 40 episodes at 8 per PPO step: 5 steps each; best-of-n trains nothing
    assert steps == {"dpo": (5, "samples"), "ipo": (5, "samples"), "ppo": (5, "samples"),
                     "ppo_gt": (5, "samples"), "best_of_n": (spec_steps := steps["best_of_n"][0], None)}
    assert spec_steps == 3                                          # the study's own train.steps, unused by it
    spec["budget"] = {"by": "tokens", "value": 1}
    with pytest.raises(ConfigError, match="'budget' must be"):
        validate_study_spec(spec, "smoke")
