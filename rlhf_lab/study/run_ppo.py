"""One PPO / PPO-GT run: cached stages (task, SFT, and for a learned reward the preferences and reward model),
the four roles built by one builder, then the PPO loop with the same evaluation as every other method."""
from __future__ import annotations

from pathlib import Path

import torch

from rlhf_lab.config import PPOConfig, RunConfig, to_container
from rlhf_lab.data.tokenize import TruncationConfig, encode_prompt
from rlhf_lab.distributed.strategy import make_strategy
from rlhf_lab.models.build import frozen_copy, load_causal_lm, load_tokenizer
from rlhf_lab.models.heads import build_scalar_model, init_scalar_head, load_scalar_model
from rlhf_lab.rewards.source import CallableRewardSource, GoldRewardSource, LearnedRewardSource
from rlhf_lab.study import stages
from rlhf_lab.trainers.optim import warmup_schedule
from rlhf_lab.trainers.ppo import PPOTrainer, PromptSet
from rlhf_lab.trainers.ppo_rollout import PPOModels
from rlhf_lab.utils.cache import stable_hash
from rlhf_lab.utils.errors import ConfigError


def build_ppo_models(cfg: RunConfig, sft_dir: Path, rm_dir: Path | None, tokenizer, gold, device) -> tuple:
    """Actor and reference from SFT; critic from the reward model (or SFT + fresh head); the reward source.
    Returns (models, eval_reference): KL is always evaluated against the frozen SFT model, even with an EMA
    reference in the penalty."""
    a: PPOConfig = cfg.algo
    actor = load_causal_lm(sft_dir)
    reference = frozen_copy(actor)
    eval_reference = frozen_copy(actor) if a.ema_reference_decay is not None else reference
    if a.critic_init == "reward_model":
        critic, _ = load_scalar_model(rm_dir)
    else:
        critic = build_scalar_model(sft_dir, torch.float32, init_head=False)
        # an explicit generator: the head must not depend on how much global RNG the (cached or not) stages used
        init_scalar_head(critic, generator=torch.Generator().manual_seed(cfg.seed))
    if a.reward == "learned":
        rm, normalization = load_scalar_model(rm_dir)
        rm.requires_grad_(False)
        reward = LearnedRewardSource(rm.to(device), load_tokenizer(rm_dir), tokenizer, normalization, device,
                                     apply_normalization=a.normalize_reward)
    elif a.reward == "gold":
        if gold is None:
            raise ConfigError("algo.reward=gold (PPO-GT) needs a task with a gold reward (task=imdb)")
        reward = GoldRewardSource(gold)
    else:
        reward = CallableRewardSource(a.reward_callable)
    for frozen in (reference, eval_reference):
        frozen.to(device)
    return PPOModels(actor, critic, reference, reward), eval_reference


def train_ppo(cfg: RunConfig, ctx) -> dict:
    a: PPOConfig = cfg.algo
    if cfg.task.name != "imdb":
        raise ConfigError("PPO currently needs task=imdb (prompts and, for PPO-GT, the gold reward come from it)")
    mini = a.rollout_batch_size // a.num_mini_batches
    accum = mini // a.micro_batch_size
    actor_s = make_strategy(cfg.train.device, cfg.train.precision, accum, a.max_grad_norm)
    critic_s = make_strategy(cfg.train.device, cfg.train.precision, accum, a.max_grad_norm)
    device = actor_s.device
    task, sft, rm_dir, used = ppo_stages(cfg, device)
    tokenizer = load_tokenizer(sft.dir)
    models, eval_reference = build_ppo_models(cfg, sft.dir, rm_dir, tokenizer, task.gold, device)
    models.actor = _setup(actor_s, models.actor, a.actor_lr, a.warmup_steps)
    models.critic = _setup(critic_s, models.critic, a.critic_lr, a.warmup_steps)
    train_prompts = PromptSet([encode_prompt(tokenizer, p) for p in task.train_prompts], list(task.train_prompts))
    test = task.test_prompts[: cfg.eval.num_prompts] if cfg.eval.num_prompts else task.test_prompts
    eval_prompts = PromptSet([encode_prompt(tokenizer, p) for p in test], list(test))
    trainer = PPOTrainer(models, tokenizer, train_prompts, eval_prompts, eval_reference, task.gold, a, cfg.eval,
                         cfg.train.steps, actor_s, critic_s, ctx.logger, ctx.points, ctx.identity, ctx.run_dir,
                         cfg.seed, config_hash=resume_key(cfg))
    final = trainer.train()
    if cfg.train.save_model:
        actor_s.save_model(ctx.run_dir / "model", tokenizer)
    return {"stage_seconds": {o.name: o.seconds for o in used}, "final_train_metrics": final,
            "reward_model": None if rm_dir is None else str(rm_dir)}


def ppo_stages(cfg: RunConfig, device: torch.device) -> tuple:
    """The cached stages a PPO run needs: task, SFT, and (for a learned reward or an RM-initialised critic) the
    preference pairs and the reward model. Returns (task, sft stage, reward-model dir or None, stages used)."""
    a: PPOConfig = cfg.algo
    cache = Path(cfg.cache_dir)
    task, task_out = stages.task_stage(cfg.task, cfg.reward.gold, cache)
    make = lambda: make_strategy(cfg.train.device, cfg.train.precision, 1, cfg.optim.max_grad_norm)  # noqa: E731
    sft = stages.sft_stage(cache, task, task.tokenizer_key, cfg.model, cfg.sft, cfg.task.seed, make)
    used, rm_dir = [task_out, sft], None
    if a.reward == "learned" or a.critic_init == "reward_model":
        prefs = stages.preference_stage(cache, task, sft.key, sft.dir, cfg.preferences, cfg.reward.gold,
                                        cfg.task.seed, device)
        trunc = TruncationConfig(cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.data.truncation)
        rm = stages.reward_model_stage(cache, sft.key, sft.dir, prefs.key, prefs.dir / "pairs.jsonl",
                                       cfg.reward_model, trunc, cfg.task.seed, device, make)
        used += [prefs, rm]
        rm_dir = rm.dir
    return task, sft, rm_dir, used


def resume_key(cfg: RunConfig) -> str:
    """What must match for a checkpoint to be resumed: everything but bookkeeping that cannot change the maths
    (the step budget may grow, so a finished run can be extended)."""
    resolved = to_container(cfg)
    resolved["train"] = {k: v for k, v in resolved["train"].items() if k != "steps"}
    for key in ("force", "logger", "run_id", "study", "output_root", "cache_dir"):
        resolved.pop(key, None)
    return stable_hash(resolved)


def _setup(strategy, model, lr: float, warmup: int):
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=lr)
    return strategy.setup(model, optimizer, warmup_schedule(optimizer, warmup))
