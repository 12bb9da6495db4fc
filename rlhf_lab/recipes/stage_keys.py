"""The cache key of every stage a run's configuration names, computed from the configuration alone (nothing is
built or loaded beyond the IMDb data's fingerprint): what `tests/test_stage_keys.py` walks the config schema
against, so a config key that changes a stage's output cannot be left out of its key unnoticed.

The keys come from the same builders the stages use (`recipes.stages.*_key`), chained in the order the recipes
chain the stages: task → SFT (or the base model) → preferences → reference log-probs (DPO family) and reward
model (PPO); with preferences.labeler / preferences.filter set, relabel and filter between the pairs and the
reference log-probs.
"""
from __future__ import annotations

from dataclasses import asdict
from pathlib import Path

from rlhf_lab.config import RunConfig
from rlhf_lab.data.tokenize import TruncationConfig
from rlhf_lab.recipes import stages
from rlhf_lab.recipes.label_stages import pair_stage_keys
from rlhf_lab.recipes.pair_labels import labels_apply
from rlhf_lab.utils.cache import stable_hash


def source_data_key(source: str, split: str) -> str:
    """A user dataset's identity: a local file by its resolved path, size and modification time (an edited file
    is a new dataset), a hub dataset by name and split."""
    path = Path(source).expanduser()
    if path.is_file():
        stat = path.stat()
        return stable_hash({"source": str(path.resolve()), "bytes": stat.st_size, "mtime_ns": stat.st_mtime_ns})
    return stable_hash({"source": source, "split": split})


def base_model_key(name_or_path: str) -> str:
    return stable_hash({"model": name_or_path})


def stage_keys(cfg: RunConfig) -> dict[str, str]:
    """{stage name: key hash} for task, sft, preferences, reference_logps and reward_model (and relabel / filter
    when the preference config switches them on), whichever of them the run will actually use (the hashes name the directories under `<cache_dir>/<stage>/`)."""
    from rlhf_lab.data.tasks.imdb import ImdbTaskConfig, task_hashes
    from rlhf_lab.recipes.dpo import stage_training

    training = stage_training(cfg)
    task_fields = {k: v for k, v in asdict(cfg.task).items() if k != "name"}
    task = task_hashes(ImdbTaskConfig(**task_fields, gold=cfg.reward.gold))
    keys = {"task": task["task"]}
    if cfg.model.sft:
        keys["sft"] = stable_hash(stages.sft_key(task["tokenizer"], cfg.model, cfg.sft, cfg.task.seed,
                                                 training.key(cfg.optim.max_grad_norm)))
    else:
        keys["sft"] = base_model_key(cfg.model.name_or_path)
    keys["preferences"] = stable_hash(stages.preference_key(task["task"], keys["sft"], cfg.preferences,
                                                            cfg.reward.gold, cfg.task.seed))
    trunc = TruncationConfig(cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.data.truncation)
    keys["reward_model"] = stable_hash(stages.reward_model_key(keys["sft"], keys["preferences"], cfg.reward_model,
                                                               trunc, cfg.task.seed,
                                                               training.key(cfg.reward_model.max_grad_norm)))
    data_key = keys["preferences"] if cfg.data.source is None else source_data_key(cfg.data.source, cfg.data.split)
    if labels_apply(cfg.preferences, cfg.data.source):   # relabel / filter sit between the pairs and the table
        for name, key_obj in pair_stage_keys(cfg.preferences, keys["preferences"], keys["reward_model"]).items():
            keys[name] = data_key = stable_hash(key_obj)
    keys["reference_logps"] = stable_hash(stages.reference_logps_key(keys["sft"], data_key, trunc))
    return keys
