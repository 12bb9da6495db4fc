"""Which configuration keys a run actually reads: a key the user sets that the selected algorithm and data never
read is an error naming what is read instead, never a silently ignored setting (`check_keys_are_read`, called by
the CLI on its overrides and by a study on every arm's and sweep point's keys)."""
from __future__ import annotations

from dataclasses import fields

from rlhf_lab.config import BestOfNConfig, PPOConfig, RewardModelConfig, RunConfig
from rlhf_lab.utils.errors import ConfigError


def unread_keys(cfg: RunConfig) -> dict[str, str]:
    """Config keys (or group prefixes ending in '.') that this run never reads, with what it reads instead.
    A user who sets one of them expects it to matter: `check_keys_are_read` makes that an error."""
    unread: dict[str, str] = {}
    a = cfg.algo
    if isinstance(a, PPOConfig):
        name = "algo.reward=gold (PPO-GT)" if a.reward == "gold" else f"algo={a.name}"
        unread.update({
            "train.batch_size": f"{name} takes algo.rollout_batch_size episodes per step",
            "train.micro_batch_size": f"{name} uses algo.micro_batch_size",
            "train.compile": "only the DPO family compiles its training forward",
            "optim.lr": f"{name} uses algo.actor_lr and algo.critic_lr",
            "optim.warmup_steps": f"{name} uses algo.warmup_steps",
            "data.source": f"{name} samples its own completions on the task's prompts",
            "data.split": f"{name} reads no preference dataset", "data.max_pairs": f"{name} reads no pairs",
        })
        if a.reward != "learned" and a.critic_init != "reward_model":
            reason = f"with algo.reward={a.reward} and algo.critic_init={a.critic_init} no reward model is trained"
            unread["preferences."] = reason
            if a.reward == "gold" and a.normalize_reward:   # PPO-GT fits its gold normalisation on as many samples
                unread.update({f"reward_model.{f.name}": reason for f in fields(RewardModelConfig)
                               if f.name != "normalization_samples"})
            else:
                unread["reward_model."] = reason
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
        unread["reward_model."] = "the DPO family trains no reward model (algo=ppo does)"
        if cfg.data.source is not None:
            unread["preferences."] = "data.source replaces the generated preference pairs"
    if cfg.task.name == "none":
        unread.update({"sft.": "task=none has no SFT data: the model is used as it is",
                       "reward.gold": "task=none has no gold reward", "preferences.": "task=none generates no pairs"})
    elif not cfg.model.sft:
        unread["sft."] = "model.sft=false skips the SFT stage"
    if cfg.lora.r is None:
        unread.update({f"lora.{key}": "lora.r is null, so LoRA is off (set lora.r=8, say, to train adapters)"
                       for key in ("alpha", "dropout", "target_modules")})
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
