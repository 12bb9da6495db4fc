"""Complete stage keys: every config key is declared as feeding a set of cached stages (possibly none), and
changing it changes exactly those stages' keys. The schema is walked, so a new config key fails this test until
it is declared: nobody can add an input to a stage and forget its key (which would let the first run to build a
stage decide it for every later run)."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import pytest

from rlhf_lab.config import RunConfig
from rlhf_lab.recipes.stage_keys import stage_keys
from rlhf_lab.study.runner import compose_run_config

Declared = Callable[[RunConfig], set]


def stages(*names: str) -> Declared:
    """These stages, except that with the user's pairs (data.source) the DPO reference table no longer depends
    on what only the generated preferences read (it still depends on the SFT reference model); and the relabel /
    filter stages, when switched on, change with whatever feeds them (recipes/label_stages.py)."""
    def for_config(cfg: RunConfig) -> set:
        upstream_only = cfg.data.source is not None and "preferences" in names and "sft" not in names
        return with_pair_stages(cfg, set(names) - ({"reference_logps"} if upstream_only else set()))
    return for_config


def with_pair_stages(cfg: RunConfig, changed: set) -> set:
    p, out = cfg.preferences, set(changed)
    if cfg.data.source is not None:
        return out
    rm_feeds = "reward_model" in out
    if p.labeler != "gold" and ("preferences" in out or (p.labeler == "reward_model" and rm_feeds)):
        out |= {"relabel", "reference_logps"}
    if p.filter != "none" and (out & {"preferences", "relabel"} or rm_feeds):
        out |= {"filter", "reference_logps"}
    return out


def when_on(*names: str, switch: Callable[[RunConfig], bool]) -> Declared:
    """A key that feeds `names` only where `switch(cfg)` holds (and never with the user's pairs)."""
    return lambda cfg: with_pair_stages(cfg, set(names)) if cfg.data.source is None and switch(cfg) else set()


ALL = stages("task", "sft", "preferences", "reference_logps", "reward_model")
FROM_SFT = stages("sft", "preferences", "reference_logps", "reward_model")
FROM_PREFERENCES = stages("preferences", "reference_logps", "reward_model")
WITH_TASK = stages("task", "preferences", "reference_logps", "reward_model")
TOKENIZED = stages("reference_logps", "reward_model")
NONE = stages()

# config key (or group prefix ending in '.') -> the stages whose keys it must change; the most specific wins
DECLARED: dict[str, Declared] = {
    # the split and the tokenizer decide every stage; prompt counts only the task and what samples its prompts
    "task.seed": ALL, "task.test_fraction": ALL, "task.max_train_reviews": ALL, "task.vocab_size": ALL,
    "task.prompt_min_tokens": WITH_TASK, "task.prompt_max_tokens": WITH_TASK, "task.num_train_prompts": WITH_TASK,
    # evaluation prompts, read by runs; the preference key holds the whole task's hash (prompts are drawn from
    # one seeded stream), so this conservatively rebuilds the preferences too
    "task.num_test_prompts": WITH_TASK,
    "reward.gold": WITH_TASK,                                # labels the pairs; SFT never sees it
    "model.": FROM_SFT,
    "model.trust_remote_code": NONE,                        # permission to load, not an input of any output
    "sft.": FROM_SFT,
    "preferences.": FROM_PREFERENCES,
    # who labels and which pairs are kept: only the stages after the generated pairs (their key is unchanged)
    "preferences.labeler": when_on("relabel", "reference_logps", switch=lambda cfg: True),
    "preferences.filter": when_on("filter", "reference_logps", switch=lambda cfg: True),
    "preferences.filter_margin": when_on("filter", "reference_logps", switch=lambda cfg: cfg.preferences.filter != "none"),
    # the user's pairs replace the generated ones (and switch off relabelling / filtering them)
    "data.source": lambda cfg: (with_pair_stages(cfg, {"preferences"}) - {"preferences"}) | {"reference_logps"},
    "data.split": lambda cfg: {"reference_logps"} if cfg.data.source else set(),   # a hub dataset's split
    "data.max_prompt_length": TOKENIZED, "data.max_completion_length": TOKENIZED, "data.truncation": TOKENIZED,
    "data.max_pairs": NONE,                                  # subsamples after the reference table (indexed by row)
    "reward_model.": stages("reward_model"),
    # the stages that train (SFT, reward model) use the run's optimizer kind, its clipping (SFT) and precision
    "optim.name": FROM_SFT, "optim.betas": FROM_SFT,
    "optim.max_grad_norm": FROM_SFT,
    "optim.lr": NONE, "optim.weight_decay": NONE, "optim.warmup_steps": NONE,   # the stages' own groups set these
    "train.precision": FROM_SFT,
    # the strategy, device, threads and world size train the same stage up to reduction order: not in keys
    "train.": NONE, "strategy.": NONE, "eval.": NONE, "logger.": NONE, "algo.": NONE,
    "lora.": NONE,      # adapters train on top of the stages' models (the base is the SFT model, unchanged)
    "seed": NONE, "study": NONE, "run_id": NONE, "output_root": NONE, "cache_dir": NONE, "force": NONE,
}
STRUCTURAL = {"task.name"}   # switches whole stages on or off (task=none): covered by the pipeline tests


def declared(key: str, cfg: RunConfig) -> set[str]:
    matches = [k for k in DECLARED if key == k or (k.endswith(".") and key.startswith(k))]
    if not matches:
        raise AssertionError(f"config key {key!r} is not declared in tests/test_stage_keys.py: say which cached "
                             "stages it feeds (and put it in their keys), or that it feeds none")
    return DECLARED[max(matches, key=len)](cfg)


def leaves(obj: Any, prefix: str = "") -> list[tuple[str, Any]]:
    out = []
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        if dataclasses.is_dataclass(value):
            out += leaves(value, f"{prefix}{f.name}.")
        else:
            out.append((f"{prefix}{f.name}", value))
    return out


def changed_value(key: str, value: Any) -> Any:
    special = {"reward.gold": "vader", "data.truncation": "drop", "optim.name": "sgd", "train.precision": "bf16",
               "model.arch": "llama", "model.dtype": "bfloat16", "model.name_or_path": "gpt2",
               "data.source": "trl-lib/tldr-preference", "strategy.name": "deepspeed",
               "logger.name": "none", "model.config": {"n_layer": 3}, "optim.betas": (0.8, 0.99),
               "preferences.labeler": "judge:oracle"}
    if key == "preferences.filter":
        return "none" if value != "none" else "reward_model"
    if key in special:
        return special[key]
    if isinstance(value, bool):
        return not value
    if isinstance(value, int):
        return value + 1
    if isinstance(value, float):
        return value / 2 + 0.01
    if isinstance(value, str):
        return value + "x"
    if value is None:
        return 3 if key.endswith(("max_pairs", "num_texts", "max_train_reviews", "threads", "lora.r")) else "x"
    if isinstance(value, (list, tuple)):
        return type(value)(list(value) + [1])
    if isinstance(value, dict):
        return {**value, "extra": 1}
    raise AssertionError(f"no mutation for {key}={value!r}")


def with_value(cfg: RunConfig, key: str, value: Any) -> RunConfig:
    *path, name = key.split(".")
    cfg = dataclasses.replace(cfg)
    node = cfg
    for part in path:   # copy each level so the base config stays untouched
        child = dataclasses.replace(getattr(node, part))
        setattr(node, part, child)
        node = child
    setattr(node, name, value)
    return cfg


@pytest.mark.parametrize("overrides", [["algo=dpo"], ["algo=kto"], ["algo=ppo"], ["algo=ppo_gt"], ["algo=best_of_n"],
                                       ["algo=dpo", "data.source=trl-lib/ultrafeedback_binarized"],
                                       ["algo=dpo", "preferences.labeler=reward_model",
                                        "preferences.filter=reward_model"]])
def test_every_config_key_changes_exactly_the_stage_keys_it_is_declared_to(overrides):
    base = compose_run_config(overrides)
    base_keys = stage_keys(base)
    assert set(base_keys) == ALL(base) | {"reference_logps"} | with_pair_stages(base, {"preferences"})
    wrong = {}
    for key, value in leaves(base):
        if key in STRUCTURAL:
            continue
        expected = declared(key, base)
        new_keys = stage_keys(with_value(base, key, changed_value(key, value)))
        # a stage the change switches on or off is a changed stage
        changed = {s for s in new_keys.keys() | base_keys.keys() if new_keys.get(s) != base_keys.get(s)}
        if changed != expected:
            wrong[key] = f"changes {sorted(changed)}, declared {sorted(expected)}"
    assert not wrong, "stage keys and declared inputs disagree:\n" + "\n".join(f"  {k}: {v}" for k, v in wrong.items())


def test_a_user_dataset_file_that_changes_gets_a_new_reference_table_key(tmp_path):
    import os

    path = tmp_path / "pairs.jsonl"
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "c"}\n')
    cfg = compose_run_config([f"data.source={path}"])
    before = stage_keys(cfg)["reference_logps"]
    path.write_text('{"prompt": "a", "chosen": "b", "rejected": "d"}\n')
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 1_000_000))
    assert stage_keys(cfg)["reference_logps"] != before
