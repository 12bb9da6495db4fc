"""Shared stages, each built once into the content-addressed cache and reused by every run that needs it.

    task assets (tokenizer, prompts, gold reward) ─> SFT model ─> preference pairs ─> reference log-probs

A stage's directory is `<cache_dir>/<stage>/<hash of the config that determines it>`; it is built under a file
lock (concurrent jobs wait instead of duplicating work) inside `atomic_dir` (a killed build leaves nothing
that looks complete). Functions here take only the config groups they need.
"""
from __future__ import annotations

import json
import logging
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf_lab.config import ModelConfig, PreferenceGenConfig, SFTConfig, TaskConfig
from rlhf_lab.data.batches import TokenizedPair
from rlhf_lab.data.collate import collate_pairs
from rlhf_lab.data.tokenize import TruncationConfig
from rlhf_lab.models.build import build_causal_lm, load_causal_lm, load_tokenizer
from rlhf_lab.models.logprobs import sequence_logps
from rlhf_lab.utils.cache import COMPLETE_MARKER, atomic_dir, is_complete, stable_hash
from rlhf_lab.utils.lock import file_lock

log = logging.getLogger(__name__)


@dataclass
class StageOutput:
    name: str
    key: str
    dir: Path
    built: bool            # False when reused from the cache
    seconds: float         # build (or lookup) wall time


def cached_stage(cache_dir: Path, stage: str, key_obj: dict, build: Callable[[Path], None]) -> StageOutput:
    """Return the stage's directory, building it with `build(tmp_dir)` if no complete copy exists."""
    key = stable_hash(key_obj)
    final = Path(cache_dir) / stage / key
    started = time.time()
    if is_complete(final):
        return StageOutput(stage, key, final, False, time.time() - started)
    with file_lock(Path(cache_dir) / stage / f".{key}.lock"):
        if not is_complete(final):  # another process may have finished it while we waited
            log.info("building stage %s (%s)", stage, key)
            with atomic_dir(final) as tmp:
                (tmp / "key.json").write_text(json.dumps(key_obj, indent=2, sort_keys=True, default=str))
                build(tmp)
            return StageOutput(stage, key, final, True, time.time() - started)
    return StageOutput(stage, key, final, False, time.time() - started)


# ---------------------------------------------------------------------------------------------------- task
def build_task(task_cfg: TaskConfig, gold_name: str, cache_dir: Path):
    """The embedded IMDb task (tokenizer, splits, prompts, gold reward); cached by the task module itself (which
    publishes each artefact atomically). The lock makes concurrent jobs wait for one build instead of racing."""
    return task_stage(task_cfg, gold_name, cache_dir)[0]


def task_stage(task_cfg: TaskConfig, gold_name: str, cache_dir: Path):
    """`build_task` plus a StageOutput (was it built, how long it took) for the study's stage record."""
    from rlhf_lab.data.tasks.imdb import ImdbTaskConfig, build_imdb_task

    fields = {k: v for k, v in asdict(task_cfg).items() if k != "name"}
    started = time.time()
    with file_lock(Path(cache_dir) / "imdb" / ".build.lock"):
        task = build_imdb_task(ImdbTaskConfig(**fields, gold=gold_name), Path(cache_dir))
    # the task directory is published last, after its tokenizer and gold reward: a fresh marker means a build
    built = (task.dir / COMPLETE_MARKER).stat().st_mtime >= started
    return task, StageOutput("task", task.key, task.dir, built, time.time() - started)


# ---------------------------------------------------------------------------------------------------- SFT
def sft_stage(cache_dir: Path, task, task_key: str, model_cfg: ModelConfig, sft_cfg: SFTConfig, seed: int,
              strategy_factory) -> StageOutput:
    """Fine-tune the base model on the task's train text; HF checkpoint + tokenizer in the stage directory."""
    from rlhf_lab.trainers.sft import train_sft

    # task_key: the tokenizer's key, which fixes the train texts and their tokenisation (not the prompt counts)
    key = {"task": task_key, "model": asdict(model_cfg), "sft": asdict(sft_cfg), "seed": seed}

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(task.tokenizer_path)
        model = build_causal_lm(model_cfg, tokenizer, seed)
        strategy = strategy_factory()
        history = []
        loss = train_sft(model, tokenizer, task.train_texts, sft_cfg, strategy, seed,
                         log_fn=lambda m, s: history.append({"step": s, **m}))
        strategy.save_model(out, tokenizer)
        (out / "sft_history.json").write_text(json.dumps({"final_loss": loss, "history": history}, indent=2))

    return cached_stage(cache_dir, "sft", key, build)


# ---------------------------------------------------------------------------------------------------- prefs
def preference_stage(cache_dir: Path, task, model_key: str, model_dir: Path, gen_cfg: PreferenceGenConfig,
                     gold_name: str, seed: int, device: torch.device) -> StageOutput:
    """Sample k completions per train prefix from the SFT model and label every pair with the gold reward."""
    from rlhf_lab.study.prefgen import generate_preferences

    key = {"model": model_key, "gen": asdict(gen_cfg), "gold": gold_name, "seed": seed}

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir).to(device)
        info = generate_preferences(model, tokenizer, task.train_prompts, task.gold, gen_cfg, seed,
                                    out / "pairs.jsonl")
        (out / "prefs_info.json").write_text(json.dumps(info, indent=2))

    return cached_stage(cache_dir, "preferences", key, build)


# ---------------------------------------------------------------------------------------------------- ref
def reference_logps_stage(cache_dir: Path, reference_key: str, reference_dir: Path, data_key: str,
                          pairs: list[TokenizedPair], num_rows: int, pad_id: int, trunc: TruncationConfig,
                          device: torch.device, batch_size: int = 64) -> tuple[StageOutput, torch.Tensor]:
    """Σ log π_ref over completion tokens for every pair, computed once per (reference, dataset, tokenisation).

    Returns a (num_rows, 2) float32 table [chosen, rejected] indexed by the dataset row (NaN for skipped rows),
    shared by every run of a β sweep. Temperature 1: the DPO family scores the untempered reference.
    """
    key = {"reference": reference_key, "data": data_key, "tokenization": asdict(trunc), "temperature": 1.0}

    def build(out: Path) -> None:
        reference = load_causal_lm(reference_dir).to(device).eval()
        table = torch.full((num_rows, 2), float("nan"))
        with torch.no_grad():
            for start in range(0, len(pairs), batch_size):
                chunk = pairs[start:start + batch_size]
                batch = collate_pairs(chunk, pad_id).to(device)
                logps = sequence_logps(reference, batch.sequences).float().cpu()
                n = len(chunk)
                table[batch.indices.cpu(), 0] = logps[:n]
                table[batch.indices.cpu(), 1] = logps[n:]
        torch.save(table, out / "reference_logps.pt")

    stage = cached_stage(cache_dir, "reference_logps", key, build)
    return stage, torch.load(stage.dir / "reference_logps.pt")


# ---------------------------------------------------------------------------------------------------- RM
def reward_model_stage(cache_dir: Path, sft_key: str, sft_dir: Path, prefs_key: str, pairs_path: Path, rm_cfg,
                       trunc: TruncationConfig, seed: int, device: torch.device, strategy_factory) -> StageOutput:
    """Bradley–Terry reward model on the preference pairs, initialised from the SFT checkpoint (new head, PPO
    detail 9), with a gain/bias fitted on SFT samples (detail 6).

    The directory holds an HF sequence-classification checkpoint + tokenizer (`models.heads.load_scalar_model`),
    `reward_normalization.json` (absent when rm_cfg.normalization_samples = 0) and `rm_info.json` (accuracies,
    steps, pair counts, skip reports, training history). Held-out pairs: whole prompts, split by `seed`.
    """
    from rlhf_lab.data.formats import load_preference_records, parse_pairs
    from rlhf_lab.data.tokenize import tokenize_pairs
    from rlhf_lab.models.heads import build_scalar_model, save_scalar_model
    from rlhf_lab.models.sampling import sample_completions
    from rlhf_lab.trainers.reward_model import (
        fit_normalization,
        margins_from_records,
        split_pairs_by_prompt,
        train_reward_model,
        validate_reward_config,
    )

    validate_reward_config(rm_cfg)
    key = {"sft": sft_key, "prefs": prefs_key, "rm": asdict(rm_cfg), "tokenization": asdict(trunc), "seed": seed}

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(sft_dir)
        # = load_preference_pairs, keeping the raw records for the gold-score margins
        records, name = load_preference_records(str(pairs_path))
        pairs, report = parse_pairs(records, name, tokenizer)
        tokenized, tok_report = tokenize_pairs(pairs, tokenizer, trunc, source=name)
        log.info("%s", report.summary())
        log.info("%s", tok_report.summary())
        margins = margins_from_records(records) if rm_cfg.use_margin else None
        train_pairs, eval_pairs = split_pairs_by_prompt(tokenized, rm_cfg.eval_fraction, seed)

        strategy = strategy_factory()
        model = build_scalar_model(sft_dir, pad_token_id=tokenizer.pad_token_id, seed=seed)
        metrics = train_reward_model(model, tokenizer, train_pairs, eval_pairs, rm_cfg, strategy, seed, margins)
        reward_model = strategy.unwrap().eval()

        normalization = None
        if rm_cfg.normalization_samples > 0:
            generator = torch.Generator().manual_seed(seed)
            prompts = list(dict.fromkeys(tuple(p.prompt_ids) for p in train_pairs))   # distinct, in data order
            order = torch.randperm(len(prompts), generator=generator).tolist()
            chosen = [list(prompts[order[i % len(order)]]) for i in range(rm_cfg.normalization_samples)]
            sft = load_causal_lm(sft_dir).to(device).eval()
            samples = sample_completions(sft, chosen, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                         max_new_tokens=trunc.max_completion_length, temperature=1.0,
                                         generator=generator)
            del sft
            normalization = fit_normalization(
                reward_model, samples,
                fitted_on=f"{len(samples)} SFT samples (temperature 1, ≤{trunc.max_completion_length} tokens) on "
                          f"{min(len(prompts), len(samples))} train-pair prompts")
        if strategy.is_main:
            save_scalar_model(reward_model, tokenizer, out, normalization)
            info = {**metrics, "total_pairs": len(tokenized), "normalization": normalization,
                    "parse_report": report.summary(), "tokenize_report": tok_report.summary()}
            (out / "rm_info.json").write_text(json.dumps(info, indent=2, default=str))
        strategy.barrier()

    return cached_stage(cache_dir, "reward_model", key, build)
