"""Helpers for the maths tests: float64 tensors and a tight float64 comparison against hand-computed values."""
from __future__ import annotations

import torch

RTOL, ATOL = 1e-10, 1e-12


def t(values, requires_grad: bool = False) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.float64, requires_grad=requires_grad)


def assert_close(actual: torch.Tensor, expected, rtol: float = RTOL, atol: float = ATOL) -> None:
    expected_t = torch.as_tensor(expected, dtype=torch.float64)
    assert actual.dtype == torch.float64
    assert actual.shape == expected_t.shape
    torch.testing.assert_close(actual.detach(), expected_t, rtol=rtol, atol=atol)
