"""The training-loop skeleton every trainer shares: what is *not* a method's own maths.

    build_trained(...)          optimizer + warm-up schedule from the `optim` group, handed to the strategy
    GlobalBatches / rank_share  one global batch per optimizer step, identical on every rank; each rank keeps its
                                accumulation micro-batches, so W ranks see exactly the batches one process sees
    accumulate(...)             micro-batches under the strategy's autocast, a non-finite loss agreed across
                                ranks, backward/step, metrics averaged over micro-batches and ranks
    evaluate_and_record(...)    the one evaluation call (policy_eval under the same autocast, full parameters for
                                sampling, rank-sharded and gathered), points and samples on rank 0
    Checkpointer                collective, atomic checkpoints: every strategy's state, per-rank RNG, trainer
                                state, the world layout (a resume under another layout is refused)
    StopRequest                 SIGTERM / SIGUSR1 (SLURM's warning) → checkpoint after this step, agreed by all ranks

Trainers (sft, reward_model, dpo, ppo) keep their loss and their loop order; they read top to bottom.
"""
from __future__ import annotations

import logging
import os
import shutil
import signal
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Iterable

import torch

from rlhf_lab.distributed import comm
from rlhf_lab.trainers.checkpoint import capture_rng, complete_checkpoints, restore_rng
from rlhf_lab.trainers.errors import NonFiniteLossError, PreemptedError
from rlhf_lab.trainers.optim import build_optimizer, warmup_schedule
from rlhf_lab.utils.cache import load_state_file, mark_complete
from rlhf_lab.utils.errors import ConfigError, StorageError, UserError
from rlhf_lab.utils.progress import Progress

log = logging.getLogger(__name__)


# ------------------------------------------------------------------------------------------------ set-up
def build_trained(strategy, model: torch.nn.Module, optim_cfg, *, lr: float | None = None,
                  weight_decay: float | None = None, warmup_steps: int | None = None) -> torch.nn.Module:
    """Optimizer (optim.name, betas, ...) and linear warm-up for `model`, owned by `strategy`; a trainer may
    override lr / weight decay / warm-up with its own keys (PPO's actor_lr, the SFT and RM groups)."""
    optimizer = build_optimizer(model.parameters(), optim_cfg, lr=lr, weight_decay=weight_decay)
    warmup = optim_cfg.warmup_steps if warmup_steps is None else warmup_steps
    return strategy.setup(model, optimizer, warmup_schedule(optimizer, warmup))


def accumulation_steps(global_batch: int, micro_batch: int, what: str) -> int:
    """global batch = micro-batch × accumulation × world size: derived once, and inexact division is an error."""
    world = comm.world_size()
    if micro_batch < 1 or global_batch % (micro_batch * world):
        raise ConfigError(f"{what}: global batch {global_batch} is not a multiple of micro-batch {micro_batch} × "
                          f"world size {world}; choose sizes with batch = micro × accumulation × processes")
    return global_batch // (micro_batch * world)


def micro_batch_for(global_batch: int, accum: int, what: str) -> int:
    """Rows per forward on one rank when `global_batch` rows are split over accumulation × world size."""
    world = comm.world_size()
    if global_batch % (accum * world):
        raise ConfigError(f"{what}: global batch {global_batch} is not divisible by accumulation {accum} × world "
                          f"size {world}")
    return global_batch // (accum * world)


# ------------------------------------------------------------------------------------------------ data
@dataclass
class GlobalBatches:
    """Endless global batches drawn from a seeded shuffle (reshuffled each epoch, a short tail dropped), the
    same sequence on every rank. Its position (order, cursor) is part of a checkpoint; the generator's state is
    saved with the other RNGs."""

    items: list
    batch_size: int
    generator: torch.Generator
    order: list[int] = field(default_factory=list)
    cursor: int = 0

    def __post_init__(self):
        if len(self.items) < self.batch_size:
            raise ConfigError(f"only {len(self.items)} training examples for a global batch of {self.batch_size}")

    def next(self) -> list:
        if self.cursor + self.batch_size > len(self.order):
            self.order, self.cursor = torch.randperm(len(self.items), generator=self.generator).tolist(), 0
        rows = self.order[self.cursor: self.cursor + self.batch_size]
        self.cursor += self.batch_size
        return [self.items[i] for i in rows]

    def state_dict(self) -> dict:
        return {"order": self.order, "cursor": self.cursor}

    def load_state_dict(self, state: dict) -> None:
        self.order, self.cursor = list(state["order"]), int(state["cursor"])


def rank_share(batch: list, accum: int) -> list[list]:
    """This rank's `accum` micro-batches of a global batch split into world × accum equal chunks (chunk k =
    rows [k·m, (k+1)·m)); rank r keeps chunks r·accum … r·accum + accum − 1. One process with accumulation
    world × accum walks the same chunks, so both compute the same mean gradient."""
    world, r = comm.world_size(), comm.rank()
    m = len(batch) // (world * accum)
    return [batch[(r * accum + a) * m: (r * accum + a + 1) * m] for a in range(accum)]


# ------------------------------------------------------------------------------------------------ update
def accumulate(strategy, micro_batches: Iterable, loss_fn: Callable[[Any], tuple[torch.Tensor, dict]],
               what: str) -> dict:
    """One optimizer step over this rank's micro-batches. loss_fn(micro_batch) -> (loss, float metrics).
    Returns metrics averaged over micro-batches and ranks, plus the pre-clip grad norm and the lr."""
    micro_batches = list(micro_batches)
    totals: dict[str, float] = {}
    result = None
    for batch in micro_batches:
        with strategy.autocast():
            loss, metrics = loss_fn(batch)
        check_finite(loss, what)
        strategy.backward(loss)
        result = strategy.step()
        for k, v in metrics.items():
            totals[k] = totals.get(k, 0.0) + float(v) / len(micro_batches)
    totals = comm.mean_over_ranks(totals)
    totals[f"{what}/grad_norm"] = result.grad_norm
    totals[f"{what}/lr"] = strategy.lr()
    return totals


def check_finite(loss: torch.Tensor, what: str) -> None:
    """Every rank stops together when any rank's loss is NaN/inf (a lone rank raising would hang the rest)."""
    bad = not bool(torch.isfinite(loss.detach()).all())
    if comm.any_rank(bad):
        value = loss.item() if bad else "non-finite on another rank"
        raise NonFiniteLossError(f"{what} loss became {value}; stopping the run")


# ------------------------------------------------------------------------------------------------ evaluation
def evaluate_and_record(step: int, strategy, policy, reference, tokenizer, prompt_ids, gold, eval_cfg, identity,
                        points, logger, run_dir: Path, meter, proxy_reward=None) -> Any:
    """The one evaluation every trainer calls: sample on the held-out prompts with full parameters, under the
    training precision, split across ranks and gathered, so the points row is the same at any world size. The
    row carries what training had spent by then (`meter`, a ComputeMeter, paused while evaluating)."""
    from rlhf_lab.eval.points import point_row
    from rlhf_lab.eval.policy_eval import evaluate_policy
    from rlhf_lab.eval.samples import write_samples

    with meter.paused(), strategy.autocast(), strategy.generation(policy) as pol, \
            strategy.generation(reference) as ref:
        result = evaluate_policy(pol, ref, tokenizer, prompt_ids, gold, eval_cfg, proxy_reward=proxy_reward,
                                 sync_finish=strategy.synced_generation, progress=f"evaluation at step {step}")
    cost = meter.totals()
    if comm.is_main():
        proxy = result.proxy_reward_mean if proxy_reward is not None else None
        points.write(point_row(identity, step, result, proxy_reward=proxy, cost=cost))
        write_samples(Path(run_dir), step, result.records)  # read by rlhf_lab.judges.study
    logger.log({**result.as_metrics(), **{f"cost/{k}": v for k, v in cost.items()}}, step)
    log.info("step %d: gold %.4f ± %.4f, KL %.3f ± %.3f", step, result.gold_reward_mean, result.gold_reward_se,
             result.kl_mean, result.kl_se)
    return result


# ------------------------------------------------------------------------------------------------ checkpoints
KILL_AFTER_CHECKPOINT_ENV = "RLHF_LAB_KILL_AFTER_CHECKPOINT"


def _kill_requested(checkpoint: Path) -> bool:
    """RLHF_LAB_KILL_AFTER_CHECKPOINT=STEP or TEXT:STEP (TEXT in the checkpoint's path, e.g. reward_model:5):
    the resume tests' way to SIGKILL a run at a known moment."""
    spec = os.environ.get(KILL_AFTER_CHECKPOINT_ENV)
    if not spec:
        return False
    text, _, step = spec.rpartition(":")
    return checkpoint.name == f"step-{int(step):06d}" and text in str(checkpoint)


class Checkpointer:
    """Collective, atomic checkpoints in `<run_dir>/checkpoints/step-NNNNNN/`:

        state.pt            trainer state (step, data cursor, KL controller, ...), config hash, world layout
        rng-rank{r}.pt      each rank's RNG states (global and the trainer's generators)
        <role>/             each strategy's own state (torch_state.pt, or DeepSpeed's per-rank partitions)

    Every rank writes into the same deterministic hidden directory; after a barrier rank 0 adds the marker and
    renames it into place, so a kill at any moment leaves either the previous checkpoint or a hidden leftover
    that is never resumed."""

    def __init__(self, root: Path, strategies: dict[str, Any], config_hash: str, keep: int = 2):
        self.root, self.strategies, self.config_hash, self.keep = Path(root), strategies, config_hash, keep
        first = next(iter(strategies.values()))
        self.layout = {name: s.describe() for name, s in strategies.items()}
        self.world_size = first.describe()["world_size"]

    def save(self, step: int, trainer_state: dict, generators: dict[str, torch.Generator]) -> Path:
        final = self.root / f"step-{step:06d}"
        tmp = self.root / f".tmp-step-{step:06d}"
        if comm.is_main():
            shutil.rmtree(tmp, ignore_errors=True)
            for name in self.strategies:
                (tmp / name).mkdir(parents=True)
        comm.barrier()
        error = None
        try:
            for name, strategy in self.strategies.items():
                strategy.save_state(tmp / name)
            torch.save(capture_rng(generators), tmp / f"rng-rank{comm.rank()}.pt")
            if comm.is_main():
                torch.save({"config_hash": self.config_hash, "layout": self.layout, "step": step,
                            "trainer": trainer_state}, tmp / "state.pt")
        except OSError as e:   # a full disk, a quota: agreed across ranks, so none waits in the next barrier
            error = e
        if comm.any_rank(error is not None):
            previous = complete_checkpoints(self.root)
            kept = f"the previous checkpoint {previous[-1]} is intact" if previous else "no checkpoint was kept"
            raise StorageError(f"could not write checkpoint {final} ({error or 'failed on another rank'}); {kept}, "
                               f"and rerunning resumes from it once there is space")
        comm.barrier()
        if comm.is_main():
            mark_complete(tmp, published_as=final.name)
            shutil.rmtree(final, ignore_errors=True)
            os.replace(tmp, final)
            for old in complete_checkpoints(self.root)[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        comm.barrier()
        if _kill_requested(final) and comm.is_main():
            os.kill(os.getpid(), signal.SIGKILL)  # fault injection (resume tests): preempted right after this save
        return final

    def latest(self) -> Path | None:
        found = complete_checkpoints(self.root) if comm.is_main() else None
        found = comm.broadcast_object(None if not found else str(found[-1]))
        return None if found is None else Path(found)

    def load(self, path: Path, generators: dict[str, torch.Generator]) -> dict:
        """Restore every strategy and this rank's RNG; return the trainer state. Refuses another configuration
        or another world layout (ZeRO partitions and data shards depend on both)."""
        meta = load_state_file(path / "state.pt")
        if meta.get("config_hash") != self.config_hash:
            raise UserError(f"checkpoint {path} was written by a run with a different configuration; resuming it "
                            "would mix two experiments. Use another run directory, or force=true to start afresh")
        if meta.get("layout") != self.layout:
            raise UserError(f"checkpoint {path} was written with {_describe(meta.get('layout'))} but this run has "
                            f"{_describe(self.layout)}; resume with the same world size and strategy, or "
                            "force=true to start afresh")
        for name, strategy in self.strategies.items():
            strategy.load_state(path / name)
        restore_rng(load_state_file(path / f"rng-rank{comm.rank()}.pt"), generators)
        log.info("resumed from %s (step %d)", path, meta["step"])
        return meta["trainer"]


def _describe(layout: dict | None) -> str:
    if not layout:
        return "an unknown layout"
    first = next(iter(layout.values()))
    stage = f"ZeRO-{first['zero_stage']}" if first["backend"] == "deepspeed" else "torch"
    return f"{first['world_size']} process(es), {stage}"


class ResumableLoop:
    """Checkpoints every `every` steps, resume from the newest, and stop on SIGTERM / SIGUSR1, for the plain
    step loops of the SFT and reward-model stages (their checkpoints live beside the stage, outside its
    temporary build directory, so a killed build resumes; the stage removes them once it is published).

        start, extras = loop.start()              # 0, {} on a fresh start; starts the progress report
        for step in range(start + 1, steps + 1):
            ...
            loop.after_step(step, extras)         # checkpoint when due or asked to stop; raises PreemptedError
    """

    def __init__(self, directory: Path | None, strategy, config_hash: str, every: int,
                 generators: dict[str, torch.Generator], batches: GlobalBatches, what: str, steps: int):
        self.every, self.generators, self.batches = every, generators, batches
        self.what, self.steps, self.progress = what, steps, None
        self.checkpoints = None if directory is None else Checkpointer(directory, {"model": strategy}, config_hash)
        self.stop = StopRequest() if directory is not None else None

    def start(self) -> tuple[int, dict]:
        path = None if self.checkpoints is None else self.checkpoints.latest()
        step, extras = 0, {}
        if path is not None:
            state = self.checkpoints.load(path, self.generators)
            self.batches.load_state_dict(state["batches"])
            step, extras = int(path.name.split("-")[1]), state["extras"]
        self.progress = Progress(self.what, self.steps, "step", initial=step)
        return step, extras

    def close(self) -> None:
        if self.progress is not None:
            self.progress.close()
        if self.stop is not None:
            self.stop.close()

    def after_step(self, step: int, extras: dict) -> None:
        self.progress.advance()
        if self.checkpoints is None:
            return
        stopping = self.stop.agreed()
        if stopping or step % self.every == 0:
            state = {"batches": self.batches.state_dict(), "extras": extras}
            self.checkpoints.save(step, state, self.generators)
        if stopping:
            self.stop.stop(step, self.checkpoints.root)


def submitit_signal() -> signal.Signals | None:
    """The signal on which submitit's job process checkpoints its call, requeues the job and exits (USR2 unless
    SUBMITIT_PREEMPT_SIGNAL says otherwise, submitit's own rule): None unless this process runs under submitit
    and submitit's handler is in place."""
    if "SUBMITIT_EXECUTOR" not in os.environ:
        return None
    sig = signal.Signals["SIG" + os.environ.get("SUBMITIT_PREEMPT_SIGNAL", "USR2")]
    return sig if callable(signal.getsignal(sig)) else None


class StopRequest:
    """SIGTERM / SIGUSR1 (what SLURM sends before a time limit or preemption) ask for a checkpoint at the end
    of the current step; ranks agree, since the signal may reach only some of them.

    Under submitit (Hydra's slurm launcher) its preemption signal asks the same. submitit's own handler would
    requeue and exit at once, mid-step, losing every step since the last periodic checkpoint; so it is held back
    and gets the signal only once the run has checkpointed and unwound (PreemptedError.requeue_signal)."""

    def __init__(self):
        self.signal_name: str | None = None
        self.submitit_signal = submitit_signal()
        self._submitit_asked = False
        # dict.fromkeys: SUBMITIT_PREEMPT_SIGNAL may name TERM or USR1 too, and a signal is hooked only once
        signals = dict.fromkeys(s for s in (signal.SIGTERM, signal.SIGUSR1, self.submitit_signal) if s)
        self._previous = {sig: signal.signal(sig, self._request) for sig in signals}

    def close(self) -> None:
        """Hand the signals back (a later phase of the same process installs its own, or dies by default)."""
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)

    def _request(self, signum, _frame) -> None:
        self.signal_name = signal.Signals(signum).name
        self._submitit_asked |= signum == self.submitit_signal
        log.warning("%s received: will checkpoint after the current step and exit", self.signal_name)

    def agreed(self) -> bool:
        return comm.any_rank(self.signal_name is not None)

    def stop(self, step: int, where: Path) -> None:
        self.close()
        # agreed like the stop itself: rank 0 (whose submitit handler alone requeues) may not have received it
        requeue = comm.any_rank(self._submitit_asked)
        then = "submitit requeues the job, which resumes from it" if requeue else "rerun the same command to resume"
        raise PreemptedError(f"received {self.signal_name or 'a stop request on another rank'}: checkpointed at "
                             f"step {step} in {where}; {then}",
                             requeue_signal=self.submitit_signal if requeue else None)
