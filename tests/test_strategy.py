"""The strategy's gradient accumulation reproduces one large-batch step; the warm-up schedule is linear."""
from __future__ import annotations

import copy

import torch

from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.trainers.optim import warmup_schedule


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_accumulation_equals_large_batch():
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    big = copy.deepcopy(base)
    s1 = TorchStrategy("cpu", "fp32", grad_accum=1, max_grad_norm=None)
    s1.setup(big, torch.optim.SGD(big.parameters(), lr=0.1))
    s1.backward(_loss(big, x, y))
    assert s1.step().stepped

    small = copy.deepcopy(base)
    s2 = TorchStrategy("cpu", "fp32", grad_accum=2, max_grad_norm=None)
    s2.setup(small, torch.optim.SGD(small.parameters(), lr=0.1))
    s2.backward(_loss(small, x[:4], y[:4]))
    assert not s2.step().stepped
    s2.backward(_loss(small, x[4:], y[4:]))
    assert s2.step().stepped
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_reports_preclip_norm_and_clips():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    s = TorchStrategy("cpu", "fp32", grad_accum=1, max_grad_norm=1.0)
    s.setup(model, torch.optim.SGD(model.parameters(), lr=1.0))
    s.backward((model(torch.tensor([[30.0, 40.0]])) - 1).sum() * -1)  # gradient (-30, -40), norm 50
    result = s.step()
    assert abs(result.grad_norm - 50.0) < 1e-4
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[0.6, 0.8]]))  # step of clipped norm 1


def test_warmup_is_linear_then_constant():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]
