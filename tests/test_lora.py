"""LoRA (peft) on the DPO policy and the PPO actor: the adapters-off reference is the base model exactly, before and
after training; only the adapters train and round-trip through a checkpoint; the export is a merged causal LM plus
a peft adapter; the config is validated; and the real CLI trains, resumes and exports LoRA runs."""
from __future__ import annotations

import copy
import csv
import json

import pytest
import torch
from hydra import compose, initialize_config_dir

from rlhf_lab.cli import CONF_DIR
from rlhf_lab.config import AlgoConfig, EvalConfig, LoggerConfig, LoraConfig, OptimConfig, TrainConfig, \
    validate_run_config
from rlhf_lab.config_keys import check_keys_are_read
from rlhf_lab.data.collate import collate_pairs
from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.eval.points import PointsWriter, RunIdentity
from rlhf_lab.models.build import frozen_copy
from rlhf_lab.models.logprobs import sequence_logps
from rlhf_lab.models.lora import AdapterOffReference, export_lora, trainable_parameters, wrap_causal_lm
from rlhf_lab.tracking.logger import RunLogger
from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer
from rlhf_lab.utils.errors import ConfigError
from tests.conftest import workspace_with_shared_cache
from tests.test_dpo_trainer import make_pairs, reference_table

LORA = LoraConfig(r=4, alpha=8.0)


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


# ------------------------------------------------------------------------------------------------ config
@pytest.mark.parametrize("overrides, match", [
    (["lora.r=0"], r"'lora.r': expected an integer >= 1"),
    (["lora.r=8", "lora.alpha=0"], r"'lora.alpha': expected > 0"),
    (["lora.r=8", "lora.dropout=1.0"], r"'lora.dropout': expected in \[0, 1\)"),
    (["lora.r=8", "lora.target_modules=[]"], r"'lora.target_modules'"),
    (["lora.r=eight"], r"lora.r"),
    (["+lora.rank=8"], r"lora.rank"),
    (["lora.critic=true"], r"'lora.critic': expected false while lora.r is null"),
    (["lora.r=8", "lora.critic=true"], r"'lora.critic': expected false unless algo is PPO"),
    (["algo=best_of_n", "lora.r=8"], r"'lora.r': algo=best_of_n trains nothing"),
    (["algo=ppo", "lora.r=8", "algo.ema_reference_decay=0.9"], r"'algo.ema_reference_decay'"),
])
def test_bad_lora_keys_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_run_config(composed(*overrides))


def test_lora_keys_without_a_rank_are_refused_as_unread():
    cfg = validate_run_config(composed("lora.alpha=32"))
    with pytest.raises(ConfigError, match=r"'lora.alpha' is set but never read: lora.r is null"):
        check_keys_are_read(cfg, ["lora.alpha"])
    check_keys_are_read(validate_run_config(composed("lora.r=8", "lora.alpha=32")), ["lora.r", "lora.alpha"])


def test_unknown_target_module_is_a_config_error(tiny_model):
    with pytest.raises(ConfigError, match="lora.target_modules"):
        wrap_causal_lm(tiny_model, LoraConfig(r=4, target_modules=["no_such_layer"]), seed=0)


def test_lora_runs_have_their_own_identity_and_curve():
    import pandas as pd

    from rlhf_lab.eval.frontier import method_labels
    from rlhf_lab.recipes.run import resume_key, run_identity

    full, lora = (validate_run_config(composed(*o)) for o in ([], ["lora.r=8"]))
    assert run_identity(lora).run_id == "dpo-sigmoid-beta0.1-lora8-seed0" and run_identity(lora).lora_r == 8
    assert run_identity(full).lora_r is None and resume_key(full) != resume_key(lora)
    ppo = run_identity(validate_run_config(composed("algo=ppo", "lora.r=4", "lora.critic=true")))
    assert ppo.run_id == "ppo-kl0.05-lora4-seed0"
    points = pd.DataFrame({"method": ["dpo", "dpo", "ppo"], "loss_type": ["sigmoid", "sigmoid", "ppo"],
                           "lora_r": [None, 8, 4]})
    assert method_labels(points).tolist() == ["dpo (sigmoid)", "dpo (sigmoid) + LoRA r=8", "ppo + LoRA r=4"]


# ------------------------------------------------------------------------------------------------ in process
def lora_trainer(base, tokenizer, tmp_path, steps: int = 4):
    """A DPO trainer whose policy is `base` with adapters and whose reference is the same module, adapters off."""
    pairs = make_pairs(16)
    policy = wrap_causal_lm(copy.deepcopy(base), LORA, seed=0)
    reference = AdapterOffReference(policy)
    inputs = DPOInputs(policy, reference, tokenizer, pairs, reference_table(base, pairs, tokenizer.pad_token_id),
                       [[5, 6], [7, 8]], None, RunIdentity("t", "r", "dpo", "sigmoid", 0, beta=0.1, lora_r=4))
    train = TrainConfig(steps=steps, batch_size=8, micro_batch_size=4, checkpoint_every=2)
    strategy = TorchStrategy("cpu", "fp32", 2, 10.0)
    logger = RunLogger(tmp_path, LoggerConfig(name="none", mode="disabled"), {}, name="r", group="t", tags=[])
    trainer = DPOTrainer(inputs, AlgoConfig(beta=0.1), OptimConfig(lr=1e-2, warmup_steps=1), train,
                         EvalConfig(every=2, max_new_tokens=4, batch_size=4), strategy, logger,
                         PointsWriter(tmp_path / "points.csv"), seed=0, run_dir=tmp_path)
    return trainer, pairs


def test_adapters_off_reference_is_the_base_model_exactly_before_and_after_training(tiny_model, tiny_tokenizer,
                                                                                     tmp_path):
    base = frozen_copy(tiny_model)
    trainer, pairs = lora_trainer(base, tiny_tokenizer, tmp_path)
    seqs = collate_pairs(pairs, tiny_tokenizer.pad_token_id).sequences
    with torch.no_grad():
        want = sequence_logps(base, seqs)
    assert trainer.reference is not None and torch.equal(sequence_logps(trainer.reference, seqs), want)
    with torch.no_grad():
        before = sequence_logps(trainer.policy, seqs)
    trainer.train()
    with torch.no_grad():
        after = sequence_logps(trainer.policy, seqs)
    assert not torch.equal(after, before)                                # the adapters moved the policy ...
    trainer.policy.train()
    assert torch.equal(sequence_logps(trainer.reference, seqs), want)    # ... and the reference is still the base
    assert trainer.policy.training                                       # whose mode the view leaves as it was
    assert all(p.requires_grad == ("lora_" in n) for n, p in trainer.policy.named_parameters())
    rows = list(csv.DictReader(open(tmp_path / "points.csv")))
    assert float(rows[0]["kl_mean"]) == 0.0 and float(rows[-1]["kl_mean"]) > 0 and rows[0]["lora_r"] == "4"


def test_only_adapters_are_optimised_and_round_trip_through_a_checkpoint(tiny_model, tiny_tokenizer, tmp_path):
    trainer, _ = lora_trainer(frozen_copy(tiny_model), tiny_tokenizer, tmp_path / "a")
    trainer.train()                                          # checkpoints at steps 2 and 4
    adapters = {n: p for n, p in trainer.policy.named_parameters() if p.requires_grad}
    trainable, total = trainable_parameters(trainer.policy)
    assert trainable == sum(p.numel() for p in adapters.values()) and 0 < trainable < total / 10
    state = trainer.strategy.optimizer.state_dict()
    assert len(state["state"]) == len(adapters) == len(state["param_groups"][0]["params"])

    fresh, _ = lora_trainer(frozen_copy(tiny_model), tiny_tokenizer, tmp_path / "b")
    assert any(not torch.equal(p, adapters[n]) for n, p in fresh.policy.named_parameters() if n in adapters)
    fresh.checkpoints.load(trainer.checkpoints.latest(), {"data": fresh.generator})
    for n, p in fresh.policy.named_parameters():
        assert torch.equal(p, dict(trainer.policy.named_parameters())[n]), n
    restored = fresh.strategy.optimizer.state_dict()["state"]
    for i, s in state["state"].items():
        assert torch.equal(restored[i]["exp_avg_sq"], s["exp_avg_sq"])


def test_export_is_a_merged_causal_lm_and_a_peft_adapter(tiny_model, tiny_tokenizer, tmp_path):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    base_dir = tmp_path / "base"
    tiny_model.save_pretrained(base_dir)
    trainer, pairs = lora_trainer(frozen_copy(tiny_model), tiny_tokenizer, tmp_path, steps=2)
    trainer.train()
    export_lora(trainer.strategy, tmp_path, base_dir, tiny_tokenizer)
    seqs = collate_pairs(pairs, tiny_tokenizer.pad_token_id).sequences
    with torch.no_grad():
        trained = sequence_logps(trainer.policy.eval(), seqs)
        merged = sequence_logps(AutoModelForCausalLM.from_pretrained(tmp_path / "model").eval(), seqs)
        adapter = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(base_dir), tmp_path / "adapter")
        reloaded = sequence_logps(adapter.eval(), seqs)
    assert torch.equal(reloaded, trained)
    torch.testing.assert_close(merged, trained, rtol=0, atol=1e-4)   # W + BA in one matrix: float rounding only
    assert (tmp_path / "model" / "tokenizer.json").exists()


# ------------------------------------------------------------------------------------------------ the CLI
@pytest.fixture(scope="module")
def workspace(tmp_path_factory, shared_stage_cache):
    return workspace_with_shared_cache(tmp_path_factory, "lora", shared_stage_cache)


def cli_args(workspace, run: str, *extra: str) -> list[str]:
    from tests.test_pipeline_smoke import TINY

    # adapters start as a no-op (B = 0) and move slowly at full fine-tuning learning rates
    return [*TINY, "lora.r=4", "optim.lr=1e-2", "optim.warmup_steps=1", "train.checkpoint_every=1", *extra,
            f"output_root={workspace}", f"hydra.run.dir={workspace / run}"]


@pytest.fixture(scope="module")
def lora_dpo_run(workspace):
    from tests.cli import run_cli

    run_cli(cli_args(workspace, "straight"), workspace)
    return workspace / "straight"


@pytest.mark.integration
def test_lora_dpo_through_the_cli_exports_model_and_adapter(lora_dpo_run):
    from peft import PeftConfig
    from transformers import AutoModelForCausalLM

    rows = list(csv.DictReader(open(lora_dpo_run / "points.csv")))
    assert [int(r["step"]) for r in rows] == [0, 2, 3] and {r["lora_r"] for r in rows} == {"4"}
    assert float(rows[0]["kl_mean"]) == pytest.approx(0.0, abs=1e-6) and float(rows[-1]["kl_mean"]) > 0
    assert rows[0]["run_id"] == "dpo-sigmoid-beta0.1-lora4-seed0"
    model = AutoModelForCausalLM.from_pretrained(lora_dpo_run / "model")
    assert type(model).__name__ == "GPT2LMHeadModel" and not any("lora" in n for n, _ in model.named_parameters())
    assert PeftConfig.from_pretrained(lora_dpo_run / "adapter").r == 4
    summary = json.loads((lora_dpo_run / "summary.json").read_text())
    assert 0 < summary["lora"]["trainable_params"] < summary["lora"]["total_params"]


@pytest.mark.integration
@pytest.mark.slow   # the CI budget: the in-process checkpoint round trip above covers the adapter and Adam state
def test_killed_lora_run_resumes_to_the_uninterrupted_points(workspace, lora_dpo_run):
    from tests.cli import cli_env, run_cli
    from tests.test_pipeline_smoke import comparable_points

    killed = cli_args(workspace, "killed")
    env = {**cli_env(), "RLHF_LAB_KILL_AFTER_CHECKPOINT": "2"}
    out = run_cli(killed, workspace, check=False, env=env)
    assert out.returncode != 0 and (workspace / "killed" / "checkpoints" / "step-000002" / "_COMPLETE").exists()
    resumed = run_cli(killed, workspace)
    assert "resumed from" in resumed.stdout + resumed.stderr
    assert comparable_points(workspace / "killed" / "points.csv") == comparable_points(lora_dpo_run / "points.csv")


@pytest.mark.integration
def test_ppo_with_lora_on_actor_and_critic(workspace):
    from tests.cli import run_cli
    from tests.test_ppo import ppo_args

    run_dir = workspace / "ppo"
    args = ppo_args(workspace, run_dir, "algo=ppo_gt", "train.steps=2", "lora.r=4", "lora.critic=true",
                    "train.save_model=true")
    run_cli(args, workspace)
    rows = list(csv.DictReader(open(run_dir / "points.csv")))
    assert [int(r["step"]) for r in rows] == [0, 2] and rows[0]["run_id"] == "ppo_gt-kl0.05-lora4-seed0"
    assert float(rows[0]["kl_mean"]) == pytest.approx(0.0, abs=1e-6) and rows[-1]["lora_r"] == "4"
    assert int(rows[-1]["tokens_forward_reference"]) > 0       # the adapters-off view is counted as the reference
    assert (run_dir / "adapter" / "adapter_config.json").exists() and (run_dir / "model" / "config.json").exists()


# DDP takes ~25 s on 2 CPU cores; ZeRO-3 ~90 s (DeepSpeed start-up on both ranks), so it runs with the slow tests
@pytest.mark.integration
@pytest.mark.parametrize("strategy", ["torch", pytest.param("zero3", marks=pytest.mark.slow)])
def test_lora_dpo_on_two_ranks_equals_one_process(workspace, lora_dpo_run, strategy):
    """DDP (the reference view bypasses the DDP wrapper), and ZeRO-3, which partitions the base and the adapters:
    the view joins the policy's engine (no second engine), and the export gathers only the adapters, merged on
    rank 0 into the same model as one process's."""
    from transformers import AutoModelForCausalLM

    from tests.distributed import assert_metrics_close, run_torchrun, train_metrics
    from tests.test_distributed import ATOL, LOOSE, RTOL, read_points

    run_dir = workspace / strategy
    run_torchrun(cli_args(workspace, run_dir.name, "train.device=cpu", f"strategy={strategy}"), workspace)
    assert_metrics_close(train_metrics(run_dir), train_metrics(lora_dpo_run), RTOL, ATOL, LOOSE)
    assert_metrics_close(read_points(run_dir / "points.csv"), read_points(lora_dpo_run / "points.csv"), RTOL, ATOL,
                         {k.split("/")[1]: v for k, v in LOOSE.items()})
    one = AutoModelForCausalLM.from_pretrained(lora_dpo_run / "model").state_dict()
    two = AutoModelForCausalLM.from_pretrained(run_dir / "model").state_dict()
    for name, tensor in one.items():
        torch.testing.assert_close(two[name], tensor, rtol=1e-4, atol=1e-6)


@pytest.mark.integration
@pytest.mark.slow
def test_ppo_lora_under_zero3_matches_ddp(workspace):
    """The adapters-off reference scores PPO's rollouts through the actor's ZeRO-3 hooks (outside any gathered
    generation context) and the critic trains adapters: both match DDP on the same sharding (~60 s)."""
    from tests.distributed import assert_metrics_close, run_torchrun, train_metrics
    from tests.test_distributed import LOOSE
    from tests.test_ppo import ppo_args

    def run(name: str, *extra: str) -> list[dict]:
        run_torchrun(ppo_args(workspace, workspace / name, "algo=ppo_gt", "train.steps=2", "lora.r=4",
                              "lora.critic=true", "algo.actor_lr=1e-3", "train.device=cpu", *extra), workspace)
        return train_metrics(workspace / name, volatile=("per_s", "cost/"))

    ddp = run("ppo-ddp")
    zero3 = run("ppo-zero3", "strategy=zero3", "strategy.generation=synced")
    assert_metrics_close(zero3, ddp, 1e-4, 1e-5, {**LOOSE, "loss/value_avg": 1e-3, "val/ratio_var": 1e-2})
    rows = list(csv.DictReader(open(workspace / "ppo-zero3" / "points.csv")))
    assert float(rows[0]["kl_mean"]) == 0.0 and float(rows[-1]["kl_mean"]) > 0      # the adapters did move
