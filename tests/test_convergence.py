"""The plateau check (rlhf_lab.eval.convergence) against hand-computed differences and standard errors."""
from __future__ import annotations

import math

import pytest

from rlhf_lab.eval.convergence import convergence_warnings, last_two_evaluations
from tests.test_frontier import row, table


def test_last_two_evaluations_flag_runs_still_moving():
    points = table(
        row(beta=0.1, step=0, gold=0.40, gold_se=0.02), row(beta=0.1, step=10, gold=0.50, gold_se=0.03),
        row(beta=0.1, step=20, gold=0.60, gold_se=0.04),                       # Δ 0.10 > √(0.03² + 0.04²) = 0.05
        row(beta=0.5, step=10, gold=0.55, gold_se=0.03), row(beta=0.5, step=20, gold=0.57, gold_se=0.04),  # plateau
        row(beta=1.0, step=10, gold=0.55, gold_se=0.0), row(beta=1.0, step=20, gold=0.50, gold_se=0.0),    # falling
        row(beta=2.0, step=10, gold=0.5),                                       # one evaluation: no verdict
        row(method="best_of_n", loss_type="gold", step=32, gold=0.80),         # best-of-n: steps are n, not
        row(method="best_of_n", loss_type="gold", step=64, gold=0.90),         # training; never flagged
    )
    out = last_two_evaluations(points).set_index("setting")
    assert list(out.index) == ["β=0.1", "β=0.5", "β=1"]
    rising = out.loc["β=0.1"]
    assert (rising["step_prev"], rising["step_last"]) == (10, 20)
    assert rising["diff"] == pytest.approx(0.10, abs=1e-12) and rising["diff_se"] == pytest.approx(0.05, abs=1e-12)
    assert rising["state"] == "still rising"
    assert out.loc["β=0.5", "state"] == "plateau" and out.loc["β=1", "state"] == "still falling"
    warnings = convergence_warnings(points)
    assert len(warnings) == 2 and warnings[0].startswith(
        "dpo-sigmoid-0.1-None-None-seed0: gold 0.500 → 0.600 between steps 10 and 20 (Δ +0.100, SE 0.050): still rising")
    assert math.isclose(out.loc["β=0.5", "diff_se"], 0.05)
