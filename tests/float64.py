"""Helpers for the maths tests: float64 tensors and a tight float64 comparison against hand-computed values."""
from __future__ import annotations

import math

import torch

RTOL, ATOL = 1e-10, 1e-12


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def assert_close(actual: torch.Tensor, expected, rtol: float = RTOL, atol: float = ATOL) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float64
    assert actual.shape == expected_t.shape
    torch.testing.assert_close(actual.detach(), expected_t, rtol=rtol, atol=atol)


def logsig(x: float) -> float:
    """log σ(x) in plain Python floats, stable for large |x| (the reference side of the loss tests)."""
    return -math.log1p(math.exp(-x)) if x >= 0 else x - math.log1p(math.exp(x))


def sig(x: float) -> float:
    """σ(x) in plain Python floats, stable for large |x|."""
    return 1.0 / (1.0 + math.exp(-x)) if x >= 0 else math.exp(x) / (1.0 + math.exp(x))
