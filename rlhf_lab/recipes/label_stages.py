"""The cached stages between the generated pairs and the DPO family's reference table, when the pairs are not
trained on as the gold reward labelled them (recipes/pair_labels.py says what each does):

    preferences (gold labels) ─┬─> reward model (trained on the gold pairs: the same stage PPO uses)
                               └─> relabel (preferences.labeler) ─> filter (preferences.filter) ─> reference log-probs

Each is content-addressed like every stage: `relabel` by its input pairs' key, the labeller spec and what decides
its verdicts (the judge preset's settings, or the reward model's key); `filter` by its input pairs' key, the
margin and the reward model's key. With the defaults (labeler=gold, filter=none) neither runs and every existing
key is unchanged. The reward model always trains on the gold-labelled pairs, so PPO's reward model and the one
that relabels or filters are one cached stage.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Callable, Optional

import torch

from rlhf_lab.data.formats import load_preference_records, write_pairs_jsonl
from rlhf_lab.recipes import stages
from rlhf_lab.recipes.pair_labels import filter_records, labels_apply, relabel_records, uses_reward_model
from rlhf_lab.rewards.annotators import PairLabels
from rlhf_lab.utils.cache import stable_hash
from rlhf_lab.utils.errors import DataError
from rlhf_lab.utils.progress import track

log = logging.getLogger(__name__)

LABEL_CHUNK = 512            # pairs per annotator call (progress is reported per chunk)
# judge settings that decide how fast or where it runs, not its verdicts: left out of the relabel key
OPERATIONAL_JUDGE_KEYS = ("name", "device", "threads", "batch_size", "concurrency", "timeout", "max_retries",
                          "backoff_base", "backoff_max", "api_key_env", "api_key_file", "api_key_required",
                          "price_per_1k_prompt", "price_per_1k_completion")


# ------------------------------------------------------------------------------------------------ keys
def judge_key(preset: str) -> dict:
    from rlhf_lab.judges.config import judge_config_dict, load_judge_preset

    settings = judge_config_dict(load_judge_preset(preset))
    return {k: v for k, v in settings.items() if k not in OPERATIONAL_JUDGE_KEYS}


def relabel_key(pairs_key: str, labeler: str, reward_model_key: Optional[str]) -> dict:
    key = {"pairs": pairs_key, "labeler": labeler}
    if labeler.startswith("judge:"):
        key["judge"] = judge_key(labeler.partition(":")[2])
    if labeler == "reward_model":
        key["reward_model"] = reward_model_key
    return key


def filter_key(pairs_key: str, kind: str, margin: float, reward_model_key: Optional[str]) -> dict:
    return {"pairs": pairs_key, "filter": kind, "margin": float(margin), "reward_model": reward_model_key}


def pair_stage_keys(prefs, prefs_key: str, reward_model_key: Optional[str]) -> dict[str, dict]:
    """{stage name: key object} of the relabel and filter stages the preference config switches on, in build
    order (each keyed by the previous one's hash): what the stages use and recipes/stage_keys.py reports."""
    out, pairs_key = {}, prefs_key
    if prefs.labeler != "gold":
        out["relabel"] = relabel_key(pairs_key, prefs.labeler, reward_model_key)
        pairs_key = stable_hash(out["relabel"])
    if prefs.filter != "none":
        out["filter"] = filter_key(pairs_key, prefs.filter, prefs.filter_margin, reward_model_key)
    return out


# ------------------------------------------------------------------------------------------------ stages
def label_in_chunks(annotator, records: list[dict]) -> PairLabels:
    """The annotator's verdicts on every row, first = the row's chosen, second = its rejected."""
    parts = []
    starts = range(0, len(records), LABEL_CHUNK)
    for start in track(starts, "relabel: labelling pairs", len(starts), "chunk"):
        rows = records[start:start + LABEL_CHUNK]
        parts.append(annotator.label([r["prompt"] for r in rows], [r["chosen"] for r in rows],
                                     [r["rejected"] for r in rows]))
    if not parts:
        empty = torch.zeros(0, dtype=torch.bool)
        return PairLabels(empty, empty, 0, 0)
    return PairLabels(torch.cat([p.first_wins for p in parts]), torch.cat([p.decided for p in parts]),
                      sum(p.ties for p in parts), sum(p.invalid for p in parts))


def relabel_stage(cache_dir: Path, key_obj: dict, pairs_path: Path, make_annotator: Callable[[], object],
                  extra_info: Callable[[], dict]) -> stages.StageOutput:
    """pairs.jsonl as the annotator decided (undecided pairs dropped) and labels_info.json (counts, agreement
    with the gold reward). `make_annotator` is called only when the stage is built."""
    def build(out: Path) -> None:
        records, name = load_preference_records(str(pairs_path))
        annotator = make_annotator()
        try:
            labels = label_in_chunks(annotator, records)
        finally:
            judge = getattr(annotator, "judge", None)
            if judge is not None:
                judge.close()
        rows, info = relabel_records(records, labels)
        if not rows:
            raise DataError(f"preferences.labeler={key_obj['labeler']}: decided none of the {len(records)} pairs "
                            f"in {name} (ties {labels.ties}, invalid {labels.invalid}); nothing to train on")
        write_pairs_jsonl(out / "pairs.jsonl", rows)
        info = {"labeler": key_obj["labeler"], "annotator": annotator.name, **extra_info(), **info}
        (out / "labels_info.json").write_text(json.dumps(info, indent=2))
        log.info("relabel by %s: %d of %d pairs kept, %d flipped; agreement with gold %s", annotator.name,
                 info["pairs_out"], info["pairs_in"], info["flipped"], info["agreement_with_gold"]["all"]["rate"])

    return stages.cached_stage(cache_dir, "relabel", key_obj, build)


def filter_stage(cache_dir: Path, key_obj: dict, pairs_path: Path,
                 make_reward: Callable[[], object]) -> stages.StageOutput:
    """pairs.jsonl with only the pairs the reward model prefers by more than the margin, and filter_info.json."""
    def build(out: Path) -> None:
        records, name = load_preference_records(str(pairs_path))
        reward = make_reward()
        prompts = [r["prompt"] for r in records]
        margin = (reward.score(prompts, [r["chosen"] for r in records], None)
                  - reward.score(prompts, [r["rejected"] for r in records], None))
        rows, info = filter_records(records, margin, key_obj["margin"])
        if not rows:
            raise DataError(f"preferences.filter_margin={key_obj['margin']:g}: the reward model keeps none of the "
                            f"{len(records)} pairs in {name}; lower the margin")
        write_pairs_jsonl(out / "pairs.jsonl", rows)
        (out / "filter_info.json").write_text(json.dumps(info, indent=2))
        log.info("filter by the reward model (margin %g): %d of %d pairs kept", key_obj["margin"],
                 info["pairs_out"], info["pairs_in"])

    return stages.cached_stage(cache_dir, "filter", key_obj, build)


# ------------------------------------------------------------------------------------------------ wiring
def load_reward_source(rm_dir: Path, device: torch.device):
    """The reward model stage's model as a text scorer, with its stored gain/bias (margins in the units PPO
    optimises: mean 0, std 1 on SFT samples; raw scores when reward_model.normalization_samples = 0)."""
    from rlhf_lab.models.build import freeze, load_tokenizer
    from rlhf_lab.models.heads import load_scalar_model
    from rlhf_lab.rewards.source import LearnedRewardSource

    model, normalization = load_scalar_model(rm_dir)
    tokenizer = load_tokenizer(rm_dir)
    return LearnedRewardSource(freeze(model).to(device), tokenizer, tokenizer, normalization, device)


def make_annotator(cfg, gold, rm_dir: Optional[Path], device: torch.device):
    """The annotator `preferences.labeler` names. A judge other than the oracle keeps its verdicts in a verdict
    cache beside the stage, so a killed relabelling resumes without paying for the verdicts it already has."""
    from rlhf_lab.rewards.annotators import build_annotator

    spec = cfg.preferences.labeler
    if spec == "reward_model":
        return build_annotator(spec, gold=gold, reward_model=load_reward_source(rm_dir, device))
    from rlhf_lab.judges.cache import VerdictCache
    from rlhf_lab.judges.config import load_judge_preset

    oracle = load_judge_preset(spec.partition(":")[2]).kind == "oracle"   # cheap: recomputed, never cached
    cache = None if oracle else VerdictCache(Path(cfg.cache_dir) / "relabel" / "verdicts.sqlite")
    return build_annotator(spec, gold=gold, judge_cache=cache)


def labeller_facts(spec: str, rm_dir: Optional[Path]) -> dict:
    """What the labels info records about the labeller beyond its verdicts: a reward model labels the pairs it
    was trained on (in-sample), so its own held-out accuracy is kept beside the agreement."""
    if spec != "reward_model":
        return {}
    rm_info = json.loads((Path(rm_dir) / "rm_info.json").read_text())
    return {"in_sample": True, "reward_model_eval_accuracy": rm_info.get("eval_accuracy"),
            "reward_model_train_accuracy": rm_info.get("train_accuracy")}


def labelled_pairs(cfg, task, prefs: stages.StageOutput, sft_key: str, sft_dir: Path, device: torch.device,
                   used: list) -> tuple[stages.StageOutput, dict]:
    """The stage whose pairs.jsonl the DPO family trains on (the generated pairs, relabelled and/or filtered as
    configured; stages it builds are appended to `used`) and what summary.json records of it."""
    from rlhf_lab.data.tokenize import TruncationConfig
    from rlhf_lab.recipes.dpo import stage_training

    p = cfg.preferences
    if not labels_apply(p, cfg.data.source):
        return prefs, {}
    cache, rm = Path(cfg.cache_dir), None
    if uses_reward_model(p, cfg.data.source):
        trunc = TruncationConfig(cfg.data.max_prompt_length, cfg.data.max_completion_length, cfg.data.truncation)
        rm = stages.reward_model_stage(cache, sft_key, sft_dir, prefs.key, prefs.dir / "pairs.jsonl",
                                       cfg.reward_model, trunc, cfg.task.seed, device, stage_training(cfg))
        used.append(rm)
    keys = pair_stage_keys(p, prefs.key, rm.key if rm else None)
    current, summary = prefs, {"labeler": p.labeler}     # + each stage's info, under the stage's name
    if "relabel" in keys:
        rm_dir = rm.dir if rm else None
        current = relabel_stage(cache, keys["relabel"], current.dir / "pairs.jsonl",
                                lambda: make_annotator(cfg, task.gold, rm_dir, device),
                                lambda: labeller_facts(p.labeler, rm_dir))
        used.append(current)
        summary["relabel"] = json.loads((current.dir / "labels_info.json").read_text())
    if "filter" in keys:
        current = filter_stage(cache, keys["filter"], current.dir / "pairs.jsonl",
                               lambda: load_reward_source(rm.dir, device))
        used.append(current)
        summary["filter"] = {**json.loads((current.dir / "filter_info.json").read_text()),
                             "margin_units": "normalised" if (rm.dir / "reward_normalization.json").exists()
                             else "raw"}
    return current, summary
