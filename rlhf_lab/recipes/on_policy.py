"""The recipes of the critic-free RLHF methods (RLOO, GRPO) and of online / iterative DPO: the cached stages PPO
uses (task, SFT, and a reward model when one scores or labels), a trained policy and the frozen SFT reference,
then the method's trainer on the shared on-policy loop with the same evaluation as every other method."""
from __future__ import annotations

from pathlib import Path

from rlhf_lab.config import CriticFreeConfig, OnlineDPOConfig, RunConfig
from rlhf_lab.models.build import freeze, load_tokenizer
from rlhf_lab.models.heads import load_scalar_model
from rlhf_lab.recipes.dpo import dpo_models
from rlhf_lab.recipes.ppo import (build_reward_source, finish_on_policy, on_policy_run, place_reward_source,
                                  sampling_stages)
from rlhf_lab.recipes.run import RunContext, learns_reward_model, trainer_strategy
from rlhf_lab.rewards.source import LearnedRewardSource
from rlhf_lab.trainers.loop import accumulation_steps, build_trained, micro_batch_for
from rlhf_lab.trainers.ppo_rollout import PPOModels
from rlhf_lab.utils.errors import ConfigError


def _require_task(cfg: RunConfig) -> None:
    if cfg.task.name != "imdb":
        raise ConfigError(f"algo={cfg.algo.name} needs task=imdb (its prompts and the gold reward come from it)")


def _policy_and_reference(cfg: RunConfig, sft_dir: Path, strategy) -> tuple:
    """The trained policy (optimizer from the `optim` group at algo.actor_lr) and the frozen SFT reference, both
    from the SFT model, loaded inside the strategy's `loading` (ZeRO-3 partitions as it builds) and placed; with
    LoRA one model, the reference being its adapters switched off (recipes/dpo.dpo_models)."""
    a = cfg.algo
    policy, reference = dpo_models(cfg, sft_dir, strategy)
    policy = build_trained(strategy, policy, cfg.optim, lr=a.actor_lr, warmup_steps=a.warmup_steps)
    return policy, strategy.place(reference)


def train_critic_free(cfg: RunConfig, ctx: RunContext) -> dict:
    from rlhf_lab.trainers.critic_free import CriticFreeTrainer

    a: CriticFreeConfig = cfg.algo
    _require_task(cfg)
    micro_batch_for(a.rollout_batch_size, 1, "algo.rollout_batch_size")    # prompts split evenly over ranks
    rows = a.rollout_batch_size * a.samples_per_prompt
    mini = micro_batch_for(rows, a.num_mini_batches, "algo.rollout_batch_size × algo.samples_per_prompt")
    if mini % a.micro_batch_size:
        raise ConfigError(f"algo.micro_batch_size: {a.micro_batch_size} does not divide this rank's minibatch of "
                          f"{mini} rows (rollout_batch_size × samples_per_prompt / world size / num_mini_batches)")
    strategy = trainer_strategy(cfg, mini // a.micro_batch_size, a.max_grad_norm, a.micro_batch_size)
    task, sft_dir, rm_dir, used = sampling_stages(cfg, learned_reward=learns_reward_model(a))
    tokenizer = load_tokenizer(sft_dir)
    reward = build_reward_source(cfg, sft_dir, rm_dir, tokenizer, task.gold, strategy, task.train_prompts)
    policy, reference = _policy_and_reference(cfg, sft_dir, strategy)
    models = PPOModels(policy, None, reference, place_reward_source(reward, strategy))
    trainer = CriticFreeTrainer(models, on_policy_run(cfg, ctx, task, tokenizer, reference), a, strategy)
    return finish_on_policy(cfg, ctx, trainer, strategy, tokenizer, sft_dir, used, rm_dir)


def train_online_dpo(cfg: RunConfig, ctx: RunContext) -> dict:
    from rlhf_lab.rewards.annotators import build_annotator
    from rlhf_lab.trainers.online_dpo import OnlineDPOTrainer

    a: OnlineDPOConfig = cfg.algo
    _require_task(cfg)
    accum = accumulation_steps(a.rollout_batch_size, a.micro_batch_size, "algo.rollout_batch_size")
    strategy = trainer_strategy(cfg, accum, a.max_grad_norm, a.micro_batch_size)
    task, sft_dir, rm_dir, used = sampling_stages(cfg, learned_reward=learns_reward_model(a))
    tokenizer = load_tokenizer(sft_dir)
    reward_model = None
    if rm_dir is not None:
        with strategy.loading("reward"):
            rm, normalization = load_scalar_model(rm_dir)
        reward_model = place_reward_source(LearnedRewardSource(freeze(rm), load_tokenizer(rm_dir), tokenizer,
                                                               normalization, None), strategy)
    policy, reference = _policy_and_reference(cfg, sft_dir, strategy)
    annotator = build_annotator(a.annotator, gold=task.gold, reward_model=reward_model)
    trainer = OnlineDPOTrainer(policy, reference, annotator, on_policy_run(cfg, ctx, task, tokenizer, reference), a,
                               strategy)
    return finish_on_policy(cfg, ctx, trainer, strategy, tokenizer, sft_dir, used, rm_dir)
