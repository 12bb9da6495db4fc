"""Shared stages, each built once into the content-addressed cache and reused by every run that needs it.

    task assets (tokenizer, prompts, gold reward) ─> SFT model ─> preference pairs ─> reference log-probs

A stage's directory is `<cache_dir>/<stage>/<hash of the config that determines it>`; it is built under a file
lock (concurrent jobs wait instead of duplicating work) inside `atomic_dir` (a killed build leaves nothing
that looks complete). A published stage whose files no longer match its manifest, or whose key.json does not hash
to its name, is moved aside and rebuilt on use (`utils.cache.reusable`). Functions here take only the config
groups they need.
"""
from __future__ import annotations

import contextlib
import json
import logging
import shutil
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

import torch

from rlhf_lab.config import LABEL_KEYS, ModelConfig, OptimConfig, PreferenceGenConfig, SFTConfig, TaskConfig
from rlhf_lab.data.batches import TokenizedUnpaired
from rlhf_lab.data.collate import collate_pairs, collate_sequences
from rlhf_lab.data.tokenize import TruncationConfig
from rlhf_lab.distributed import comm
from rlhf_lab.models.build import build_causal_lm, load_causal_lm, load_tokenizer
from rlhf_lab.models.logprobs import sequence_logps
from rlhf_lab.utils.cache import COMPLETE_MARKER, atomic_dir, is_intact, load_state_file, reusable, stable_hash
from rlhf_lab.utils.lock import file_lock
from rlhf_lab.utils.progress import reporting_to, track

log = logging.getLogger(__name__)


@dataclass
class StageOutput:
    name: str
    key: str
    dir: Path
    built: bool            # False when reused from the cache
    seconds: float         # build (or lookup) wall time


def cached_stage(cache_dir: Path, stage: str, key_obj: dict, build: Callable[[Path], None],
                 collective: bool = False) -> StageOutput:
    """Return the stage's directory, building it with `build(tmp_dir)` if no complete copy exists.

    With several processes only rank 0 takes the stage lock and decides; the ranks follow its decision, so no
    rank waits on the lock while another runs a collective. `collective=True` (SFT, reward model: data-parallel
    training) runs `build` on every rank into the same temporary directory (only rank 0 writes files);
    otherwise rank 0 builds alone while the others wait. A failure on any rank fails the stage on every rank."""
    key = stable_hash(key_obj)
    final = Path(cache_dir) / stage / key
    started = time.time()
    built = False
    if not comm.broadcast_object(is_intact(final) and _key_damage(final) is None if comm.is_main() else None):
        lock = file_lock(Path(cache_dir) / stage / f".{key}.lock") if comm.is_main() else contextlib.nullcontext()
        with lock:
            # another process may have finished it while we waited; a damaged copy is moved aside, never used
            built = comm.broadcast_object(not reusable(final, _key_damage) if comm.is_main() else None)
            if built:
                log.info("building stage %s (%s)", stage, key)
                progress_file = stage_progress_file(cache_dir, stage, key)
                with reporting_to(progress_file):
                    _build_published(final, key_obj, build, collective)
                if comm.is_main():
                    progress_file.unlink(missing_ok=True)
    return StageOutput(stage, key, final, built, time.time() - started)


def _key_damage(stage_dir: Path) -> str | None:
    """A stage directory's key.json must hash to its name (the key it is looked up by)."""
    try:
        key = stable_hash(json.loads((stage_dir / "key.json").read_text()))
    except (OSError, ValueError):
        return "key.json is missing or unreadable"
    return None if key == stage_dir.name else f"key.json hashes to {key}, not to the directory's name"


def _build_published(final: Path, key_obj: dict, build: Callable[[Path], None], collective: bool) -> None:
    if comm.is_main():
        with atomic_dir(final) as tmp:
            (tmp / "key.json").write_text(json.dumps(key_obj, indent=2, sort_keys=True, default=str))
            comm.broadcast_object(str(tmp))
            _build_on_ranks(build, tmp, run=True)
    else:
        tmp = Path(comm.broadcast_object(None))
        _build_on_ranks(build, tmp, run=collective)
    comm.barrier()  # published before any rank reads it


def _build_on_ranks(build: Callable[[Path], None], tmp: Path, run: bool) -> None:
    error = None
    if run:
        try:
            build(tmp)
        except Exception as e:  # re-raised below, after every rank has heard of it
            error = e
    messages = comm.all_gather_object(None if error is None else f"{type(error).__name__}: {error}")
    if error is not None:
        raise error
    failed = [(r, m) for r, m in enumerate(messages) if m]
    if failed:
        raise RuntimeError(f"building the stage failed on rank {failed[0][0]}: {failed[0][1]}")


def stage_progress_file(cache_dir: Path, stage: str, key: str) -> Path:
    """Where a stage being built reports its progress (beside its lock; read by `rlhf-lab status`)."""
    return Path(cache_dir) / stage / f".{key}.progress.json"


def stage_checkpoints(cache_dir: Path, stage: str, key_obj: dict) -> Path:
    """Where a training stage keeps its checkpoints while it builds: beside the stage, outside its temporary
    directory (which a failed build removes), so a killed or preempted build resumes where it stopped."""
    return Path(cache_dir) / stage / f".{stable_hash(key_obj)}.checkpoints"


def drop_stage_checkpoints(stage: StageOutput, cache_dir: Path) -> StageOutput:
    if comm.is_main():
        shutil.rmtree(Path(cache_dir) / stage.name / f".{stage.key}.checkpoints", ignore_errors=True)
    return stage


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
@dataclass
class StageTraining:
    """How a stage that trains (SFT, reward model) builds its optimizer and strategy. Everything here that can
    change the trained weights enters the stage key (the strategy itself does not: any world size and ZeRO stage
    trains the same model up to reduction order)."""

    optim: OptimConfig                  # optimizer name and betas (lr, weight decay, warm-up: the stage's group)
    precision: str                      # train.precision: the same autocast as the run
    strategy_factory: Callable[..., object]  # (grad_accum, max_grad_norm, micro_batch_size) -> Strategy
    checkpoint_every: int = 50          # steps between the stage's own checkpoints (a killed build resumes)

    def key(self, max_grad_norm: float | None) -> dict:
        return {"optim": self.optim.name, "betas": list(self.optim.betas), "precision": self.precision,
                "max_grad_norm": max_grad_norm}


# The key builders: every input that changes a stage's output (tests/test_stage_keys.py walks the config schema
# against the table in recipes/stage_keys.py). Upstream stages enter through their hashes.
def sft_key(tokenizer_key: str, model_cfg: ModelConfig, sft_cfg: SFTConfig, seed: int, training_key: dict) -> dict:
    # trust_remote_code permits loading the model; it does not change what SFT produces
    model = {k: v for k, v in asdict(model_cfg).items() if k != "trust_remote_code"}
    return {"task": tokenizer_key, "model": model, "sft": asdict(sft_cfg), "seed": seed, "training": training_key}


def preference_key(task_key: str, model_key: str, gen_cfg: PreferenceGenConfig, gold_name: str, seed: int) -> dict:
    # task_key: the full task (its train prompts are what is sampled), not only the tokenizer the model was built on;
    # who relabels or filters the pairs afterwards is keyed by those stages (recipes/label_stages.py), not here
    gen = {k: v for k, v in asdict(gen_cfg).items() if k not in LABEL_KEYS}
    return {"task": task_key, "model": model_key, "gen": gen, "gold": gold_name, "seed": seed}


def reference_logps_key(reference_key: str, data_key: str, trunc: TruncationConfig, unpaired: bool = False) -> dict:
    return {"reference": reference_key, "data": data_key, "tokenization": asdict(trunc), "temperature": 1.0,
            **({"layout": "unpaired"} if unpaired else {})}


def reward_model_key(sft_key_hash: str, prefs_key: str, rm_cfg, trunc: TruncationConfig, seed: int,
                     training_key: dict) -> dict:
    return {"sft": sft_key_hash, "prefs": prefs_key, "rm": asdict(rm_cfg), "tokenization": asdict(trunc),
            "seed": seed, "training": training_key}


def sft_stage(cache_dir: Path, task, task_key: str, model_cfg: ModelConfig, sft_cfg: SFTConfig, seed: int,
              training: StageTraining) -> StageOutput:
    """Fine-tune the base model on the task's train text (data-parallel over all ranks); HF checkpoint +
    tokenizer in the stage directory."""
    from rlhf_lab.trainers.loop import micro_batch_for
    from rlhf_lab.trainers.sft import train_sft

    # task_key: the tokenizer's key, which fixes the train texts and their tokenisation (not the prompt counts);
    # SFT clips at optim.max_grad_norm
    key = sft_key(task_key, model_cfg, sft_cfg, seed, training.key(training.optim.max_grad_norm))

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(task.tokenizer_path)
        micro = micro_batch_for(sft_cfg.batch_size, 1, "sft.batch_size")
        strategy = training.strategy_factory(1, training.optim.max_grad_norm, micro)
        with strategy.loading():    # ZeRO-3: partitioned as it is built
            model = build_causal_lm(model_cfg, tokenizer, seed)
        history = []
        loss = train_sft(model, tokenizer, task.train_texts, sft_cfg, strategy, seed, training.optim,
                         log_fn=lambda m, s: history.append({"step": s, **m}),
                         checkpoint_dir=stage_checkpoints(cache_dir, "sft", key),
                         checkpoint_every=training.checkpoint_every, config_hash=stable_hash(key))
        strategy.save_hf(out, tokenizer)
        if comm.is_main():
            (out / "sft_history.json").write_text(json.dumps({"final_loss": loss, "history": history}, indent=2))

    return drop_stage_checkpoints(cached_stage(cache_dir, "sft", key, build, collective=True), cache_dir)


# ---------------------------------------------------------------------------------------------------- prefs
def preference_stage(cache_dir: Path, task, model_key: str, model_dir: Path, gen_cfg: PreferenceGenConfig,
                     gold_name: str, seed: int, device: torch.device) -> StageOutput:
    """Sample k completions per train prefix from the SFT model and label every pair with the gold reward."""
    from rlhf_lab.recipes.prefgen import generate_preferences

    key = preference_key(task.key, model_key, gen_cfg, gold_name, seed)

    def build(out: Path) -> None:
        tokenizer = load_tokenizer(model_dir)
        model = load_causal_lm(model_dir).to(device)
        info = generate_preferences(model, tokenizer, task.train_prompts, task.gold, gen_cfg, seed,
                                    out / "pairs.jsonl")
        (out / "prefs_info.json").write_text(json.dumps(info, indent=2))

    return cached_stage(cache_dir, "preferences", key, build)


# ---------------------------------------------------------------------------------------------------- ref
def reference_logps_stage(cache_dir: Path, reference_key: str, reference_dir: Path, data_key: str,
                          items: list, num_rows: int, pad_id: int, trunc: TruncationConfig,
                          device: torch.device, batch_size: int = 64) -> tuple[StageOutput, torch.Tensor]:
    """Σ log π_ref over completion tokens for every row, computed once per (reference, dataset, tokenisation).

    Pairs (TokenizedPair) give a (num_rows, 2) float32 table [chosen, rejected]; unpaired KTO rows
    (TokenizedUnpaired) a (num_rows,) table. Indexed by the dataset row (NaN for skipped rows), shared by every
    run of a β sweep. Temperature 1: the DPO family scores the untempered reference.
    """
    unpaired = bool(items) and isinstance(items[0], TokenizedUnpaired)
    key = reference_logps_key(reference_key, data_key, trunc, unpaired)

    def build(out: Path) -> None:
        reference = load_causal_lm(reference_dir).to(device).eval()
        table = torch.full((num_rows,) if unpaired else (num_rows, 2), float("nan"))
        starts = range(0, len(items), batch_size)
        with torch.no_grad():
            for start in track(starts, "reference log-probs", len(starts), "batch"):
                chunk = items[start:start + batch_size]
                if unpaired:
                    rows = torch.tensor([it.index for it in chunk])
                    seqs = collate_sequences([it.prompt_ids for it in chunk], [it.completion_ids for it in chunk],
                                             pad_id)
                    table[rows] = sequence_logps(reference, seqs.to(device)).float().cpu()
                    continue
                batch = collate_pairs(chunk, pad_id).to(device)
                logps = sequence_logps(reference, batch.sequences).float().cpu()
                n = len(chunk)
                table[batch.indices.cpu(), 0] = logps[:n]
                table[batch.indices.cpu(), 1] = logps[n:]
        torch.save(table, out / "reference_logps.pt")

    stage = cached_stage(cache_dir, "reference_logps", key, build)
    return stage, load_state_file(stage.dir / "reference_logps.pt")


# ---------------------------------------------------------------------------------------------------- RM
def reward_model_stage(cache_dir: Path, sft_key: str, sft_dir: Path, prefs_key: str, pairs_path: Path, rm_cfg,
                       trunc: TruncationConfig, seed: int, device: torch.device,
                       training: StageTraining) -> StageOutput:
    """Bradley–Terry reward model on the preference pairs, initialised from the SFT checkpoint (new head, PPO
    detail 9), with a gain/bias fitted on SFT samples (detail 6).

    The directory holds an HF sequence-classification checkpoint + tokenizer (`models.heads.load_scalar_model`),
    `reward_normalization.json` (absent when rm_cfg.normalization_samples = 0) and `rm_info.json` (accuracies,
    steps, pair counts, skip reports, training history). Held-out pairs: whole prompts, split by `seed`.
    """
    from rlhf_lab.data.formats import load_preference_records, parse_pairs
    from rlhf_lab.data.tokenize import tokenize_pairs
    from rlhf_lab.models.heads import build_scalar_model
    from rlhf_lab.trainers.loop import micro_batch_for
    from rlhf_lab.trainers.reward_model import (
        margins_from_records,
        split_pairs_by_prompt,
        train_reward_model,
        validate_reward_config,
    )

    validate_reward_config(rm_cfg)
    key = reward_model_key(sft_key, prefs_key, rm_cfg, trunc, seed, training.key(rm_cfg.max_grad_norm))

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

        strategy = training.strategy_factory(1, rm_cfg.max_grad_norm,
                                             micro_batch_for(rm_cfg.batch_size, 1, "reward_model.batch_size"))
        with strategy.loading():
            model = build_scalar_model(sft_dir, pad_token_id=tokenizer.pad_token_id, seed=seed)
        metrics = train_reward_model(model, tokenizer, train_pairs, eval_pairs, rm_cfg, strategy, seed, margins,
                                     optim=training.optim,
                                     checkpoint_dir=stage_checkpoints(cache_dir, "reward_model", key),
                                     checkpoint_every=training.checkpoint_every, config_hash=stable_hash(key))
        with strategy.generation() as reward_model:   # full parameters on every rank (ZeRO-3 gathers them)
            _finish_reward_model(out, reward_model.eval(), tokenizer, train_pairs, rm_cfg, trunc, seed, device,
                                 sft_dir, {**metrics, "total_pairs": len(tokenized),
                                           "parse_report": report.summary(), "tokenize_report": tok_report.summary()})

    return drop_stage_checkpoints(cached_stage(cache_dir, "reward_model", key, build, collective=True),
                                  cache_dir)


def _finish_reward_model(out: Path, reward_model, tokenizer, train_pairs, rm_cfg, trunc: TruncationConfig, seed: int,
                         device, sft_dir: Path, info: dict) -> None:
    """Fit the gain/bias on SFT samples (every rank computes the same numbers) and write the stage (rank 0)."""
    from rlhf_lab.models.heads import save_scalar_model
    from rlhf_lab.models.sampling import sample_completions
    from rlhf_lab.trainers.reward_model import fit_normalization

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
    if comm.is_main():
        save_scalar_model(reward_model, tokenizer, out, normalization)
        (out / "rm_info.json").write_text(json.dumps({**info, "normalization": normalization}, indent=2,
                                                     default=str))
