"""What a run spent: policy samples, tokens forwarded and back-propagated per model role, estimated FLOPs, wall
seconds and peak memory — the cost axis of every points row, so methods can be compared at equal cost as well as
at equal KL.

    meter = ComputeMeter()
    meter.watch("policy", policy)        # a forward hook counts every token the model processes, and whether a
    meter.watch("reference", reference)  # backward will follow (autograd on: a training forward)
    with meter.paused(): evaluate(...)   # the shared evaluation is the same for every method: not a training cost
    meter.totals()                       # collective: sums over ranks → the cost columns of a points row

FLOPs follow Kaplan et al. 2020 (§2.1): a forward costs 2·N FLOPs per token and a forward with its backward 6·N,
where N counts the weights of every matrix multiply of the role's model (the LM head included even when tied to
the embedding; embedding lookups and the attention-score term, small at these lengths, left out). Tokens are the
padded shapes the model actually ran, prompt tokens included; a KV-cached sampling step counts its one new token.
"""
from __future__ import annotations

import contextlib
import math
import resource
import time
from dataclasses import asdict, dataclass
from typing import Iterator

import torch

from rlhf_lab.distributed import comm

# the points table's cost columns (eval/points.py), in order; per-role token counts for the four PPO roles
ROLES = ("policy", "critic", "reference", "reward")
COST_COLUMNS = ["train_samples", *(f"tokens_forward_{r}" for r in ROLES), "tokens_backward_policy",
                "tokens_backward_critic", "train_flops", "train_seconds", "peak_rss_mib"]


def matmul_weights(model: torch.nn.Module) -> int:
    """N for the FLOP estimate: elements of every ≥2-D weight outside embedding tables (linear, Conv1D, heads).
    Under ZeRO-3 a rank holds a shard of each parameter; `ds_numel` is the full size."""
    total = 0
    for module in model.modules():
        if isinstance(module, torch.nn.Embedding):
            continue
        weight = module._parameters.get("weight")
        shape = None if weight is None else tuple(getattr(weight, "ds_shape", None) or weight.shape)
        if shape is not None and len(shape) >= 2:
            total += math.prod(shape)
    return total


@dataclass
class RoleCount:
    params: int                  # N of the role's model (matmul weights)
    tokens_forward: int = 0      # tokens through forwards without a backward (sampling, scoring)
    tokens_backward: int = 0     # tokens through forwards whose graph is back-propagated (training)

    def flops(self) -> float:
        return 2.0 * self.params * self.tokens_forward + 6.0 * self.params * self.tokens_backward


class ComputeMeter:
    """Counts a run's training compute on this rank; `totals()` adds the ranks up. Its state is part of every
    checkpoint, so the cost at a step is the same whether or not the run was interrupted before it."""

    def __init__(self):
        self.roles: dict[str, RoleCount] = {}
        self.samples = 0                    # policy samples generated for training (this rank)
        self._seconds_before = 0.0          # training seconds of earlier attempts (a resumed run)
        self._peak_before = 0.0             # their peak RSS
        self._clock = time.perf_counter()
        self._paused_at: float | None = None
        self._hooks: list = []

    # ------------------------------------------------------------------------------------------------ counting
    def watch(self, role: str, *models: torch.nn.Module) -> None:
        """Count `role`'s tokens: each module in `models` is a way the role is called (the eager model, its
        compiled wrapper); calls traced by torch.compile are counted by the wrapper, not twice."""
        from rlhf_lab.distributed.strategy import unwrap_module

        if role not in ROLES:
            raise ValueError(f"unknown compute role {role!r}; expected one of {ROLES}")
        self.roles.setdefault(role, RoleCount(matmul_weights(unwrap_module(models[0]))))
        for model in models:
            target = _counted_module(unwrap_module(model))
            self._hooks.append(target.register_forward_pre_hook(self._hook(role), with_kwargs=True))

    def _hook(self, role: str):
        def count(_module, args, kwargs):
            if self._paused_at is not None or torch.compiler.is_compiling():
                return
            ids = kwargs.get("input_ids", args[0] if args else None)
            if ids is None:
                return
            counts = self.roles[role]
            if torch.is_grad_enabled():
                counts.tokens_backward += ids.numel()
            else:
                counts.tokens_forward += ids.numel()
        return count

    def add_samples(self, count: int) -> None:
        self.samples += count

    @contextlib.contextmanager
    def paused(self) -> Iterator[None]:
        """Neither tokens nor seconds count inside (the evaluation every method shares)."""
        self._paused_at = time.perf_counter()
        try:
            yield
        finally:
            self._clock += time.perf_counter() - self._paused_at
            self._paused_at = None

    def seconds(self) -> float:
        """Training wall seconds of this run so far (all attempts, evaluation excluded)."""
        now = self._paused_at if self._paused_at is not None else time.perf_counter()
        return self._seconds_before + now - self._clock

    # ------------------------------------------------------------------------------------------------ reporting
    def totals(self) -> dict[str, float]:
        """The cost columns, summed over ranks (collective: every rank calls it). Peak RSS is the largest rank's."""
        roles, samples = self._summed()
        none = RoleCount(0)
        seconds, peak = self._seconds_and_peak()
        return {"train_samples": samples,
                **{f"tokens_forward_{r}": roles.get(r, none).tokens_forward for r in ROLES},
                **{f"tokens_backward_{r}": roles.get(r, none).tokens_backward for r in ("policy", "critic")},
                "train_flops": float(sum(c.flops() for c in roles.values())),
                "train_seconds": seconds, "peak_rss_mib": peak}

    def per_role(self) -> dict[str, dict]:
        """Counts per role summed over ranks (params, tokens both ways, FLOPs): for summary.json. Collective."""
        return {role: {**asdict(c), "flops": c.flops()} for role, c in self._summed()[0].items()}

    def _summed(self) -> tuple[dict[str, RoleCount], int]:
        """Every role's counts and the policy samples, summed over ranks (collective)."""
        names = sorted(self.roles)
        local = [float(getattr(self.roles[r], f)) for r in names for f in ("tokens_forward", "tokens_backward")]
        summed = comm.all_reduce_sum(torch.tensor(local + [float(self.samples)], dtype=torch.float64)).tolist()
        roles = {r: RoleCount(self.roles[r].params, int(summed[2 * i]), int(summed[2 * i + 1]))
                 for i, r in enumerate(names)}
        return roles, int(summed[-1])

    def _seconds_and_peak(self) -> tuple[float, float]:
        """Rank 0's training seconds (all attempts) and the largest rank's peak RSS (collective)."""
        seconds = comm.broadcast_object(self.seconds())
        return seconds, max(comm.all_gather_object(max(self._peak_before, peak_rss_mib())))

    # ------------------------------------------------------------------------------------------------ resume
    def state_dict(self) -> dict:
        """The counts summed over ranks (collective: every rank calls it; rank 0's copy is what a checkpoint
        keeps), so a resume restores the run's totals however the ranks' shares differed."""
        roles, samples = self._summed()
        seconds, peak = self._seconds_and_peak()
        return {"roles": {r: asdict(c) for r, c in roles.items()}, "samples": samples, "seconds": seconds,
                "peak_rss_mib": peak}

    def load_state_dict(self, state: dict) -> None:
        """Rank 0 takes the checkpoint's totals, the other ranks start their shares from zero: `totals()` then
        sums to exactly what the uninterrupted run counts."""
        keep = comm.is_main()
        for role, counts in state["roles"].items():
            self.roles[role] = RoleCount(counts["params"], counts["tokens_forward"] if keep else 0,
                                         counts["tokens_backward"] if keep else 0)
        self.samples = int(state["samples"]) if keep else 0
        self._peak_before = float(state["peak_rss_mib"])
        self._seconds_before, self._clock = float(state["seconds"]), time.perf_counter()

    def close(self) -> None:
        for hook in self._hooks:
            hook.remove()
        self._hooks.clear()


def examples_per_step(cfg) -> int:
    """Training examples one step consumes: RL episodes (each a fresh policy sample: PPO one per prompt, RLOO and
    GRPO k per prompt), preference pairs (online DPO: one fresh pair per prompt) or, for KTO, rows."""
    from rlhf_lab.config import CriticFreeConfig, SamplingConfig

    a = cfg.algo
    if isinstance(a, CriticFreeConfig):
        return a.rollout_batch_size * a.samples_per_prompt
    return a.rollout_batch_size if isinstance(a, SamplingConfig) else cfg.train.batch_size


def steps_for_budget(samples: float, per_step: int) -> int:
    """The steps that consume at least `samples` examples at `per_step` each (the last step may exceed it)."""
    return max(1, math.ceil(samples / per_step - 1e-9))


def budget_spent(budget, cost: dict) -> bool:
    """After a step: has a flops / seconds budget been spent? (samples budgets are steps, fixed up front.)"""
    column = {"flops": "train_flops", "seconds": "train_seconds"}.get(budget.by)
    return column is not None and cost[column] >= budget.value


def peak_rss_mib() -> float:
    """Peak resident memory of this process so far (Linux reports KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _counted_module(model: torch.nn.Module) -> torch.nn.Module:
    """Where to hook: a scalar-head model is often run through its backbone alone (models/heads.py), so count
    there; a causal LM (or a compiled wrapper) at its own forward."""
    if isinstance(model, torch.nn.Module) and hasattr(model, "_orig_mod"):
        return model
    backbone = getattr(model, "base_model", None)
    is_scalar = not hasattr(model, "get_output_embeddings") or model.get_output_embeddings() is None
    return backbone if is_scalar and isinstance(backbone, torch.nn.Module) and backbone is not model else model
