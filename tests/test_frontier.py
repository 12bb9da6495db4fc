"""Frontier maths against hand-computed tables (rlhf_lab.eval.frontier)."""
from __future__ import annotations

import math

import numpy as np
import pandas as pd
import pytest

from rlhf_lab.eval import frontier as fr

T_975_DF2 = 4.302652729749462  # Student t, 97.5% quantile, 2 degrees of freedom (any statistics table)
Z_975 = 1.959963984540054


def row(method="dpo", loss_type="sigmoid", beta=None, kl_coef=None, target_kl=None, seed=0, step=1,
        kl=1.0, gold=0.5, kl_se=0.0, gold_se=0.0, proxy=None, length=10.0) -> dict:
    run_id = f"{method}-{loss_type}-{beta}-{kl_coef}-{target_kl}-seed{seed}"
    return {"study": "t", "run_id": run_id, "method": method, "loss_type": loss_type, "beta": beta,
            "kl_coef": kl_coef, "target_kl": target_kl, "seed": seed, "step": step, "samples": 64,
            "kl_mean": kl, "kl_se": kl_se, "gold_reward_mean": gold, "gold_reward_se": gold_se,
            "proxy_reward_mean": proxy, "response_len_mean": length, "temperature": 1.0}


def table(*rows: dict) -> pd.DataFrame:
    return pd.DataFrame(list(rows))


# ---------------------------------------------------------------- labels


@pytest.mark.parametrize("method, loss, label", [
    ("dpo", "sigmoid", "dpo (sigmoid)"), ("dpo", "ipo", "ipo"), ("dpo", "hinge", "hinge"),
    ("dpo", float("nan"), "dpo (sigmoid)"), ("ppo", "ppo", "ppo"), ("ppo_gt", "ppo", "ppo_gt"),
])
def test_method_label(method, loss, label):
    assert fr.method_label(method, loss) == label


def test_setting_label_names_every_knob_set():
    nan = float("nan")
    assert fr.setting_label(0.1, nan, nan) == "β=0.1"
    assert fr.setting_label(nan, 0.05, nan) == "kl_coef=0.05"
    assert fr.setting_label(nan, 0.05, 6.0) == "kl_coef=0.05, target_kl=6"
    assert fr.setting_label(None, None, None) == "default"


# ---------------------------------------------------------------- seed aggregation


def test_three_seeds_give_a_t_interval():
    pts = table(*(row(beta=0.1, seed=s, kl=k, gold=g, gold_se=0.5)
                  for s, k, g in [(0, 1.0, 0.5), (1, 2.0, 0.6), (2, 3.0, 0.7)]))
    agg = fr.aggregate_seeds(pts)
    assert len(agg) == 1
    a = agg.iloc[0]
    half_gold = T_975_DF2 * 0.1 / math.sqrt(3)  # sd of (0.5, 0.6, 0.7) is 0.1
    half_kl = T_975_DF2 * 1.0 / math.sqrt(3)    # sd of (1, 2, 3) is 1
    assert a["n_seeds"] == 3 and a["ci_kind"] == fr.CI_SEEDS
    assert a["gold_mean"] == pytest.approx(0.6, abs=1e-12)
    assert (a["gold_ci_low"], a["gold_ci_high"]) == pytest.approx((0.6 - half_gold, 0.6 + half_gold), abs=1e-9)
    assert 2.0 - half_kl < 0                    # the symmetric t-interval reaches below KL = 0 ...
    assert (a["kl_ci_low"], a["kl_ci_high"]) == pytest.approx((0.0, 2.0 + half_kl), abs=1e-9)   # ... clipped at 0
    # the within-run SE (0.5, huge) must not leak into a multi-seed interval
    assert a["gold_ci_high"] - a["gold_ci_low"] < 1.0  # ±1.96·0.5 would be 1.96 wide


def test_single_seed_falls_back_to_within_run_se():
    agg = fr.aggregate_seeds(table(row(beta=0.1, kl=2.0, kl_se=0.1, gold=0.7, gold_se=0.02)))
    a = agg.iloc[0]
    assert a["n_seeds"] == 1 and a["ci_kind"] == fr.CI_WITHIN_RUN
    assert (a["gold_ci_low"], a["gold_ci_high"]) == pytest.approx((0.7 - Z_975 * 0.02, 0.7 + Z_975 * 0.02))
    assert (a["kl_ci_low"], a["kl_ci_high"]) == pytest.approx((2.0 - Z_975 * 0.1, 2.0 + Z_975 * 0.1))


def test_aggregation_keeps_settings_steps_and_methods_apart():
    pts = table(row(beta=0.1, step=1, seed=0, gold=0.5), row(beta=0.1, step=1, seed=1, gold=0.7),
                row(beta=0.1, step=2, seed=0, gold=0.9), row(beta=0.5, step=1, gold=0.1),
                row(loss_type="ipo", beta=0.1, step=1, gold=0.3),
                row(method="ppo", loss_type="ppo", kl_coef=0.1, step=1, gold=0.2, proxy=1.5))
    agg = fr.aggregate_seeds(pts).set_index(["method_label", "setting", "step"])
    assert len(agg) == 5
    assert agg.loc[("dpo (sigmoid)", "β=0.1", 1), "gold_mean"] == pytest.approx(0.6)
    assert agg.loc[("dpo (sigmoid)", "β=0.1", 1), "n_seeds"] == 2
    assert agg.loc[("dpo (sigmoid)", "β=0.1", 2), "n_seeds"] == 1
    assert agg.loc[("ipo", "β=0.1", 1), "gold_mean"] == pytest.approx(0.3)
    assert agg.loc[("ppo", "kl_coef=0.1", 1), "proxy_mean"] == pytest.approx(1.5)


def test_a_sweep_over_another_key_is_not_pooled_as_seeds():
    """Two label-noise levels at the same β are two settings (their run ids differ beyond the seed), each with
    its own seeds."""
    rows = [row(beta=0.1, step=1, seed=s, gold=g) | {"run_id": f"dpo-label_noise_temperature{t}-seed{s}"}
            for t, golds in (("0", (0.7, 0.8)), ("0.5", (0.5, 0.6))) for s, g in enumerate(golds)]
    agg = fr.aggregate_seeds(table(*rows)).set_index("setting")
    assert sorted(agg.index) == ["β=0.1 · dpo-label_noise_temperature0", "β=0.1 · dpo-label_noise_temperature0.5"]
    assert agg.loc["β=0.1 · dpo-label_noise_temperature0", "gold_mean"] == pytest.approx(0.75)
    assert (agg["n_seeds"] == 2).all()


# ---------------------------------------------------------------- Pareto frontier


def test_frontier_mask_dominated_points_and_ties():
    kl = np.array([1.0, 2.0, 3.0, 1.5, 2.0, 1.0, 4.0, np.nan])
    gold = np.array([0.5, 0.7, 0.6, 0.4, 0.7, 0.45, 0.7, 0.99])
    # (1,.5) first; (1,.45) same KL lower gold: dominated; (1.5,.4) dominated by (1,.5);
    # (2,.7) twice: exact duplicates dominate neither, both kept; (3,.6) dominated; (4,.7) same gold at
    # more KL: dominated; NaN KL never on the frontier.
    expected = [True, True, False, False, True, False, False, False]
    assert fr.frontier_mask(kl, gold).tolist() == expected


def test_frontier_mask_empty_and_monotone():
    assert fr.frontier_mask(np.array([]), np.array([])).tolist() == []
    assert fr.frontier_mask(np.array([3.0, 1.0, 2.0]), np.array([0.9, 0.1, 0.5])).tolist() == [True] * 3


def test_pareto_frontier_pools_settings_and_steps_but_not_step_zero():
    pts = table(
        # shared SFT point: KL 0, would dominate nothing-trained budgets if it were allowed in
        row(beta=0.1, step=0, kl=0.0, gold=0.45), row(beta=1.0, step=0, kl=0.0, gold=0.45),
        row(beta=1.0, step=1, kl=0.2, gold=0.50), row(beta=1.0, step=2, kl=0.4, gold=0.48),  # 2nd dominated
        row(beta=0.1, step=1, kl=1.0, gold=0.60), row(beta=0.1, step=2, kl=2.0, gold=0.55),  # 2nd dominated
        row(beta=0.1, step=3, kl=3.0, gold=0.70),
        row(method="ppo", loss_type="ppo", kl_coef=0.1, step=0, kl=0.0, gold=0.45),
        row(method="ppo", loss_type="ppo", kl_coef=0.1, step=1, kl=5.0, gold=0.80),
    )
    front = fr.pareto_frontier(fr.aggregate_seeds(pts))
    dpo = front[front["method_label"] == "dpo (sigmoid)"]
    assert list(zip(dpo["setting"], dpo["step"])) == [("β=1", 1), ("β=0.1", 1), ("β=0.1", 3)]
    assert dpo["kl_mean"].tolist() == [0.2, 1.0, 3.0]
    ppo = front[front["method_label"] == "ppo"]
    assert ppo["step"].tolist() == [1]
    assert (front["step"] > 0).all()


def test_frontier_uses_seed_means():
    # seed 0 alone would put (kl 1, gold .9) on top; the seed mean (kl 1.5, gold .5) is dominated by β=1
    pts = table(row(beta=0.1, seed=0, kl=1.0, gold=0.9), row(beta=0.1, seed=1, kl=2.0, gold=0.1),
                row(beta=1.0, seed=0, kl=1.0, gold=0.6), row(beta=1.0, seed=1, kl=1.0, gold=0.6))
    front = fr.pareto_frontier(fr.aggregate_seeds(pts))
    assert front["setting"].tolist() == ["β=1"]


# ---------------------------------------------------------------- best at KL budgets


def test_best_at_kl_budgets_hand_computed():
    pts = table(
        row(beta=0.1, step=0, kl=0.0, gold=0.45),
        row(beta=1.0, step=1, seed=0, kl=0.3, gold=0.50), row(beta=1.0, step=1, seed=1, kl=0.5, gold=0.60),
        row(beta=0.1, step=1, kl=1.2, gold=0.70, gold_se=0.01),
        row(beta=0.05, step=1, kl=0.9, gold=0.70, gold_se=0.03),  # ties β=0.1 in gold at lower KL: it wins
        row(beta=0.01, step=1, kl=4.0, gold=0.65),
        row(method="ppo", loss_type="ppo", kl_coef=0.1, step=0, kl=0.0, gold=0.45),
        row(method="ppo", loss_type="ppo", kl_coef=0.1, step=1, kl=2.5, gold=0.90, gold_se=0.02),
    )
    out = fr.best_at_kl_budgets(pts, [0.3, 0.5, 1.0, 5.0])
    assert list(out.columns) == fr.BUDGET_COLUMNS
    assert len(out) == 8  # 2 methods × 4 budgets, rectangular
    d = out[out["method_label"] == "dpo (sigmoid)"].set_index("kl_budget")
    assert math.isnan(d.loc[0.3, "gold_mean"])           # β=1 mean KL is 0.4: nothing under 0.3 (step 0 excluded)
    assert d.loc[0.5, "gold_mean"] == pytest.approx(0.55)  # β=1 seed mean
    half = 12.706204736174707 * 0.1 / math.sqrt(2) / math.sqrt(2)  # t(0.975, df=1) · sd (0.1/√2) / √n
    assert d.loc[0.5, "gold_ci_high"] - 0.55 == pytest.approx(half)
    assert d.loc[1.0, "setting"] == "β=0.05" and d.loc[1.0, "gold_mean"] == pytest.approx(0.70)
    assert d.loc[1.0, "gold_ci_low"] == pytest.approx(0.70 - Z_975 * 0.03)
    assert d.loc[5.0, "setting"] == "β=0.05" and d.loc[5.0, "kl_mean"] == pytest.approx(0.9)
    p = out[out["method_label"] == "ppo"].set_index("kl_budget")
    assert p.loc[[0.3, 0.5, 1.0], "gold_mean"].isna().all()
    assert p.loc[5.0, "gold_mean"] == pytest.approx(0.90) and p.loc[5.0, "ci_kind"] == fr.CI_WITHIN_RUN


def test_best_at_budget_is_a_frontier_point():
    rng = np.random.default_rng(0)
    pts = table(*(row(beta=b, step=s, seed=sd, kl=float(rng.uniform(0.1, 5)), gold=float(rng.uniform()))
                  for b in (0.1, 0.5, 1.0) for s in (1, 2, 3) for sd in (0, 1)))
    front = fr.pareto_frontier(fr.aggregate_seeds(pts))
    best = fr.best_at_kl_budgets(pts, [1.0, 2.0, 3.0, 10.0]).dropna(subset=["gold_mean"])
    keys = set(zip(front["setting"], front["step"]))
    assert len(best) > 0 and all((s, st) in keys for s, st in zip(best["setting"], best["step"]))


def test_default_budgets_span_the_kl_range():
    assert fr.default_kl_budgets(table(row(kl=0.3), row(kl=21.7), row(step=0, kl=0.0))) == [0.5, 2.0, 5.0, 10.0, 50.0]
    assert fr.default_kl_budgets(table(row(kl=0.012), row(kl=0.08))) == pytest.approx([0.02, 0.05, 0.1])
    assert fr.default_kl_budgets(table(row(step=0, kl=0.0))) == [1.0]


def test_budget_table_text_marks_missing_cells():
    pts = table(row(beta=0.1, kl=0.5, gold=0.612, gold_se=0.01),
                row(method="ppo", loss_type="ppo", kl_coef=0.1, kl=3.0, gold=0.9, gold_se=0.0))
    text = fr.budget_table_text(fr.best_at_kl_budgets(pts, [1.0, 5.0]))
    lines = text.splitlines()
    assert len(lines) == 3
    assert lines[1].startswith("dpo (sigmoid)") and f"0.612±{Z_975 * 0.01:.3f}" in lines[1]
    assert lines[2].startswith("ppo") and "—" in lines[2] and "0.900±0.000" in lines[2]


def test_sft_baseline_reads_step_zero():
    pts = table(row(step=0, kl=0.0, gold=0.4, gold_se=0.02), row(step=0, kl=0.0, gold=0.6, gold_se=0.04),
                row(step=1, gold=0.9))
    base = fr.sft_baseline(pts)
    assert base["gold_mean"] == pytest.approx(0.5) and base["gold_se"] == pytest.approx(0.03)
    assert base["n_rows"] == 2
