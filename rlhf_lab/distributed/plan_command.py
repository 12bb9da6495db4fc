"""`rlhf-lab plan`: does a PPO or DPO run fit on these GPUs, and with which ZeRO stage / offload?

    rlhf-lab plan model=NAME_OR_DIR algo=ppo|rloo|grpo|dpo|online_dpo gpus=N gpu_gib=G [nodes=1] [micro_batch=1] [seq_len=1024]
                  [precision=autocast_bf16|bf16|fp32] [stages=0,1,2,3] [offload=none,optimizer,param]
                  [headroom=0.9] [checkpointing=false] [json=FILE]
    rlhf-lab plan arch=llama hidden=4096 layers=32 heads=32 kv_heads=8 intermediate=14336 vocab=128256
                  [tie_embeddings=false] [positions=N] algo=ppo gpus=8 gpu_gib=80

`model=` reads only the model's config (`AutoConfig.from_pretrained`: a local directory, or config.json from the
hub); `arch=` builds one from numbers (`AutoConfig.for_model`), unset numbers keeping that architecture's defaults.
The model is instantiated on the meta device and counted; rlhf_lab.distributed.planner does the arithmetic. `gpus`
is per node. Prints a table (GiB per GPU per role per option) and a one-line verdict; `json=FILE` writes the plan.
"""
from __future__ import annotations

import json
from pathlib import Path

from rlhf_lab.utils.errors import ConfigError

ARCH_KEYS = {   # key -> config attributes to try, first one the architecture's config has
    "hidden": ("hidden_size",), "layers": ("num_hidden_layers",), "heads": ("num_attention_heads",),
    "kv_heads": ("num_key_value_heads",), "intermediate": ("intermediate_size", "n_inner", "ffn_dim"),
    "vocab": ("vocab_size",), "positions": ("max_position_embeddings",), "tie_embeddings": ("tie_word_embeddings",),
}
INT_KEYS = ("gpus", "nodes", "micro_batch", "seq_len", *(k for k in ARCH_KEYS if k != "tie_embeddings"))
BOOL_KEYS = ("tie_embeddings", "checkpointing")
OPTIONS = ("model", "arch", "algo", "gpu_gib", "precision", "stages", "offload", "headroom", "json", *INT_KEYS,
           *BOOL_KEYS)
OFFLOADS = ("none", "optimizer", "param")
KNOWN_ARCH = {   # suggestions when a hub config cannot be read (numbers from the models' config.json)
    "gpt2": "arch=gpt2 hidden=768 layers=12 heads=12 vocab=50257 positions=1024",
    "gpt2-medium": "arch=gpt2 hidden=1024 layers=24 heads=16 vocab=50257 positions=1024",
    "gpt2-large": "arch=gpt2 hidden=1280 layers=36 heads=20 vocab=50257 positions=1024",
    "gpt2-xl": "arch=gpt2 hidden=1600 layers=48 heads=25 vocab=50257 positions=1024",
    "meta-llama/Meta-Llama-3-8B": "arch=llama hidden=4096 layers=32 heads=32 kv_heads=8 intermediate=14336 "
                                  "vocab=128256 tie_embeddings=false",
}


def parse_plan_args(args: list[str]) -> dict:
    """`key=value` tokens -> typed options; an unknown key or a bad value is a ConfigError naming the key."""
    opts: dict = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in OPTIONS:
            raise ConfigError(f"rlhf-lab plan: unknown option {arg!r}; expected key=value with key one of "
                              f"{', '.join(OPTIONS)}")
        opts[key] = _typed(key, value.strip())
    if ("model" in opts) == ("arch" in opts):
        raise ConfigError("rlhf-lab plan: give model=NAME_OR_DIR (a hub name or a local model directory) or "
                          "arch=TYPE with its numbers (e.g. arch=llama hidden=4096 layers=32 ...), not both")
    if "model" in opts and (given := [k for k in ARCH_KEYS if k in opts]):
        raise ConfigError(f"{given[0]}=: architecture numbers go with arch=, not model=")
    for key in ("algo", "gpus", "gpu_gib"):
        if key not in opts:
            raise ConfigError(f"rlhf-lab plan: {key}= is required (e.g. algo=ppo gpus=8 gpu_gib=80)")
    return opts


def _typed(key: str, value: str):
    from rlhf_lab.distributed.planner import PRECISIONS, ROLES

    if key in INT_KEYS:
        if not value.isdigit() or int(value) < 1:
            raise ConfigError(f"{key}={value!r}: expected a positive integer")
        return int(value)
    if key in BOOL_KEYS:
        if value.lower() not in ("true", "false", "1", "0", "yes", "no"):
            raise ConfigError(f"{key}={value!r}: expected true or false")
        return value.lower() in ("true", "1", "yes")
    if key in ("gpu_gib", "headroom"):
        try:
            number = float(value)
        except ValueError:
            number = float("nan")
        if not number > 0 or key == "headroom" and number > 1:
            raise ConfigError(f"{key}={value!r}: expected a number > 0" + (" and <= 1" if key == "headroom" else ""))
        return number
    choices = {"algo": tuple(ROLES), "precision": tuple(PRECISIONS)}.get(key)
    if choices and value not in choices:
        raise ConfigError(f"{key}={value!r}: expected one of {', '.join(choices)}")
    if key in ("stages", "offload"):
        return _list(key, value, ("0", "1", "2", "3") if key == "stages" else OFFLOADS)
    if not value:
        raise ConfigError(f"{key}=: empty value")
    return value


def _list(key: str, value: str, allowed: tuple[str, ...]) -> list[str]:
    items = [v.strip() for v in value.strip("[]").split(",") if v.strip()]
    if not items or any(v not in allowed for v in items):
        raise ConfigError(f"{key}={value!r}: expected a comma-separated subset of {','.join(allowed)}")
    return items


def load_config(opts: dict):
    """The model's transformers config: `model=` (config.json only) or `arch=` plus numbers."""
    from transformers import AutoConfig

    if "model" in opts:
        name = opts["model"]
        try:
            return AutoConfig.from_pretrained(name)
        except (OSError, ValueError) as e:
            if Path(name).exists():
                raise ConfigError(f"model={name}: cannot read a model config there ({e})") from None
            hint = KNOWN_ARCH.get(name, "arch=TYPE hidden=H layers=L heads=A [kv_heads=K] [intermediate=I] vocab=V")
            raise ConfigError(f"model={name}: its config could not be read (no such local directory, and the "
                              f"Hugging Face hub is unreachable or has no such model); give the architecture by "
                              f"numbers instead: {hint}") from None
    arch = opts["arch"]
    try:
        base = AutoConfig.for_model(arch)
    except ValueError:
        raise ConfigError(f"arch={arch!r}: not a transformers model type (e.g. gpt2, llama, mistral, qwen2)") from None
    kwargs = {}
    for key, names in ARCH_KEYS.items():
        if key in opts:
            attr = next((n for n in names if hasattr(base, n)), None)
            if attr is None and key == "kv_heads" and opts[key] == opts.get("heads", base.num_attention_heads):
                continue   # no grouped-query attention in this architecture, and none asked for
            if attr is None:
                raise ConfigError(f"{key}={opts[key]}: the {arch} config has no such setting ({', '.join(names)})")
            kwargs[attr] = opts[key]
    config = AutoConfig.for_model(arch, **kwargs)
    check_heads(config.get_text_config())
    return config


def check_heads(text) -> None:
    heads = text.num_attention_heads
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    if heads % kv_heads:
        raise ConfigError(f"kv_heads={kv_heads}: must divide heads={heads}")
    if text.hidden_size % heads:
        raise ConfigError(f"heads={heads}: must divide hidden={text.hidden_size}")


def selected_options(opts: dict):
    from rlhf_lab.distributed.planner import OPTIONS as PLAN_OPTIONS

    stages, offload = opts.get("stages"), opts.get("offload")
    chosen = [o for o in PLAN_OPTIONS if (stages is None or str(o.stage) in stages)
              and (offload is None or o.offload in offload)]
    if not chosen:
        raise ConfigError(f"stages={','.join(stages or '0123')} offload={','.join(offload or OFFLOADS)}: no option "
                          f"left (optimizer offload needs stage 2 or 3, parameter offload stage 3)")
    return chosen


def plan_main(args: list[str]) -> int:
    """The command (module doc): returns the exit code. UserErrors propagate (the CLI prints them, exit 2)."""
    from rlhf_lab.distributed import planner
    from rlhf_lab.utils.cache import atomic_write_text

    opts = parse_plan_args(args)
    options = selected_options(opts)
    shape = planner.shape_from_config(load_config(opts))
    result = planner.plan(shape, opts["algo"], opts["gpus"], opts["gpu_gib"], nodes=opts.get("nodes", 1),
                          micro_batch=opts.get("micro_batch", 1), seq_len=opts.get("seq_len", 1024),
                          precision=opts.get("precision", "autocast_bf16"), options=options,
                          headroom=opts.get("headroom", 0.9), checkpointing=opts.get("checkpointing", False))
    print(planner.format_table(result))
    print(planner.verdict(result))
    if "json" in opts:
        atomic_write_text(Path(opts["json"]), json.dumps(
            {"inputs": {k: v for k, v in opts.items() if k != "json"}, **result.to_dict()}, indent=2) + "\n")
    return 0
