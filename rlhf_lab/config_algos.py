"""The `algo` config group's schemas, one dataclass per trainer, and their checks (run at start-up by
`config.validate_run_config`, which picks the schema by `algo.name`).

    PreferenceLossConfig        a DPO-family loss and its parameters
    ├─ AlgoConfig               offline DPO family (algo=dpo and its presets: ipo, simpo, kto, preferred_ft, ...)
    └─ OnlineDPOConfig          + SamplingConfig: online and iterative DPO
    SamplingConfig              what every on-policy method shares (rollout size, temperature, actor lr)
    └─ RewardedConfig           + where the reward comes from and the KL regularisation
       ├─ PPOConfig             + critic, GAE, KL controller
       └─ CriticFreeConfig      RLOO, GRPO
    BestOfNConfig               no training
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Optional

from rlhf_lab.utils.errors import ConfigError


def check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


@dataclass
class PreferenceLossConfig:
    """A DPO-family loss and its parameters (offline DPO and online DPO)."""

    loss_type: str = "sigmoid"          # a name in rlhf_lab.algos.preference.LOSSES (TRL names)
    beta: float = 0.1
    label_smoothing: float = 0.0
    rpo_alpha: float = 1.0
    simpo_gamma: float = 0.5
    orpo_lambda: float = 0.1
    discopop_tau: float = 0.05
    f_divergence_type: str = "reverse_kl"
    f_alpha_divergence_coef: float = 0.5   # TRL 1.16 default
    desirable_weight: float = 1.0
    undesirable_weight: float = 1.0
    unlikelihood_alpha: float = 1.0     # unlikelihood: weight of the rejected completion's Σ log(1 − π) term


@dataclass
class AlgoConfig(PreferenceLossConfig):
    name: str = "dpo"                   # trainer: dpo (the whole DPO family, paired or unpaired)


@dataclass
class SamplingConfig:
    """What every method that learns from its own samples shares: how it samples and how fast the policy moves."""

    rollout_batch_size: int = 32        # prompts rolled out per step
    micro_batch_size: int = 32          # rows per forward/backward (gradient accumulation inside a minibatch)
    temperature: float = 0.7            # applied identically in rollout, reference and training passes
    response_length: int = 48
    actor_lr: float = 3e-6
    warmup_steps: int = 0
    max_grad_norm: float = 1.0


@dataclass
class RewardedConfig(SamplingConfig):
    """On-policy RL from a scalar reward (PPO, RLOO, GRPO): where the reward comes from, how it is shaped, and the
    KL regularisation towards the reference."""

    reward: str = "learned"             # learned (reward model) | gold (task's gold reward, "-GT") | callable
    reward_callable: Optional[str] = None  # "module:function", (prompts, completions) -> scores, for reward=callable
    kl_coef: float = 0.05               # β of the KL regularisation (PPO: per-token penalty; initial value if adaptive)
    kl_estimator: str = "k1"            # k1 (log-ratio) | k3 ((e^{−k1} − 1) + k1, always ≥ 0)
    num_mini_batches: int = 1           # optimiser steps per epoch over a rollout
    cliprange: float = 0.2
    missing_eos_penalty: Optional[float] = None  # subtracted from the score of responses without EOS
    normalize_reward: bool = True       # learned RM: its stored gain/bias; gold: fitted alike (SFT samples → 0, 1)
    reward_clip: Optional[float] = None # clip scores to [−c, c]


@dataclass
class PPOConfig(RewardedConfig):
    """PPO with four roles (actor, critic, reference, reward); defaults follow TRL's PPO where it has one."""

    name: str = "ppo"
    adaptive_kl: bool = False           # Ziegler et al. controller towards target_kl
    target_kl: float = 6.0              # nats per sequence
    kl_horizon: int = 10000
    ppo_epochs: int = 4
    cliprange_value: float = 0.2
    vf_coef: float = 0.1
    gamma: float = 1.0
    lam: float = 0.95
    whiten_rewards: bool = False        # whiten the per-token rewards (no mean shift)
    critic_init: str = "reward_model"   # reward_model | sft (SFT backbone with a fresh scalar head)
    critic_lr: float = 3e-6
    ema_reference_decay: Optional[float] = None  # EMA of the policy as reference (Xu et al. 2024); None = frozen SFT


@dataclass
class CriticFreeConfig(RewardedConfig):
    """RLOO (Ahmadian et al. 2024) and GRPO (Shao et al. 2024): k samples per prompt, the baseline from the other
    samples, no critic (rlhf_lab/algos/critic_free.py). RLOO puts β·KL (kl_estimator) into the sequence reward;
    GRPO adds β·k3 to the loss (its kl_estimator is k3)."""

    name: str = "rloo"                  # rloo | grpo
    samples_per_prompt: int = 4         # k: the group each baseline is computed in
    num_iterations: int = 1             # epochs over each rollout (GRPO's μ); 1 = on-policy REINFORCE / GRPO
    scale_rewards: bool = True          # grpo: divide by the group's std (false: centre only, Dr. GRPO)


@dataclass
class OnlineDPOConfig(PreferenceLossConfig, SamplingConfig):
    """Online DPO (Guo et al. 2024): every step samples two completions per prompt from the current policy, an
    annotator labels them, and a DPO-family step is taken against the frozen reference. refresh_every K > 1 is
    iterative DPO (Xu et al. 2023): K steps' worth of pairs sampled and labelled at once, then trained on."""

    name: str = "online_dpo"
    annotator: str = "gold"             # gold | reward_model | judge:<preset> | callable:<module>:<function>
    annotator_flip_rate: float = 0.0    # each decided label flipped with this probability (noisy annotators; 1 =
                                        # adversarial): how robust is the method to its labeller?
    refresh_every: int = 1              # steps per sampling round: 1 = online, K > 1 = iterative


@dataclass
class BestOfNConfig:
    """Best-of-N from the SFT policy, no training: the yardstick on the frontier (rlhf_lab/algos/best_of_n.py).
    One run samples K completions per evaluation prompt and writes one points row per n = 1, 2, 4, …, K, with
    `step` = n (step 0 = n = 1, the SFT model) and KL = log n − (n−1)/n, an upper bound."""

    name: str = "best_of_n"
    samples: int = 16                   # K completions per evaluation prompt (the largest n)
    scorer: str = "gold"                # gold: the task's gold reward (the yardstick) | reward_model: the learned RM


ALGO_SCHEMAS: dict[str, type] = {"dpo": AlgoConfig, "ppo": PPOConfig, "rloo": CriticFreeConfig,
                                  "grpo": CriticFreeConfig, "online_dpo": OnlineDPOConfig,
                                  "best_of_n": BestOfNConfig}


def validate_algo(a) -> None:
    """The checks of the algo group a run selected."""
    if isinstance(a, PPOConfig):
        validate_ppo(a)
    elif isinstance(a, CriticFreeConfig):
        validate_critic_free(a)
    elif isinstance(a, OnlineDPOConfig):
        validate_online_dpo(a)
    elif isinstance(a, BestOfNConfig):
        check(a.samples >= 2, "algo.samples", ">= 2", a.samples)
        check(a.scorer in ("gold", "reward_model"), "algo.scorer", "gold | reward_model", a.scorer)
    else:
        validate_dpo(a)


def validate_sampling(a: SamplingConfig, minibatches: int = 1, rows_per_prompt: int = 1) -> None:
    """Every on-policy method: a rollout of rollout_batch_size prompts × rows_per_prompt rows splits into
    `minibatches` minibatches of whole micro-batches."""
    check(a.rollout_batch_size >= 1, "algo.rollout_batch_size", ">= 1", a.rollout_batch_size)
    check(a.temperature > 0, "algo.temperature", "> 0", a.temperature)
    check(a.response_length >= 1, "algo.response_length", ">= 1", a.response_length)
    check(a.actor_lr > 0, "algo.actor_lr", "> 0", a.actor_lr)
    rows = a.rollout_batch_size * rows_per_prompt
    check(rows % minibatches == 0, "algo.rollout_batch_size",
          f"a rollout of {rows} rows divisible by algo.num_mini_batches={minibatches}", a.rollout_batch_size)
    mini = rows // minibatches
    check(a.micro_batch_size >= 1 and mini % a.micro_batch_size == 0, "algo.micro_batch_size",
          f"a divisor of the minibatch size {mini} (rollout rows / num_mini_batches)", a.micro_batch_size)


def validate_rewarded(a: RewardedConfig, rows_per_prompt: int = 1) -> None:
    check(a.reward in ("learned", "gold", "callable"), "algo.reward", "learned | gold | callable", a.reward)
    check(a.reward != "callable" or bool(a.reward_callable), "algo.reward_callable",
          "'module:function' when algo.reward=callable", a.reward_callable)
    check(a.kl_estimator in ("k1", "k3"), "algo.kl_estimator", "k1 | k3", a.kl_estimator)
    check(a.kl_coef >= 0, "algo.kl_coef", ">= 0", a.kl_coef)
    check(a.num_mini_batches >= 1, "algo.num_mini_batches", ">= 1", a.num_mini_batches)
    validate_sampling(a, a.num_mini_batches, rows_per_prompt)


def validate_ppo(a: PPOConfig) -> None:
    validate_rewarded(a)
    check(a.target_kl > 0, "algo.target_kl", "> 0", a.target_kl)
    check(a.critic_init in ("reward_model", "sft"), "algo.critic_init", "reward_model | sft", a.critic_init)
    check(a.ppo_epochs >= 1, "algo.ppo_epochs", ">= 1", a.ppo_epochs)
    check(a.ema_reference_decay is None or 0 < a.ema_reference_decay < 1, "algo.ema_reference_decay",
          "in (0, 1) or null", a.ema_reference_decay)


def validate_critic_free(a: CriticFreeConfig) -> None:
    check(a.name in ("rloo", "grpo"), "algo.name", "rloo | grpo", a.name)
    check(a.samples_per_prompt >= 2, "algo.samples_per_prompt", ">= 2 (the baseline is the other samples)",
          a.samples_per_prompt)
    check(a.num_iterations >= 1, "algo.num_iterations", ">= 1", a.num_iterations)
    check(a.name == "grpo" or a.scale_rewards, "algo.scale_rewards",
          "true with algo=rloo (only GRPO divides by the group's std)", a.scale_rewards)
    check(a.name != "grpo" or a.kl_estimator == "k3", "algo.kl_estimator",
          "k3 for algo=grpo (its loss adds β·k3, Shao et al. 2024 eq. 4)", a.kl_estimator)
    validate_rewarded(a, rows_per_prompt=a.samples_per_prompt)


def validate_online_dpo(a: OnlineDPOConfig) -> None:
    from rlhf_lab.algos.preference import UNPAIRED_LOSSES
    from rlhf_lab.rewards.annotators import check_annotator_spec

    check(a.loss_type not in UNPAIRED_LOSSES, "algo.loss_type",
          "a paired loss (online DPO labels pairs of its own samples)", a.loss_type)
    validate_dpo(a)
    check_annotator_spec(a.annotator, "algo.annotator", check_credentials=True)
    check(0.0 <= a.annotator_flip_rate <= 1.0, "algo.annotator_flip_rate", "in [0, 1]", a.annotator_flip_rate)
    check(a.refresh_every >= 1, "algo.refresh_every", ">= 1 (1 = online, K = iterative)", a.refresh_every)
    validate_sampling(a)


def validate_dpo(a: PreferenceLossConfig) -> None:
    from rlhf_lab.algos.preference import LOSSES, validate_params

    if a.loss_type not in LOSSES:
        raise ConfigError(
            f"config key 'algo.loss_type': unknown loss {a.loss_type!r}; valid names: {', '.join(sorted(LOSSES))}"
        )
    try:
        validate_params(a.loss_type, loss_params(a))
    except ValueError as e:
        raise ConfigError(f"config group 'algo': {e}") from None


def loss_params(algo: PreferenceLossConfig):
    from rlhf_lab.algos.preference import LossParams

    return LossParams(
        beta=float(algo.beta), label_smoothing=algo.label_smoothing, rpo_alpha=algo.rpo_alpha,
        simpo_gamma=algo.simpo_gamma, orpo_lambda=algo.orpo_lambda, discopop_tau=algo.discopop_tau,
        f_divergence_type=algo.f_divergence_type, f_alpha_divergence_coef=algo.f_alpha_divergence_coef,
        desirable_weight=algo.desirable_weight, undesirable_weight=algo.undesirable_weight,
        unlikelihood_alpha=algo.unlikelihood_alpha,
    )
