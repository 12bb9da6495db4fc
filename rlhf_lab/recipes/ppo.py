"""The PPO / PPO-GT recipe: cached stages (task, SFT, and for a learned reward the preferences and reward model),
the four roles built by one builder and placed by the strategy (actor and critic as training engines, reference
and reward frozen: replicas, or ZeRO-3 eval engines), then the PPO loop with the same evaluation as every other
method."""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_lab.config import PPOConfig, RunConfig
from rlhf_lab.data.tokenize import TruncationConfig, encode_prompt
from rlhf_lab.distributed import comm
from rlhf_lab.distributed.strategy import resolve_device
from rlhf_lab.models.build import freeze, load_causal_lm, load_tokenizer
from rlhf_lab.models.heads import build_scalar_model, init_scalar_head, load_scalar_model
from rlhf_lab.recipes import stages
from rlhf_lab.recipes.dpo import lora_summary, save_policy, sft_or_base, stage_seconds, stage_training
from rlhf_lab.recipes.run import RunContext, trainer_strategy
from rlhf_lab.rewards.source import CallableRewardSource, GoldRewardSource, LearnedRewardSource
from rlhf_lab.trainers.loop import build_trained, micro_batch_for
from rlhf_lab.trainers.on_policy import OnPolicyRun, PromptSet
from rlhf_lab.trainers.ppo import PPOTrainer
from rlhf_lab.trainers.ppo_rollout import PPOModels
from rlhf_lab.utils.errors import ConfigError


def build_ppo_models(cfg: RunConfig, sft_dir: Path, rm_dir: Path | None, tokenizer, gold, strategy,
                     prompts: list[str] = ()) -> tuple:
    """Actor and reference from SFT; critic from the reward model (or SFT + fresh head); the reward source.
    Returns (models, eval_reference), all unplaced: KL is always evaluated against the frozen SFT model, even
    with an EMA reference in the penalty. Loaded inside `strategy.loading` (ZeRO-3: partitioned as they are
    built, so no rank holds a whole model); frozen roles are loaded afresh, never deep-copied. `prompts`: the
    train prompts, on which PPO-GT fits its gold reward's gain and bias."""
    a: PPOConfig = cfg.algo
    with strategy.loading("trained"):
        actor = load_causal_lm(sft_dir)
        if a.critic_init == "reward_model":
            critic, _ = load_scalar_model(rm_dir)
        else:
            critic = build_scalar_model(sft_dir, torch.float32, init_head=False)
            # an explicit generator: the head must not depend on how much global RNG the (cached or not) stages
            # used
            init_scalar_head(critic, generator=torch.Generator().manual_seed(cfg.seed))
    if cfg.lora.r is not None:
        actor, critic, reference = lora_roles(cfg, actor, critic)
        eval_reference = reference
    else:
        with strategy.loading("reference"):
            reference = freeze(load_causal_lm(sft_dir))
            eval_reference = freeze(load_causal_lm(sft_dir)) if a.ema_reference_decay is not None else reference
    reward = build_reward_source(cfg, sft_dir, rm_dir, tokenizer, gold, strategy, prompts)
    return PPOModels(actor, critic, reference, reward), eval_reference


def build_reward_source(cfg: RunConfig, sft_dir: Path, rm_dir: Path | None, tokenizer, gold, strategy,
                        prompts: list[str]):
    """What scores an on-policy method's samples (`algo.reward`): the learned reward model (loaded inside
    `strategy.loading`, unplaced), the gold reward (gain and bias fitted on SFT samples when
    algo.normalize_reward) or a user callable."""
    a = cfg.algo
    if a.reward == "learned":
        with strategy.loading("reward"):
            rm, normalization = load_scalar_model(rm_dir)
        return LearnedRewardSource(freeze(rm), load_tokenizer(rm_dir), tokenizer, normalization, None,
                                   apply_normalization=a.normalize_reward)
    if a.reward == "gold":
        if gold is None:
            raise ConfigError(f"algo.reward=gold (algo={a.name} on the gold reward) needs a task with a gold reward "
                              "(task=imdb)")
        return GoldRewardSource(gold, gold_normalization(cfg, sft_dir, tokenizer, gold, prompts)
                                if a.normalize_reward else None)
    return CallableRewardSource(a.reward_callable)


def place_reward_source(reward, strategy):
    """A learned reward model is placed like a frozen role (replica, or a ZeRO-3 eval engine)."""
    if isinstance(reward, LearnedRewardSource):
        reward.model = strategy.place(reward.model, role="reward")
        reward.device = strategy.device
    return reward


def lora_roles(cfg: RunConfig, actor, critic) -> tuple:
    """LoRA (lora.r set): the actor trains adapters and the reference is the actor with them off (no second copy
    of the SFT weights); with lora.critic the critic's backbone trains adapters too. Returns (actor, critic,
    reference)."""
    from rlhf_lab.models.lora import AdapterOffReference, wrap_causal_lm, wrap_scalar_backbone

    actor = wrap_causal_lm(actor, cfg.lora, cfg.seed)
    if cfg.lora.critic:
        critic = wrap_scalar_backbone(critic, cfg.lora, cfg.seed + 1)
    return actor, critic, AdapterOffReference(actor)


def gold_normalization(cfg: RunConfig, sft_dir: Path, tokenizer, gold, prompts: list[str]) -> dict:
    """Gain and bias that give the gold reward mean 0 and std 1 on SFT samples, fitted as the reward model's are
    (`reward_model.normalization_samples` samples at temperature 1 on train prompts, seeded by the task seed):
    every rank computes the same numbers, in a second or two."""
    from rlhf_lab.algos.reward import fit_reward_normalization
    from rlhf_lab.eval.policy_eval import decode_samples
    from rlhf_lab.models.sampling import sample_completions

    count = cfg.reward_model.normalization_samples
    if count < 2:
        raise ConfigError(f"algo.normalize_reward=true for PPO-GT fits the gold reward's gain/bias on "
                          f"reward_model.normalization_samples SFT samples: need at least 2, got {count} (or set "
                          "algo.normalize_reward=false)")
    generator = torch.Generator().manual_seed(cfg.task.seed)
    order = torch.randperm(len(prompts), generator=generator).tolist()
    chosen = [encode_prompt(tokenizer, prompts[order[i % len(order)]]) for i in range(count)]
    sft = load_causal_lm(sft_dir).eval()
    samples = sample_completions(sft, chosen, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                 max_new_tokens=cfg.algo.response_length, temperature=cfg.algo.temperature,
                                 generator=generator)
    scores = torch.as_tensor(gold.score(decode_samples(tokenizer, samples)), dtype=torch.float64)
    gain, bias = fit_reward_normalization(scores)
    return {"gain": gain, "bias": bias, "fitted_on": f"{count} SFT samples on train prompts, gold mean "
                                                     f"{scores.mean().item():.4f}"}


def place_ppo_models(cfg: RunConfig, models: PPOModels, eval_reference, actor_s, critic_s) -> tuple:
    """Actor and critic become training engines (optimizer from the `optim` group, lr from the algo group);
    reference, evaluation reference and a learned reward model are placed as frozen models."""
    a: PPOConfig = cfg.algo
    models.actor = build_trained(actor_s, models.actor, cfg.optim, lr=a.actor_lr, warmup_steps=a.warmup_steps)
    models.critic = build_trained(critic_s, models.critic, cfg.optim, lr=a.critic_lr, warmup_steps=a.warmup_steps)
    separate_eval_reference = eval_reference is not models.reference
    models.reference = actor_s.place(models.reference)
    eval_reference = actor_s.place(eval_reference) if separate_eval_reference else models.reference
    models.reward = place_reward_source(models.reward, actor_s)
    return models, eval_reference


def train_ppo(cfg: RunConfig, ctx: RunContext) -> dict:
    a: PPOConfig = cfg.algo
    if cfg.task.name != "imdb":
        raise ConfigError("PPO currently needs task=imdb (prompts and, for PPO-GT, the gold reward come from it)")
    # per rank: rollout_batch_size / W episodes, split into num_mini_batches minibatches of micro-batches
    mini = micro_batch_for(a.rollout_batch_size, a.num_mini_batches, "algo.rollout_batch_size")
    if mini % a.micro_batch_size:
        raise ConfigError(f"algo.micro_batch_size: {a.micro_batch_size} does not divide this rank's minibatch of "
                          f"{mini} (rollout_batch_size / world size / num_mini_batches)")
    accum = mini // a.micro_batch_size
    actor_s = trainer_strategy(cfg, accum, a.max_grad_norm, a.micro_batch_size)
    critic_s = trainer_strategy(cfg, accum, a.max_grad_norm, a.micro_batch_size)
    task, sft_dir, rm_dir, used = ppo_stages(cfg)
    tokenizer = load_tokenizer(sft_dir)
    models, eval_reference = build_ppo_models(cfg, sft_dir, rm_dir, tokenizer, task.gold, actor_s,
                                              task.train_prompts)
    models, eval_reference = place_ppo_models(cfg, models, eval_reference, actor_s, critic_s)
    trainer = PPOTrainer(models, on_policy_run(cfg, ctx, task, tokenizer, eval_reference), a, actor_s, critic_s)
    return finish_on_policy(cfg, ctx, trainer, actor_s, tokenizer, sft_dir, used, rm_dir)


def finish_on_policy(cfg: RunConfig, ctx: RunContext, trainer, strategy, tokenizer, sft_dir: Path, used: list,
                     rm_dir) -> dict:
    """Train, save the final policy (HF format; with LoRA merged into the SFT weights, plus the adapter), and return
    the run summary's details."""
    final = trainer.train()
    if cfg.train.save_model:
        save_policy(cfg, strategy, ctx.run_dir, sft_dir, tokenizer)
    return {"stage_seconds": stage_seconds(used), "final_train_metrics": final,
            "compute_per_role": trainer.meter.per_role(), **lora_summary(cfg, strategy),
            "reward_model": None if rm_dir is None else str(rm_dir), "world_size": comm.world_size()}


def on_policy_run(cfg: RunConfig, ctx: RunContext, task, tokenizer, eval_reference) -> OnPolicyRun:
    """The task's prompts (train: every prefix; evaluation: the held-out ones) and the run's bookkeeping, as every
    on-policy trainer takes them."""
    train_prompts = PromptSet([encode_prompt(tokenizer, p) for p in task.train_prompts], list(task.train_prompts))
    test = task.test_prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else task.test_prompts
    eval_prompts = PromptSet([encode_prompt(tokenizer, p) for p in test], list(test))
    return OnPolicyRun(tokenizer, train_prompts, eval_prompts, eval_reference, task.gold, cfg.eval, cfg.train.steps,
                       ctx.logger, ctx.points, ctx.identity, ctx.run_dir, cfg.seed, config_hash=ctx.config_hash,
                       checkpoint_every=cfg.train.checkpoint_every, budget=cfg.train.budget)


def ppo_stages(cfg: RunConfig) -> tuple:
    """The cached stages a PPO run needs: task, SFT, and (for a learned reward or an RM-initialised critic) the
    preference pairs and the reward model. Returns (task, SFT dir, reward-model dir or None, stages used)."""
    a: PPOConfig = cfg.algo
    return sampling_stages(cfg, learned_reward=a.reward == "learned" or a.critic_init == "reward_model")


def sampling_stages(cfg: RunConfig, learned_reward: bool) -> tuple:
    """What a method that samples from the SFT model needs (PPO, best-of-n): the task, SFT, and with
    `learned_reward` the preference pairs and the reward model trained on them. Returns (task, SFT dir,
    reward-model dir or None, stages used)."""
    cache = Path(cfg.cache_dir)
    task, task_out = stages.task_stage(cfg.task, cfg.reward.gold, cache)
    used, rm_dir = [task_out], None
    sft_dir, sft_key = sft_or_base(cfg, task, used)
    if learned_reward:
        device = resolve_device(cfg.train.device)
        prefs = stages.preference_stage(cache, task, sft_key, sft_dir, cfg.preferences, cfg.reward.gold,
                                        cfg.task.seed, device)
        trunc = TruncationConfig(cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.data.truncation)
        rm = stages.reward_model_stage(cache, sft_key, sft_dir, prefs.key, prefs.dir / "pairs.jsonl",
                                       cfg.reward_model, trunc, cfg.task.seed, device, stage_training(cfg))
        used += [prefs, rm]
        rm_dir = rm.dir
    return task, sft_dir, rm_dir, used
