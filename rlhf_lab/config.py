"""Typed configuration: one dataclass per Hydra config group, validated after composition.

Hydra composes YAML from `conf/`; `validate_run_config` merges the result into these dataclasses so that an
unknown key, a wrong type or an out-of-range value fails early with a message naming the key
(`algo.beta must be > 0, got -1`), before any model is built.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional

from omegaconf import DictConfig, OmegaConf
from omegaconf.errors import OmegaConfBaseException

from rlhf_lab.utils.errors import ConfigError

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
    num_train_prompts: int = 1000       # prefixes used for preference generation (k samples each)
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


@dataclass
class DataConfig:
    source: Optional[str] = None        # None = the task's generated preferences; else .jsonl/.parquet path or hub name
    split: str = "train"
    max_prompt_length: int = 16         # tokens; longer prompts keep their end
    max_completion_length: int = 49     # tokens incl. eos; longer completions keep their start
    truncation: str = "truncate"        # truncate | drop
    max_pairs: Optional[int] = None     # use the first N pairs (after shuffling with the task seed)


@dataclass
class AlgoConfig:
    name: str = "dpo"                   # trainer: dpo (the whole DPO family, paired or unpaired)
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
    threads: Optional[int] = None       # torch intra-op threads on CPU; None = torch default


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
    algo: AlgoConfig = field(default_factory=AlgoConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    eval: EvalConfig = field(default_factory=EvalConfig)
    logger: LoggerConfig = field(default_factory=LoggerConfig)
    seed: int = 0
    study: str = "adhoc"                # study name written into every points row
    run_id: Optional[str] = None        # None = derived from method, loss and parameters
    output_root: str = "outputs"
    cache_dir: str = "outputs/cache"    # content-addressed stage cache shared by all runs
    force: bool = False                 # re-run even if the run directory is complete


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _validate_semantics(cfg: RunConfig) -> None:
    from rlhf_lab.algos.preference import LOSSES, validate_params

    a = cfg.algo
    _check(a.name == "dpo", "algo.name", "'dpo'", a.name)
    if a.loss_type not in LOSSES:
        raise ConfigError(
            f"config key 'algo.loss_type': unknown loss {a.loss_type!r}; valid names: {', '.join(sorted(LOSSES))}"
        )
    try:
        validate_params(a.loss_type, loss_params(a))
    except ValueError as e:
        raise ConfigError(f"config group 'algo': {e}") from None
    _check(cfg.optim.name in ("adamw", "rmsprop", "sgd"), "optim.name", "adamw | rmsprop | sgd", cfg.optim.name)
    _check(cfg.optim.lr > 0, "optim.lr", "> 0", cfg.optim.lr)
    _check(cfg.train.precision in PRECISIONS, "train.precision", " | ".join(PRECISIONS), cfg.train.precision)
    _check(cfg.train.steps >= 1, "train.steps", ">= 1", cfg.train.steps)
    _check(
        cfg.train.micro_batch_size >= 1 and cfg.train.batch_size % cfg.train.micro_batch_size == 0,
        "train.batch_size", f"a multiple of train.micro_batch_size={cfg.train.micro_batch_size}", cfg.train.batch_size,
    )
    _check(cfg.eval.every >= 1, "eval.every", ">= 1", cfg.eval.every)
    _check(cfg.eval.temperature > 0, "eval.temperature", "> 0", cfg.eval.temperature)
    _check(cfg.preferences.temperature > 0, "preferences.temperature", "> 0", cfg.preferences.temperature)
    _check(cfg.preferences.completions_per_prompt >= 2, "preferences.completions_per_prompt", ">= 2",
           cfg.preferences.completions_per_prompt)
    _check(cfg.data.truncation in ("truncate", "drop"), "data.truncation", "truncate | drop", cfg.data.truncation)
    _check(cfg.reward.gold in ("classifier", "vader"), "reward.gold", "classifier | vader", cfg.reward.gold)
    _check(cfg.logger.name in ("wandb", "none"), "logger.name", "wandb | none", cfg.logger.name)
    _check(cfg.task.name in ("imdb", "none"), "task.name", "imdb | none", cfg.task.name)
    if cfg.task.name == "none":
        _check(cfg.data.source is not None, "data.source", "a dataset path or hub name when task=none", None)
        _check(cfg.model.name_or_path is not None, "model.name_or_path", "a model when task=none", None)
    _check(cfg.model.name_or_path is not None or bool(cfg.model.config), "model.config",
           "architecture kwargs when model.name_or_path is null", cfg.model.config)


def loss_params(algo: AlgoConfig):
    from rlhf_lab.algos.preference import LossParams

    return LossParams(
        beta=float(algo.beta), label_smoothing=algo.label_smoothing, rpo_alpha=algo.rpo_alpha,
        simpo_gamma=algo.simpo_gamma, orpo_lambda=algo.orpo_lambda, discopop_tau=algo.discopop_tau,
        f_divergence_type=algo.f_divergence_type, f_alpha_divergence_coef=algo.f_alpha_divergence_coef,
        desirable_weight=algo.desirable_weight, undesirable_weight=algo.undesirable_weight,
    )


def validate_run_config(cfg: DictConfig | dict) -> RunConfig:
    """Merge a composed config into the schema; raise ConfigError naming the offending key."""
    raw = cfg if isinstance(cfg, DictConfig) else OmegaConf.create(cfg)
    raw = OmegaConf.masked_copy(raw, [k for k in raw.keys() if k != "hydra"]) if "hydra" in raw else raw
    try:
        merged = OmegaConf.merge(OmegaConf.structured(RunConfig), raw)
        run_cfg: RunConfig = OmegaConf.to_object(merged)  # type: ignore[assignment]
    except OmegaConfBaseException as e:
        key = getattr(e, "full_key", None) or "?"
        msg = str(e).splitlines()[0]
        raise ConfigError(f"invalid config at key '{key}': {msg}") from None
    _validate_semantics(run_cfg)
    return run_cfg


def to_container(cfg: RunConfig) -> dict:
    return OmegaConf.to_container(OmegaConf.structured(cfg), resolve=True)  # type: ignore[return-value]
