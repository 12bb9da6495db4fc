"""Win rates of a policy against a baseline at chosen sampling temperatures (the DPO paper's Fig. 2 protocol).

For each temperature T the policy checkpoint samples one completion per held-out prompt; the baseline is either a
model sampled at the same T (the SFT model, or another policy) or fixed texts (the dataset's chosen responses).
Every judge compares the matched pairs through the SQLite verdict cache (judges/evaluate.py, as judges/study.py
does), giving one row per (temperature, judge): TEMPERATURE_COLUMNS.

Cheap reruns: samples are saved as JSON lines under `samples_dir`, one file per (side, temperature), named by a
hash of everything that decides them (checkpoint files, prompts, T, max_new_tokens, seed, batch size), so a rerun
loads them instead of sampling; with cached verdicts it then makes zero judge calls. Sampling is seeded
(torch.Generator on the CPU) and T=0 is greedy, so on CPU the same inputs give the same samples.
"""
from __future__ import annotations

import logging
import math
import re
from collections.abc import Sequence
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import pandas as pd
import torch

from rlhf_lab.eval.samples import read_samples, write_records
from rlhf_lab.judges.cache import VerdictCache
from rlhf_lab.judges.config import OracleJudgeConfig, parse_judge_configs
from rlhf_lab.judges.evaluate import build_judge, judge_pairs, win_rate_metrics
from rlhf_lab.judges.oracle import Scorer
from rlhf_lab.judges.winrate import agreement
from rlhf_lab.utils.cache import stable_hash
from rlhf_lab.utils.errors import ConfigError

log = logging.getLogger(__name__)

PAPER_TEMPERATURES = (0.0, 0.25, 0.5, 0.75, 1.0)   # DPO paper, Fig. 2 (0 = greedy)
TEMPERATURE_COLUMNS = [
    "temperature", "judge", "baseline", "n", "wins", "losses", "ties", "invalid", "win_rate", "win_rate_ci_low",
    "win_rate_ci_high", "lc_win_rate", "position_bias_rate", "agreement_with_oracle", "requests", "tokens",
    "cost_usd", "cached", "policy_len_mean", "baseline_len_mean",
]


@dataclass(frozen=True)
class SamplingConfig:
    max_new_tokens: int = 48
    batch_size: int = 32
    seed: int = 0          # the same seed at every temperature and on both sides (common random numbers)


@dataclass
class Samples:
    completions: list[str]  # (N,) completion texts, special tokens dropped
    lengths: np.ndarray     # (N,) completion tokens, EOS included


@dataclass
class Baseline:
    """What the policy is compared with: a model sampled at each temperature, or fixed texts (chosen responses)."""

    name: str                      # the `baseline` column: "sft", "chosen" or the other checkpoint's path
    model_dir: Path | None = None  # sampled at every temperature
    texts: Samples | None = None   # fixed responses, one per prompt, used at every temperature

    def __post_init__(self) -> None:
        if (self.model_dir is None) == (self.texts is None):
            raise ValueError(f"baseline {self.name!r}: give exactly one of model_dir and texts")


def check_temperatures(values, key: str = "temperatures") -> list[float]:
    """A non-empty list of distinct finite numbers >= 0; the error names `key`."""
    values = values if isinstance(values, (list, tuple)) else [values]
    ok = bool(values) and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
                              and v >= 0 for v in values)
    if not ok or len(set(values)) != len(values):
        raise ConfigError(f"{key}={values!r}: expected a list of distinct numbers >= 0, e.g. [0,0.25,0.5,0.75,1.0]"
                          " (0 = greedy)")
    return [float(v) for v in values]


def model_dir_of(path: str | Path, key: str) -> Path:
    """A Hugging Face checkpoint directory: `path` itself or a run directory's `model/`; the error names `key`."""
    path = Path(path)
    for candidate in (path / "model", path):
        if (candidate / "config.json").is_file():
            return candidate
    raise ConfigError(f"{key}={path}: no Hugging Face checkpoint there (no config.json in {path} or {path / 'model'};"
                      " a run saves one only with train.save_model=true)")


def checkpoint_fingerprint(model_dir: Path) -> str:
    """File names, sizes and modification times: a retrained checkpoint at the same path gets new samples."""
    files = sorted(f for f in Path(model_dir).iterdir() if f.is_file())
    return stable_hash([(f.name, f.stat().st_size, f.stat().st_mtime_ns) for f in files])


def samples_file(samples_dir: Path, side: str, model_dir: Path, prompts: Sequence[str], temperature: float,
                 sampling: SamplingConfig) -> Path:
    key = stable_hash({"model": str(Path(model_dir).resolve()), "files": checkpoint_fingerprint(model_dir),
                       "prompts": list(prompts), "temperature": temperature, "sampling": asdict(sampling)})
    return Path(samples_dir) / f"{side}_T{temperature:g}_{key}.jsonl"


def draw_samples(model, tokenizer, prompts: Sequence[str], temperature: float, sampling: SamplingConfig) -> Samples:
    """One seeded completion per prompt (greedy at T=0)."""
    from rlhf_lab.data.tokenize import encode_prompt
    from rlhf_lab.eval.policy_eval import split_samples
    from rlhf_lab.models.sampling import sample_completions

    seqs = sample_completions(model, [encode_prompt(tokenizer, p) for p in prompts], eos_id=tokenizer.eos_token_id,
                              pad_id=tokenizer.pad_token_id, max_new_tokens=sampling.max_new_tokens,
                              temperature=temperature, batch_size=sampling.batch_size,
                              generator=torch.Generator().manual_seed(sampling.seed))
    return Samples(split_samples(tokenizer, seqs)[1], seqs.completion_lengths.double().numpy())


def sample_model(model_dir: Path, prompts: Sequence[str], temperatures: Sequence[float], sampling: SamplingConfig,
                 samples_dir: Path, side: str) -> dict[float, Samples]:
    """Samples of `model_dir` at every temperature, read from `samples_dir` when saved by an earlier call (the model
    is loaded only if some temperature is missing); new ones are saved atomically."""
    from rlhf_lab.models.build import load_causal_lm, load_tokenizer

    out: dict[float, Samples] = {}
    model = tokenizer = None
    for t in temperatures:
        path = samples_file(samples_dir, side, model_dir, prompts, t, sampling)
        if path.is_file():
            records = read_samples(path)
            out[t] = Samples([r["completion"] for r in records], np.array([r["length"] for r in records], float))
            continue
        if model is None:
            model, tokenizer = load_causal_lm(model_dir), load_tokenizer(model_dir)
        log.info("sampling %s (%s) at T=%g on %d prompts", side, model_dir, t, len(prompts))
        out[t] = draw_samples(model, tokenizer, prompts, t, sampling)
        write_records(path, [{"index": i, "prompt": p, "completion": c, "length": int(n), "temperature": t,
                              "model": str(model_dir)}
                             for i, (p, c, n) in enumerate(zip(prompts, out[t].completions, out[t].lengths))])
    return out


def chosen_baseline(pairs: list, num_prompts: int | None, tokenizer) -> tuple[list[str], Baseline]:
    """(prompts, baseline) from preference pairs (`data.formats.PreferencePair`): the first `num_prompts` distinct
    prompts, each with the chosen response of its first pair. Lengths count the EOS a finished response ends with,
    as sampled lengths do."""
    first: dict[str, str] = {}
    for pair in pairs:
        first.setdefault(pair.prompt, pair.chosen)
    prompts = list(first)[:num_prompts]
    chosen = [first[p] for p in prompts]
    lengths = np.array([len(tokenizer(c, add_special_tokens=False)["input_ids"]) + 1 for c in chosen], float)
    return prompts, Baseline("chosen", texts=Samples(chosen, lengths))


@dataclass
class SweepPairs:
    """Matched samples per temperature: policy[t].completions[i] vs baseline[t].completions[i] on prompts[i]."""

    prompts: list[str]                # (N,)
    policy: dict[float, Samples]      # temperature → (N,) policy samples
    baseline: dict[float, Samples]    # temperature → (N,) baseline samples (the same texts for `chosen`)
    baseline_name: str


def win_rates_by_temperature(policy_dir: Path, prompts: Sequence[str], temperatures: Sequence[float],
                             baseline: Baseline, judge_cfgs: list, cache_path: Path, samples_dir: Path, *,
                             scorer: Scorer | None = None, scorer_id: str = "gold",
                             sampling: SamplingConfig = SamplingConfig(), n_boot: int = 2000, alpha: float = 0.05,
                             seed: int = 0) -> pd.DataFrame:
    """The policy at `policy_dir` vs `baseline` on `prompts` at each temperature, by every judge (module doc).

    `judge_cfgs`: judge configs (dicts or judges.config dataclasses); `scorer`: gold rewards for oracle judges
    (`scorer_id` names it in the cache key). Agreement with the oracle is measured against the first oracle judge's
    outcomes (NaN when no oracle judge is given). Returns one row per (temperature, judge) in TEMPERATURE_COLUMNS."""
    temperatures = check_temperatures(list(temperatures))
    cfgs = parse_judge_configs(judge_cfgs)
    prompts = list(prompts)
    if not prompts:
        raise ConfigError("no prompts to judge on (num_prompts=0, or an empty prompt source)")
    policy = sample_model(policy_dir, prompts, temperatures, sampling, samples_dir, "policy")
    if baseline.model_dir is not None:
        base = sample_model(baseline.model_dir, prompts, temperatures, sampling, samples_dir, "baseline")
    elif len(baseline.texts.completions) != len(prompts):
        raise ValueError(f"baseline {baseline.name!r}: {len(baseline.texts.completions)} texts for {len(prompts)} "
                         f"prompts")
    else:
        base = {t: baseline.texts for t in temperatures}
    pairs = SweepPairs(prompts, policy, base, baseline.name)
    cache = VerdictCache(cache_path)
    try:
        rows, outcomes = [], {}
        for cfg in cfgs:
            judge = build_judge(cfg, scorer=scorer, scorer_id=scorer_id)
            try:
                for t in temperatures:
                    row, outcomes[(t, cfg.name)] = _judge_temperature(judge, cfg, pairs, t, cache, n_boot, alpha,
                                                                      seed)
                    rows.append(row)
            finally:
                judge.close()
    finally:
        cache.close()
    oracle = next((c.name for c in cfgs if isinstance(c, OracleJudgeConfig)), None)
    for row in rows if oracle is not None else []:
        t = row["temperature"]
        row["agreement_with_oracle"] = agreement(outcomes[(t, row["judge"])], outcomes[(t, oracle)])[0]
    return pd.DataFrame(rows, columns=TEMPERATURE_COLUMNS)


def _judge_temperature(judge, cfg, pairs: SweepPairs, t: float, cache: VerdictCache, n_boot: int, alpha: float,
                       seed: int) -> tuple[dict, np.ndarray]:
    """One (temperature, judge) row and the debiased outcomes (N,) behind it."""
    policy, base = pairs.policy[t], pairs.baseline[t]
    judged = judge_pairs(judge, pairs.prompts, policy.completions, base.completions, cache,
                         both_orders=cfg.both_orders)
    metrics = win_rate_metrics(judge, judged, policy.lengths, base.lengths, None, n_boot, alpha, seed)
    row = {"temperature": t, "judge": cfg.name, "baseline": pairs.baseline_name, **metrics,
           "policy_len_mean": float(policy.lengths.mean()), "baseline_len_mean": float(base.lengths.mean())}
    log.info("T=%g / %s vs %s: win rate %.3f [%.3f, %.3f] (n=%d, invalid %d, %d cached)", t, cfg.name,
             pairs.baseline_name, row["win_rate"], row["win_rate_ci_low"], row["win_rate_ci_high"], row["n"],
             row["invalid"], row["cached"])
    return row, judged.outcomes


def format_table(table: pd.DataFrame) -> str:
    """The table a person reads: win rate with its CI, LC win rate, position bias, oracle agreement."""
    if table.empty:
        return "(no rows)"
    shown = table.assign(ci=[f"[{lo:.3f}, {hi:.3f}]" for lo, hi in
                             zip(table["win_rate_ci_low"], table["win_rate_ci_high"])])
    cols = ["temperature", "judge", "baseline", "n", "invalid", "win_rate", "ci", "lc_win_rate",
            "position_bias_rate", "agreement_with_oracle", "requests", "cached"]
    shown = shown[cols].assign(baseline=[_short(b) for b in shown["baseline"]])
    return shown.to_string(index=False, float_format=lambda v: f"{v:.3f}")


def _short(name: str) -> str:
    """A baseline path shortened to its last two parts (the table stays narrow)."""
    parts = re.split(r"[/\\]", name.rstrip("/"))
    return "/".join(parts[-2:]) if len(parts) > 2 else name
