"""Which configuration keys a run actually reads: a key the user sets that the selected algorithm and data never
read is an error naming what is read instead, never a silently ignored setting (`check_keys_are_read`, called by
the CLI on its overrides and by a study on every arm's and sweep point's keys)."""
from __future__ import annotations

from dataclasses import fields

from rlhf_lab.config import (LABEL_KEYS, BestOfNConfig, OnlineDPOConfig, PPOConfig, RewardModelConfig, RunConfig,
                             SamplingConfig)
from rlhf_lab.recipes.pair_labels import uses_reward_model
from rlhf_lab.utils.errors import ConfigError


def unread_keys(cfg: RunConfig) -> dict[str, str]:
    """Config keys (or group prefixes ending in '.') that this run never reads, with what it reads instead.
    A user who sets one of them expects it to matter: `check_keys_are_read` makes that an error."""
    unread: dict[str, str] = {}
    a = cfg.algo
    if isinstance(a, SamplingConfig):
        unread.update(_on_policy_unread(a))
    elif isinstance(a, BestOfNConfig):
        unread.update({key: "algo=best_of_n trains nothing: it samples from the SFT model" for key in (
            "train.steps", "train.batch_size", "train.micro_batch_size", "train.compile", "train.save_model",
            "optim.lr", "optim.weight_decay", "optim.warmup_steps", "eval.every", "strategy.")})
        unread.update({"data.source": "algo=best_of_n samples on the task's prompts",
                       "data.split": "algo=best_of_n reads no preference dataset",
                       "data.max_pairs": "algo=best_of_n reads no pairs"})
        if a.scorer == "gold":
            reason = "algo.scorer=gold: no reward model is trained"
            unread.update({"reward_model.": reason, "preferences.": reason, "data.": reason})
    else:
        if not uses_reward_model(cfg.preferences, cfg.data.source):
            unread["reward_model."] = ("the DPO family trains no reward model (algo=ppo does; so do "
                                       "preferences.labeler=reward_model and preferences.filter=reward_model)")
        if cfg.preferences.filter == "none":
            unread["preferences.filter_margin"] = "preferences.filter=none filters no pairs"
        if cfg.data.source is not None:
            unread["preferences."] = "data.source replaces the generated preference pairs"
    if isinstance(a, (SamplingConfig, BestOfNConfig)):
        unread.update({f"preferences.{key}": f"algo={a.name} trains on no offline pairs: a reward model learns the "
                       "gold labels, and only the offline DPO family reads who relabels or filters its pairs"
                       for key in LABEL_KEYS})
    if cfg.task.name == "none":
        unread.update({"sft.": "task=none has no SFT data: the model is used as it is",
                       "reward.gold": "task=none has no gold reward", "preferences.": "task=none generates no pairs"})
    elif not cfg.model.sft:
        unread["sft."] = "model.sft=false skips the SFT stage"
    if cfg.lora.r is None:
        unread.update({f"lora.{key}": "lora.r is null, so LoRA is off (set lora.r=8, say, to train adapters)"
                       for key in ("alpha", "dropout", "target_modules")})
    return unread


def _on_policy_unread(a: SamplingConfig) -> dict[str, str]:
    """PPO, RLOO, GRPO, online DPO: they sample on the task's prompts and size their batches in the algo group."""
    name = "algo.reward=gold (PPO-GT)" if getattr(a, "reward", None) == "gold" else f"algo={a.name}"
    lr = "algo.actor_lr and algo.critic_lr" if isinstance(a, PPOConfig) else "algo.actor_lr"
    unread = {
        "train.batch_size": f"{name} takes algo.rollout_batch_size prompts per step",
        "train.micro_batch_size": f"{name} uses algo.micro_batch_size",
        "train.compile": "only the DPO family compiles its training forward",
        "optim.lr": f"{name} uses {lr}",
        "optim.warmup_steps": f"{name} uses algo.warmup_steps",
        "data.source": f"{name} samples its own completions on the task's prompts",
        "data.split": f"{name} reads no preference dataset", "data.max_pairs": f"{name} reads no pairs",
    }
    uses_rm = getattr(a, "reward", None) == "learned" or getattr(a, "annotator", None) == "reward_model" or \
        getattr(a, "critic_init", None) == "reward_model"
    if uses_rm:
        return unread
    if isinstance(a, OnlineDPOConfig):
        why = f"algo.annotator={a.annotator}"
    elif isinstance(a, PPOConfig):
        why = f"algo.reward={a.reward} and algo.critic_init={a.critic_init}"
    else:
        why = f"algo.reward={a.reward}"
    reason = f"with {why} no reward model is trained"
    unread["preferences."] = reason
    if getattr(a, "reward", None) == "gold" and a.normalize_reward:   # gold normalisation uses as many samples
        unread.update({f"reward_model.{f.name}": reason for f in fields(RewardModelConfig)
                       if f.name != "normalization_samples"})
    else:
        unread["reward_model."] = reason
    return unread


def check_keys_are_read(cfg: RunConfig, user_keys: list[str], where: str = "") -> None:
    """Refuse a key the user set (an override, a sweep key) that the selected algorithm and data never read."""
    unread = unread_keys(cfg)
    for key in user_keys:
        for prefix, reason in unread.items():
            if key == prefix or (prefix.endswith(".") and key.startswith(prefix)):
                raise ConfigError(f"{where}config key '{key}' is set but never read: {reason}. Remove it (it would "
                                  "be silently ignored)")


def override_keys(overrides: list[str]) -> list[str]:
    """The config keys named by Hydra override strings (`key=value`, `+key=value`, `~key`)."""
    return [o.split("=", 1)[0].lstrip("+~") for o in overrides if "=" in o or o.startswith("~")]
