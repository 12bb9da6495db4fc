"""Typed configuration: one dataclass per Hydra config group, validated after composition.

Hydra composes YAML from `conf/`; `validate_run_config` merges the result into these dataclasses so that an
unknown key, a wrong type or an out-of-range value fails early with a message naming the key
(`algo.beta must be > 0, got -1`), before any model is built.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf_lab.config_algos import (ALGO_SCHEMAS, AlgoConfig, BestOfNConfig, CriticFreeConfig, OnlineDPOConfig,
                                   PPOConfig, PreferenceLossConfig, RewardedConfig, SamplingConfig, check,
                                   loss_params, validate_algo)
from rlhf_lab.utils.errors import ConfigError

__all__ = ["ALGO_SCHEMAS", "AlgoConfig", "BestOfNConfig", "CriticFreeConfig", "OnlineDPOConfig", "PPOConfig",
           "PreferenceLossConfig", "RewardedConfig", "SamplingConfig", "loss_params"]   # the algo group's schemas

PRECISIONS = ("fp32", "bf16")


@dataclass
class TaskConfig:
    name: str = "imdb"                  # embedded task; "none" = bring your own model and preference data
    seed: int = 0                       # split / prompt sampling seed (independent of the run seed)
    test_fraction: float = 0.1          # held-out share of reviews (test prompts and gold-classifier accuracy)
    max_train_reviews: Optional[int] = None  # subsample the train reviews (tests); None = all
    vocab_size: int = 4096              # BPE vocabulary trained on the train split
    prompt_min_tokens: int = 2          # prompts are review prefixes of 2–8 tokens (DPO paper §6.1)
    prompt_max_tokens: int = 8
    num_train_prompts: int = 2000       # prefixes used for preference generation (k samples each)
    num_test_prompts: int = 256         # held-out prefixes used by every evaluation


@dataclass
class RewardConfig:
    gold: str = "classifier"            # gold reward the policy never trains on: classifier | vader


@dataclass
class ModelConfig:
    name_or_path: Optional[str] = None  # hub name or local path; None = build from `arch` + `config` (tiny models)
    arch: str = "gpt2"                  # model_type for AutoConfig.for_model when building from config
    config: dict[str, Any] = field(default_factory=dict)  # architecture kwargs (n_layer, n_embd, ...)
    dtype: str = "float32"              # weights dtype when loading: float32 | bfloat16
    sft: bool = True                    # run the task's SFT stage on this model before alignment
    trust_remote_code: bool = False     # run a hub model's own Python code (auto_map); only for models you trust


@dataclass
class SFTConfig:
    steps: int = 400                    # optimizer steps
    batch_size: int = 32
    seq_len: int = 64                   # reviews truncated to this many tokens (+ eos)
    lr: float = 1e-3
    warmup_steps: int = 20
    weight_decay: float = 0.0
    num_texts: Optional[int] = None     # train on the first N train reviews; None = all


@dataclass
class PreferenceGenConfig:
    completions_per_prompt: int = 4     # k samples per prefix; all k(k-1)/2 pairs are labelled (paper: 4 → 6 pairs)
    max_new_tokens: int = 48
    temperature: float = 1.0
    batch_size: int = 256
    label_noise_temperature: float = 0.0  # >0: Bradley–Terry annotators, P(a ≻ b) = σ((r_a − r_b)/T)
    max_pairs: Optional[int] = None     # cap on the written pairs (random subset); None = all
    # who labels the pairs the DPO family trains on, and which it keeps (recipes/pair_labels.py); these do not
    # enter the generated pairs' key, so the gold-labelled pairs (and PPO's reward model) are shared by all
    labeler: str = "gold"               # gold | reward_model | judge:<preset> (conf/judge/<preset>.yaml)
    filter: str = "none"                # none | reward_model: keep pairs with RM margin > filter_margin (fDPO)
    filter_margin: float = 0.0          # r(chosen) − r(rejected), the reward model's normalised units


LABEL_KEYS = ("labeler", "filter", "filter_margin")   # PreferenceGenConfig keys read after generation


@dataclass
class DataConfig:
    source: Optional[str] = None        # None = the task's generated preferences; else .jsonl/.parquet path or hub name
    split: str = "train"
    max_prompt_length: int = 16         # tokens; longer prompts keep their end
    max_completion_length: int = 49     # tokens incl. eos; longer completions keep their start
    truncation: str = "truncate"        # truncate | drop
    max_pairs: Optional[int] = None     # use the first N pairs (after shuffling with the task seed)


@dataclass
class OptimConfig:
    name: str = "adamw"                 # adamw | rmsprop | sgd
    lr: float = 1e-4
    weight_decay: float = 0.0
    betas: tuple[float, float] = (0.9, 0.999)
    warmup_steps: int = 10              # linear warm-up, then constant (DPO paper)
    max_grad_norm: float = 10.0


@dataclass
class TrainConfig:
    steps: int = 100                    # optimizer steps
    batch_size: int = 32                # pairs per optimizer step (global)
    micro_batch_size: int = 32          # pairs per forward/backward; batch_size must be a multiple
    precision: str = "fp32"             # fp32 | bf16 (autocast; CPU and CUDA)
    device: str = "auto"                # auto | cpu | cuda | cuda:N
    save_model: bool = True             # save the final policy (HF format) in the run directory
    checkpoint_every: int = 50          # optimizer steps (PPO: PPO steps) between atomic checkpoints (exact resume;
                                        # SIGTERM / SIGUSR1 also checkpoint, then exit)
    threads: Optional[int] = None       # torch intra-op threads on CPU; None = torch default
    compile: bool = False               # torch.compile the policy's training forward (DPO family); batches are
                                        # padded to data.max_prompt_length / max_completion_length so it compiles once
    budget: "BudgetConfig" = field(default_factory=lambda: BudgetConfig())


BUDGET_UNITS = ("samples", "flops", "seconds")


@dataclass
class BudgetConfig:
    """Train to a cost instead of a step count (trainers/compute.py counts it), so arms compare at equal cost."""

    by: Optional[str] = None            # null: train.steps | samples (episodes or pairs: sets train.steps) | flops |
                                        # seconds (train until spent, at most train.steps; evaluated where it stops)
    value: Optional[float] = None       # how many


@dataclass
class StrategyConfig:
    """How models are placed across processes (the `strategy` config group; conf/strategy/*.yaml)."""

    name: str = "torch"                 # torch (one process, or DDP under torchrun) | deepspeed (ZeRO)
    zero_stage: int = 0                 # deepspeed: 0 (DDP-like) | 1 optimizer states | 2 + gradients | 3 + parameters
    offload_optimizer: bool = False     # deepspeed: optimizer states (and the step) on the CPU (ZeRO-Offload)
    offload_param: bool = False         # deepspeed ZeRO-3: trained models' parameters on the CPU (ZeRO-Infinity)
    reference_offload_param: bool = False  # deepspeed ZeRO-3: the frozen reference's eval engine on the CPU
    reward_offload_param: bool = False  # deepspeed ZeRO-3: the frozen learned reward model's eval engine on the CPU
    generation: str = "gather"          # ZeRO-3 sampling: gather (full actor once per rollout) | synced (collective
                                        # forwards, ranks agree on "all finished"; for models too large to gather)
    config_path: Optional[str] = None   # a DeepSpeed JSON whose sections (zero_optimization, comms, ...) are merged
                                        # in; batch sizes, clipping, optimizer and precision always come from here


@dataclass
class LoraConfig:
    """LoRA adapters (peft) on the trained policy (DPO family, PPO actor; optionally the PPO critic's backbone): the
    base weights stay frozen, so the reference is the same model with its adapters switched off (models/lora.py)."""

    r: Optional[int] = None             # adapter rank; null = LoRA off (full fine-tuning)
    alpha: float = 16.0                 # peft's lora_alpha: the update is scaled by alpha / r
    dropout: float = 0.0                # on the adapters' input; > 0 makes log-prob ratios noisy, as dropout does
    target_modules: Optional[list[str]] = None  # null = peft's default for the architecture (gpt2: c_attn)
    critic: bool = False                # PPO: adapters on the critic's backbone as well (its head stays trained)


@dataclass
class EvalConfig:
    every: int = 25                     # evaluate at step 0, every N steps and at the end
    num_prompts: Optional[int] = None   # held-out prompts (None = all of the task's test prompts)
    samples_per_prompt: int = 1
    temperature: float = 1.0            # sampling temperature; KL is measured between tempered distributions
    max_new_tokens: int = 48
    batch_size: int = 128
    seed: int = 1234                    # same prompts and random stream at every evaluation (common random numbers)


@dataclass
class LoggerConfig:
    name: str = "wandb"                 # wandb | none (the local metrics.jsonl is always written)
    project: str = "rlhf_lab"
    entity: Optional[str] = None
    mode: str = "offline"               # offline | online | disabled
    group: Optional[str] = None
    tags: list[str] = field(default_factory=list)


@dataclass
class RunConfig:
    task: TaskConfig = field(default_factory=TaskConfig)
    reward: RewardConfig = field(default_factory=RewardConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    sft: SFTConfig = field(default_factory=SFTConfig)
    preferences: PreferenceGenConfig = field(default_factory=PreferenceGenConfig)
    data: DataConfig = field(default_factory=DataConfig)
    algo: Any = None                    # AlgoConfig or PPOConfig, chosen by algo.name (see ALGO_SCHEMAS)
    reward_model: "RewardModelConfig" = field(default_factory=lambda: RewardModelConfig())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    lora: LoraConfig = field(default_factory=LoraConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    study: str = "adhoc"                # study name written into every points row
    run_id: Optional[str] = None        # None = derived from method, loss and parameters
    output_root: str = "outputs"
    cache_dir: str = "outputs/cache"    # content-addressed stage cache shared by all runs
    force: bool = False                 # re-run even if the run directory is complete


def _validate_semantics(cfg: RunConfig) -> None:
    validate_algo(cfg.algo)
    _validate_common(cfg)
    _validate_lora(cfg.lora, cfg.algo)
    _apply_budget(cfg)


def _apply_budget(cfg: RunConfig) -> None:
    """A samples budget becomes the step count here, once; flops and seconds are checked while training."""
    from rlhf_lab.trainers.compute import examples_per_step, steps_for_budget

    b = cfg.train.budget
    check(b.by in (None, *BUDGET_UNITS), "train.budget.by", f"null | {' | '.join(BUDGET_UNITS)}", b.by)
    check((b.by is None) == (b.value is None), "train.budget.value", "set exactly when train.budget.by is",
          b.value)
    check(b.value is None or b.value > 0, "train.budget.value", "> 0", b.value)
    if b.by is not None and isinstance(cfg.algo, BestOfNConfig):
        raise ConfigError("config key 'train.budget': algo=best_of_n trains nothing, so a training budget does not "
                          "apply (its cost is its samples: algo.samples per prompt)")
    if b.by == "samples":
        cfg.train.steps = steps_for_budget(b.value, examples_per_step(cfg))


def _validate_lora(lora: LoraConfig, algo) -> None:
    check(lora.r is None or lora.r >= 1, "lora.r", "an integer >= 1, or null (LoRA off)", lora.r)
    check(lora.alpha > 0, "lora.alpha", "> 0", lora.alpha)
    check(0 <= lora.dropout < 1, "lora.dropout", "in [0, 1)", lora.dropout)
    check(lora.target_modules is None or (len(lora.target_modules) > 0 and all(lora.target_modules)),
          "lora.target_modules", "null (peft's default for the architecture) or a non-empty list of module names",
          lora.target_modules)
    if lora.r is None:
        check(not lora.critic, "lora.critic", "false while lora.r is null (LoRA is off)", lora.critic)
        return
    if isinstance(algo, BestOfNConfig):
        raise ConfigError("config key 'lora.r': algo=best_of_n trains nothing, so there are no adapters to train "
                          "(set lora.r=null)")
    check(not lora.critic or isinstance(algo, PPOConfig), "lora.critic", "false unless algo is PPO (only PPO has "
          "a critic)", lora.critic)
    if isinstance(algo, PPOConfig):
        check(algo.ema_reference_decay is None, "algo.ema_reference_decay", "null with lora.r set (LoRA's "
              "reference is the frozen base under the adapters; an EMA reference needs weights of its own)",
              algo.ema_reference_decay)


def _validate_common(cfg: RunConfig) -> None:
    check(cfg.optim.name in ("adamw", "rmsprop", "sgd"), "optim.name", "adamw | rmsprop | sgd", cfg.optim.name)
    check(cfg.optim.lr > 0, "optim.lr", "> 0", cfg.optim.lr)
    check(cfg.train.precision in PRECISIONS, "train.precision", " | ".join(PRECISIONS), cfg.train.precision)
    check(cfg.train.steps >= 1, "train.steps", ">= 1", cfg.train.steps)
    check(cfg.train.checkpoint_every >= 1, "train.checkpoint_every", ">= 1", cfg.train.checkpoint_every)
    if isinstance(cfg.algo, AlgoConfig):   # PPO's batch is algo.rollout_batch_size; best-of-n trains nothing
        check(cfg.train.micro_batch_size >= 1 and cfg.train.batch_size % cfg.train.micro_batch_size == 0,
              "train.batch_size", f"a multiple of train.micro_batch_size={cfg.train.micro_batch_size}",
              cfg.train.batch_size)
    check(cfg.eval.every >= 1, "eval.every", ">= 1", cfg.eval.every)
    check(cfg.eval.temperature > 0, "eval.temperature", "> 0", cfg.eval.temperature)
    check(cfg.preferences.temperature > 0, "preferences.temperature", "> 0", cfg.preferences.temperature)
    check(cfg.preferences.completions_per_prompt >= 2, "preferences.completions_per_prompt", ">= 2",
          cfg.preferences.completions_per_prompt)
    _validate_labels(cfg.preferences)
    check(cfg.data.truncation in ("truncate", "drop"), "data.truncation", "truncate | drop", cfg.data.truncation)
    check(cfg.reward.gold in ("classifier", "vader"), "reward.gold", "classifier | vader", cfg.reward.gold)
    _validate_strategy(cfg.strategy, cfg.train)
    validate_reward_model(cfg.reward_model)
    check(cfg.logger.name in ("wandb", "none"), "logger.name", "wandb | none", cfg.logger.name)
    check(cfg.task.name in ("imdb", "none"), "task.name", "imdb | none", cfg.task.name)
    if cfg.task.name == "none":
        check(cfg.data.source is not None, "data.source", "a dataset path or hub name when task=none", None)
        check(cfg.model.name_or_path is not None, "model.name_or_path", "a model when task=none", None)
    check(cfg.model.name_or_path is not None or bool(cfg.model.config), "model.config",
          "architecture kwargs when model.name_or_path is null", cfg.model.config)
    check(cfg.model.sft or cfg.model.name_or_path is not None, "model.name_or_path",
          "a pretrained model when model.sft=false (there is nothing to start from)", None)


def _validate_labels(p: PreferenceGenConfig) -> None:
    from rlhf_lab.rewards.annotators import check_annotator_spec

    check_annotator_spec(p.labeler, "preferences.labeler", check_credentials=True)
    check(p.filter in ("none", "reward_model"), "preferences.filter", "none | reward_model", p.filter)
    check(math.isfinite(p.filter_margin), "preferences.filter_margin", "a finite number", p.filter_margin)


def validate_reward_model(r: "RewardModelConfig") -> None:
    """Checked with the rest of the run config at start-up, not when the stage starts after SFT and sampling."""
    checks = [
        (r.steps >= 1, "steps", ">= 1", r.steps),
        (r.batch_size >= 1, "batch_size", ">= 1", r.batch_size),
        (r.lr > 0, "lr", "> 0", r.lr),
        (r.weight_decay >= 0, "weight_decay", ">= 0", r.weight_decay),
        (r.warmup_steps >= 0, "warmup_steps", ">= 0", r.warmup_steps),
        (r.max_grad_norm is None or r.max_grad_norm > 0, "max_grad_norm", "> 0 or null", r.max_grad_norm),
        (r.center_rewards_coefficient is None or r.center_rewards_coefficient >= 0,
         "center_rewards_coefficient", ">= 0 or null", r.center_rewards_coefficient),
        (0.0 <= r.eval_fraction < 1.0, "eval_fraction", "in [0, 1)", r.eval_fraction),
        (r.normalization_samples == 0 or r.normalization_samples >= 2, "normalization_samples",
         "0 (off) or >= 2", r.normalization_samples),
    ]
    for ok, key, expected, value in checks:
        check(ok, f"reward_model.{key}", expected, value)


def _validate_strategy(s: StrategyConfig, train: TrainConfig) -> None:
    check(s.name in ("torch", "deepspeed"), "strategy.name", "torch | deepspeed", s.name)
    check(s.zero_stage in (0, 1, 2, 3), "strategy.zero_stage", "0, 1, 2 or 3", s.zero_stage)
    check(s.generation in ("gather", "synced"), "strategy.generation", "gather | synced", s.generation)
    if s.name == "torch":
        for key in ("offload_optimizer", "offload_param", "reference_offload_param", "reward_offload_param"):
            check(not getattr(s, key), f"strategy.{key}", "false with strategy.name=torch (offload needs deepspeed)",
                  getattr(s, key))
        check(s.zero_stage == 0, "strategy.zero_stage", "0 with strategy.name=torch (ZeRO needs deepspeed)",
              s.zero_stage)
        check(s.config_path is None, "strategy.config_path", "null with strategy.name=torch", s.config_path)
    else:
        for key in ("offload_param", "reference_offload_param", "reward_offload_param"):
            check(not getattr(s, key) or s.zero_stage == 3, f"strategy.{key}",
                  "true only with zero_stage=3 (below it every rank keeps whole parameters)", getattr(s, key))
        check(not train.compile, "train.compile", "false with strategy=deepspeed (DeepSpeed compiles its own "
              "engine)", train.compile)


def _to_schema(schema: type, node, prefix: str):
    try:
        return OmegaConf.to_object(OmegaConf.merge(OmegaConf.structured(schema), node))
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid config at key '{prefix}{key}': {msg}") from None


def validate_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Merge a composed config into the schema; raise ConfigError naming the offending key."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"]) if "hydra" in raw else raw
    algo_raw = raw.get("algo") or OmegaConf.create({})
    name = algo_raw.get("name", "dpo")
    if name not in ALGO_SCHEMAS:
        raise ConfigError(f"config key 'algo.name': unknown algorithm {name!r}; valid: {', '.join(ALGO_SCHEMAS)}")
    rest = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "algo"])
    run_cfg: RunConfig = _to_schema(RunConfig, rest, prefix="")
    run_cfg.algo = _to_schema(ALGO_SCHEMAS[name], algo_raw, prefix="algo.")
    _validate_semantics(run_cfg)
    return run_cfg


def to_container(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]


@dataclass
class RewardModelConfig:
    steps: int = 150                    # optimizer steps of Bradley–Terry training
    batch_size: int = 32                # pairs per optimizer step (2× rows per forward: chosen then rejected)
    lr: float = 1e-4                    # AdamW
    weight_decay: float = 0.0           # AdamW decoupled weight decay (0.1 cut over-fitting on the IMDb pairs)
    warmup_steps: int = 10              # linear warm-up, then constant
    max_grad_norm: float = 10.0         # gradient clipping of the RM loop (overrides the strategy's)
    center_rewards_coefficient: Optional[float] = None  # c·mean((r_c + r_r)²) (0.01 suggested); None = off
    use_margin: bool = False            # margin = chosen_score − rejected_score (gold gap) when the pairs carry scores
    eval_fraction: float = 0.1          # share of pairs held out (split by prompt) for pairwise accuracy
    normalization_samples: int = 256    # SFT samples on train prompts used to fit gain/bias (mean 0, std 1); 0 = none
