"""The reward–KL frontier: seed aggregation, Pareto frontiers per method and best gold reward at KL budgets.

Pure pandas/numpy over the points table (`rlhf_lab.eval.points.POINT_COLUMNS`); no plotting and no I/O, so the
report, the study's printout, W&B and the notebooks all read the same numbers.

Vocabulary
- *method label*: what a curve in the DPO paper's Figure 2 is called — "dpo (sigmoid)", "ipo", "hinge", … for the
  DPO family (its `loss_type`), "ppo", "ppo_gt" for the RLHF arms.
- *setting*: one sweep point of a method (β for the DPO family; KL coefficient or target KL for PPO), pooled
  over seeds.
- *point*: (setting, evaluation step), with seed-mean KL and gold reward and a 95% confidence interval.

Which points may sit on the frontier: every evaluation step except step 0. The DPO paper's Figure 2 plots every
checkpoint, because a longer-trained checkpoint of a small-β run is a different (reward, KL) trade-off just as
much as a different β is; restricting to final steps would throw those trade-offs away. Step 0 is excluded
because it is the shared SFT model — the same point (KL = 0) for every method — so it would sit on every
method's frontier and win every KL budget without any training; it is reported separately as the baseline
(`sft_baseline`).
"""
from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import pandas as pd
from scipy import stats  # scipy comes with scikit-learn (a runtime dependency); used only for t quantiles

SETTING_KEYS = ["beta", "kl_coef", "target_kl"]
CI_LEVEL = 0.95
CI_SEEDS = "t-interval over seeds"
CI_WITHIN_RUN = "within-run SE (1 seed)"
_Z = 1.959963984540054  # two-sided 95% normal quantile, for the single-seed fallback

AGG_COLUMNS = [
    "method_label", "setting", *SETTING_KEYS, "step", "n_seeds", "kl_mean", "kl_ci_low", "kl_ci_high",
    "gold_mean", "gold_ci_low", "gold_ci_high", "proxy_mean", "response_len_mean", "ci_kind",
    "train_samples_mean", "train_flops_mean", "train_seconds_mean",   # seed-mean cost spent by this step
]
BUDGET_COLUMNS = [
    "method_label", "kl_budget", "gold_mean", "gold_ci_low", "gold_ci_high", "kl_mean", "setting", "step",
    "n_seeds", "ci_kind",
]
COST_BUDGET_COLUMNS = [
    "method_label", "flops_budget", "gold_mean", "gold_ci_low", "gold_ci_high", "train_flops_mean", "kl_mean",
    "setting", "step", "n_seeds", "ci_kind",
]


# the DPO paper's baselines, trained by the DPO trainer under these loss names
BASELINE_LABELS = {"sft": "preferred-ft", "unlikelihood": "unlikelihood"}


def method_label(method: str, loss_type: object) -> str:
    """Curve name: the DPO family is split by loss type (sigmoid is plain DPO; sft is the paper's Preferred-FT),
    and by who labelled its pairs and whether a reward model filtered them (method 'fdpo@judge:smollm2': 'dpo
    (sigmoid) · RM-filtered · labels by judge:smollm2'); online / iterative DPO by loss type and annotator too
    ('online_dpo@reward_model': 'online_dpo · labels by reward_model'); best-of-n by its scorer (its KL is an
    upper bound, and the label says so); other methods keep their name."""
    if method == "best_of_n":
        return f"best-of-n by {loss_type} (KL upper bound)"
    loss = "" if loss_type is None or (isinstance(loss_type, float) and math.isnan(loss_type)) else str(loss_type)
    base, _, labeler = str(method).partition("@")
    by = f" · labels by {labeler}" if labeler else ""
    if base in ("online_dpo", "iterative_dpo"):
        return (base if loss in ("", "sigmoid") else f"{base} ({loss})") + by
    if base not in ("dpo", "fdpo"):
        return str(method)
    label = "dpo (sigmoid)" if loss in ("", "sigmoid") else BASELINE_LABELS.get(loss, loss)
    return label + (" · RM-filtered" if base == "fdpo" else "") + by


def method_labels(points: pd.DataFrame) -> pd.Series:
    """Each row's curve name; a LoRA run (`lora_r` set) is a curve of its own beside its full fine-tuning twin."""
    lora = pd.to_numeric(points["lora_r"], errors="coerce") if "lora_r" in points else [math.nan] * len(points)
    labels = [method_label(m, lt) + ("" if math.isnan(r) else f" + LoRA r={int(r)}")
              for m, lt, r in zip(points["method"], points["loss_type"], lora)]
    return pd.Series(labels, index=points.index, name="method_label", dtype=object)


def setting_label(beta: object, kl_coef: object, target_kl: object) -> str:
    """Human name of a sweep point, from every knob it sets (with an adaptive controller, kl_coef is the
    controller's starting value, and two runs differing only there are different settings)."""
    def known(v: object) -> bool:
        return v is not None and not (isinstance(v, float) and math.isnan(v))
    named = [("β", beta), ("kl_coef", kl_coef), ("target_kl", target_kl)]
    return ", ".join(f"{name}={float(v):g}" for name, v in named if known(v)) or "default"


def mean_ci(values: np.ndarray, ses: np.ndarray) -> tuple[float, float, float, str]:
    """(mean, low, high, kind): a t-interval over seeds, or ±1.96·SE of the single run when there is one seed.

    With one seed there is no between-seed spread to measure; the within-run SE (sampling noise of the
    evaluation) is the only uncertainty available, and the table says so.
    """
    values = np.asarray(values, dtype=float)
    n = len(values)
    mean = float(np.mean(values)) if n else math.nan
    if n >= 2:
        half = float(stats.t.ppf(0.5 + CI_LEVEL / 2, df=n - 1) * np.std(values, ddof=1) / math.sqrt(n))
        return mean, mean - half, mean + half, CI_SEEDS
    se = float(np.asarray(ses, dtype=float)[0]) if n else math.nan
    half = _Z * se if not math.isnan(se) else math.nan
    return mean, mean - half, mean + half, CI_WITHIN_RUN


def with_labels(points: pd.DataFrame) -> pd.DataFrame:
    """The points with numeric setting columns and `method_label` / `setting` added (a copy)."""
    df = points.copy()
    for col in SETTING_KEYS + ["proxy_reward_mean", "response_len_mean", "gold_reward_se", "kl_se"]:
        if col not in df:
            df[col] = np.nan
        df[col] = pd.to_numeric(df[col], errors="coerce")
    df["method_label"] = method_labels(df)
    df["setting"] = [setting_label(b, k, t) for b, k, t in zip(df["beta"], df["kl_coef"], df["target_kl"])]
    # a sweep over another key (e.g. preferences.label_noise_temperature) gives runs the same β / kl_coef that are
    # different settings, not seeds of one: their run ids differ beyond the seed, so they are told apart by it
    family = df["run_id"].astype(str).str.replace(r"-seed\d+$", "", regex=True)
    shared = family.groupby([df["method_label"], df["setting"]]).transform("nunique") > 1
    df.loc[shared, "setting"] = df.loc[shared, "setting"] + " · " + family[shared]
    return df


def aggregate_seeds(points: pd.DataFrame) -> pd.DataFrame:
    """One row per (method label, setting, step): seed-mean KL and gold reward with 95% CIs (`AGG_COLUMNS`)."""
    if points.empty:
        return pd.DataFrame(columns=AGG_COLUMNS)
    df = with_labels(points)
    rows = []
    for (label, setting, step), g in df.groupby(["method_label", "setting", "step"], sort=True, dropna=False):
        kl, kl_lo, kl_hi, kind = mean_ci(g["kl_mean"].to_numpy(), g["kl_se"].to_numpy())
        kl_lo = max(0.0, kl_lo) if not math.isnan(kl_lo) else kl_lo   # KL ≥ 0: the symmetric t-interval is not
        gold, gold_lo, gold_hi, _ = mean_ci(g["gold_reward_mean"].to_numpy(), g["gold_reward_se"].to_numpy())
        rows.append({
            "method_label": label, "setting": setting,
            **{k: g[k].iloc[0] for k in SETTING_KEYS}, "step": int(step), "n_seeds": int(g["seed"].nunique()),
            "kl_mean": kl, "kl_ci_low": kl_lo, "kl_ci_high": kl_hi,
            "gold_mean": gold, "gold_ci_low": gold_lo, "gold_ci_high": gold_hi,
            "proxy_mean": float(g["proxy_reward_mean"].mean()), "response_len_mean": float(g["response_len_mean"].mean()),
            "ci_kind": kind, **_cost_means(g),
        })
    return pd.DataFrame(rows, columns=AGG_COLUMNS)


def _cost_means(group: pd.DataFrame) -> dict[str, float]:
    """Seed-mean cost columns (NaN for a points table written before rlhf_lab recorded costs)."""
    return {f"{c}_mean": float(pd.to_numeric(group[c], errors="coerce").mean()) if c in group else math.nan
            for c in ("train_samples", "train_flops", "train_seconds")}


def final_points(points: pd.DataFrame) -> pd.DataFrame:
    """Each setting's last evaluation, seed-averaged (`AGG_COLUMNS`): the table an experiment reports as its
    results (a study's `results.csv`)."""
    agg = aggregate_seeds(points)
    if agg.empty:
        return agg
    last = agg.groupby(["method_label", "setting"], dropna=False)["step"].transform("max")
    return agg[agg["step"] == last].reset_index(drop=True)


def frontier_mask(kl: np.ndarray, gold: np.ndarray) -> np.ndarray:
    """True where a point is not dominated (no other point has KL ≤ and gold ≥ with one strict).

    Sweep in order of increasing KL (higher gold first among equal KL) keeping the best gold so far: a point
    joins the frontier only if it beats everything at lower or equal KL. Exact duplicates dominate neither
    each other, so both are kept. Points with a NaN coordinate are never on the frontier.
    """
    kl, gold = np.asarray(kl, dtype=float), np.asarray(gold, dtype=float)
    mask = np.zeros(len(kl), dtype=bool)
    finite = np.flatnonzero(np.isfinite(kl) & np.isfinite(gold))
    order = finite[np.lexsort((-gold[finite], kl[finite]))]
    best, last = -math.inf, None
    for i in order:
        if gold[i] > best:
            mask[i], best, last = True, gold[i], i
        elif last is not None and kl[i] == kl[last] and gold[i] == gold[last]:
            mask[i] = True
    return mask


def trained_points(agg: pd.DataFrame) -> pd.DataFrame:
    """Aggregated points eligible for the frontier: every evaluation step but the shared SFT step 0."""
    return agg[agg["step"] > 0]


def pareto_frontier(agg: pd.DataFrame) -> pd.DataFrame:
    """Frontier points of every method (from `aggregate_seeds` output), sorted by method then KL."""
    parts = []
    for _, g in trained_points(agg).groupby("method_label", sort=True):
        parts.append(g[frontier_mask(g["kl_mean"].to_numpy(), g["gold_mean"].to_numpy())])
    if not parts:
        return pd.DataFrame(columns=agg.columns)
    return pd.concat(parts).sort_values(["method_label", "kl_mean", "gold_mean"], ascending=[True, True, False])


def best_at_kl_budgets(points: pd.DataFrame, budgets: Sequence[float]) -> pd.DataFrame:
    """Best seed-mean gold reward per method among trained points with mean KL ≤ budget (`BUDGET_COLUMNS`).

    Takes the raw points table. A method with no point under a budget gets a row with NaN gold (the table
    stays rectangular). Ties in gold go to the lower KL. The best point under a budget is always a frontier point.
    """
    return _best_within(points, budgets, "kl_mean", "kl_budget", BUDGET_COLUMNS)


def best_at_cost_budgets(points: pd.DataFrame, budgets: Sequence[float]) -> pd.DataFrame:
    """Gold at equal cost: the best seed-mean gold per method among trained points whose seed-mean training FLOPs
    (`train_flops`, trainers/compute.py) are within each budget (`COST_BUDGET_COLUMNS`); as `best_at_kl_budgets`."""
    return _best_within(points, budgets, "train_flops_mean", "flops_budget", COST_BUDGET_COLUMNS)


def _best_within(points: pd.DataFrame, budgets: Sequence[float], column: str, budget_name: str,
                 columns: list[str]) -> pd.DataFrame:
    """Per method and budget, the trained point with the best gold among those with `column` ≤ budget (ties to
    the lower `column`); an empty budget gives a row of NaNs."""
    agg = trained_points(aggregate_seeds(points))
    rows = []
    for label in sorted(agg["method_label"].unique()):
        g = agg[agg["method_label"] == label]
        for budget in budgets:
            under = g[g[column] <= budget].sort_values(["gold_mean", column], ascending=[False, True])
            if under.empty:
                empty = {c: math.nan for c in columns} | {"setting": "", "step": pd.NA, "n_seeds": 0, "ci_kind": ""}
                rows.append({**empty, "method_label": label, budget_name: float(budget)})
                continue
            best = under.iloc[0]
            rows.append({"method_label": label, budget_name: float(budget),
                         **{c: best[c] for c in columns if c not in ("method_label", budget_name)}})
    return pd.DataFrame(rows, columns=columns)


def default_kl_budgets(points: pd.DataFrame, max_budgets: int = 5) -> list[float]:
    """A 1-2-5 series of KL budgets spanning the trained points' KL range (the smoke study's KL is 100× smaller
    than the IMDb study's, so fixed budgets would be empty or trivial for one of them)."""
    return spanning_budgets(points.loc[points["step"] > 0, "kl_mean"], max_budgets)


def default_cost_budgets(points: pd.DataFrame, max_budgets: int = 5) -> list[float]:
    """A 1-2-5 series of FLOP budgets spanning the trained points' training FLOPs (empty without cost columns)."""
    if "train_flops" not in points:
        return []
    return spanning_budgets(points.loc[points["step"] > 0, "train_flops"], max_budgets) \
        if pd.to_numeric(points["train_flops"], errors="coerce").gt(0).any() else []


def spanning_budgets(values: pd.Series, max_budgets: int = 5) -> list[float]:
    """1-2-5 series from the smallest positive value to (just past) the largest, thinned to `max_budgets`."""
    positive = pd.to_numeric(values, errors="coerce").dropna()
    positive = positive[positive > 0]
    if positive.empty:
        return [1.0]
    lo, hi = float(positive.min()), float(positive.max())
    series = [m * 10.0 ** e for e in range(math.floor(math.log10(lo)) - 1, math.ceil(math.log10(hi)) + 2)
              for m in (1, 2, 5)]
    chosen = [b for b in series if b >= lo and b < hi] + [next(b for b in series if b >= hi)]
    if len(chosen) > max_budgets:  # thin evenly, keeping the largest (it covers every point)
        idx = np.unique(np.round(np.linspace(0, len(chosen) - 1, max_budgets)).astype(int))
        chosen = [chosen[i] for i in idx]
    return chosen


def sft_baseline(points: pd.DataFrame) -> dict:
    """Gold reward of the shared SFT model (step-0 rows), pooled over runs: the frontiers' common origin."""
    step0 = points[points["step"] == 0]
    if step0.empty:
        return {"gold_mean": math.nan, "gold_se": math.nan, "n_rows": 0}
    return {"gold_mean": float(step0["gold_reward_mean"].mean()),
            "gold_se": float(pd.to_numeric(step0["gold_reward_se"], errors="coerce").mean()), "n_rows": len(step0)}


def budget_table_text(table: pd.DataFrame, digits: int = 3) -> str:
    """The `best_at_kl_budgets` table as fixed-width text: one line per method, one column per KL budget."""
    if table.empty:
        return "(no trained points)"
    budgets = sorted(table["kl_budget"].unique())
    labels = sorted(table["method_label"].unique())
    width = max(14, 2 * digits + 7)
    lines = [f"{'best gold reward at KL ≤':<24}" + "".join(f"{b:>{width}g}" for b in budgets)]
    for label in labels:
        cells = []
        for b in budgets:
            row = table[(table["method_label"] == label) & (table["kl_budget"] == b)].iloc[0]
            half = (row["gold_ci_high"] - row["gold_ci_low"]) / 2
            cell = "—" if pd.isna(row["gold_mean"]) else f"{row['gold_mean']:.{digits}f}±{half:.{digits}f}"
            cells.append(f"{cell:>{width}}")
        lines.append(f"{label:<24}" + "".join(cells))
    return "\n".join(lines)
