"""Process-level collectives: who am I, how many of us, and the few reductions trainers need.

Every function is a no-op (or the identity) in a single process, so trainers call them unconditionally and read
the same at any world size. The process group is created once, by `init_process_group`, from the variables
torchrun / `srun` set (RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT); nothing here imports DeepSpeed.

Rules every caller keeps (a collective that one rank skips hangs the others):
  * a decision that ends or skips work (abort on a non-finite loss, a stop signal, "is this stage built?") is
    agreed with `any_rank` / `broadcast_object` before anyone acts on it;
  * no collective runs while holding a file lock that another rank of the same job could be waiting on.
"""
from __future__ import annotations

import datetime
import os
from typing import Any

import torch
import torch.distributed as dist

# A stage built by rank 0 while the other ranks wait in a collective can take long (an SFT stage on a big model):
# the default 30-minute timeout would kill healthy jobs. Override with RLHF_LAB_DIST_TIMEOUT_MIN.
DEFAULT_TIMEOUT_MIN = 180


def world_size() -> int:
    return dist.get_world_size() if dist.is_initialized() else int(os.environ.get("WORLD_SIZE", "1"))


def rank() -> int:
    return dist.get_rank() if dist.is_initialized() else int(os.environ.get("RANK", "0"))


def local_rank() -> int:
    return int(os.environ.get("LOCAL_RANK", "0"))


def is_main() -> bool:
    return rank() == 0


def adopt_submitit_env() -> None:
    """Hydra's slurm launcher (submitit) with tasks_per_node > 1 runs the app once per SLURM task without setting
    torch's variables: take RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR / MASTER_PORT from the job (submitit's
    own helper: the first node of the allocation, a port derived from the job id)."""
    if "WORLD_SIZE" in os.environ or "SUBMITIT_EXECUTOR" not in os.environ:
        return
    if int(os.environ.get("SLURM_NTASKS", "1")) <= 1:
        return
    from submitit.helpers import TorchDistributedEnvironment

    TorchDistributedEnvironment().export(set_cuda_visible_devices=False)


def init_process_group(device_type: str) -> None:
    """Create the default process group when launched with WORLD_SIZE > 1 (gloo on CPU, nccl on CUDA)."""
    adopt_submitit_env()
    if dist.is_initialized() or int(os.environ.get("WORLD_SIZE", "1")) <= 1:
        return
    missing = [k for k in ("RANK", "MASTER_ADDR", "MASTER_PORT") if k not in os.environ]
    if missing:
        from rlhf_lab.utils.errors import UserError

        raise UserError(f"WORLD_SIZE={os.environ['WORLD_SIZE']} but {', '.join(missing)} not set: launch with "
                        "`torchrun --nproc_per_node N -m rlhf_lab.cli ...` or `srun` through slurm/array.sbatch")
    if device_type == "cuda":
        torch.cuda.set_device(local_rank())
    minutes = int(os.environ.get("RLHF_LAB_DIST_TIMEOUT_MIN", DEFAULT_TIMEOUT_MIN))
    dist.init_process_group("nccl" if device_type == "cuda" else "gloo",
                            timeout=datetime.timedelta(minutes=minutes))


def shutdown() -> None:
    """Tear the process group down before the interpreter exits: a process that exits with gloo's (or NCCL's)
    threads still alive can abort on its way out ("terminate called without an active exception", SIGABRT) and
    turn a finished run into a failed launch."""
    if dist.is_available() and dist.is_initialized():
        dist.destroy_process_group()


def barrier() -> None:
    if world_size() > 1:
        dist.barrier()


def all_reduce_sum(value: torch.Tensor) -> torch.Tensor:
    """Sum over ranks (a new tensor; the input is untouched)."""
    if world_size() == 1:
        return value
    out = value.detach().clone()
    dist.all_reduce(out, op=dist.ReduceOp.SUM)
    return out


def all_reduce_mean(value: torch.Tensor) -> torch.Tensor:
    return all_reduce_sum(value) / world_size() if world_size() > 1 else value


def mean_over_ranks(metrics: dict[str, float | None]) -> dict[str, float | None]:
    """Average a dict of scalar metrics over ranks in one collective (every rank must pass the same keys;
    None stays None)."""
    if world_size() == 1:
        return metrics
    keys = sorted(k for k, v in metrics.items() if v is not None)
    summed = all_reduce_sum(torch.tensor([float(metrics[k]) for k in keys], dtype=torch.float64))
    out = dict(metrics)
    out.update({k: float(v) / world_size() for k, v in zip(keys, summed.tolist())})
    return out


def any_rank(flag: bool) -> bool:
    """True on every rank if it is True on any rank: how aborts and stop requests are agreed."""
    if world_size() == 1:
        return flag
    return bool(all_reduce_sum(torch.tensor([1.0 if flag else 0.0]))[0] > 0)


def all_gather_object(obj: Any) -> list[Any]:
    """Every rank's `obj`, in rank order (picklable objects; for metadata and small per-sample records)."""
    if world_size() == 1:
        return [obj]
    out: list[Any] = [None] * world_size()
    dist.all_gather_object(out, obj)
    return out


def broadcast_object(obj: Any, src: int = 0) -> Any:
    """Rank `src`'s `obj` on every rank."""
    if world_size() == 1:
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def shard(items: list, rank_: int | None = None, world: int | None = None) -> list:
    """This rank's share of `items`: rows i with i % world == rank (shares differ in length by at most one)."""
    r = rank() if rank_ is None else rank_
    w = world_size() if world is None else world
    return items[r::w]


def unshard(shares: list[list]) -> list:
    """Inverse of `shard` over all ranks' shares (in rank order): the original order back."""
    out: list = []
    longest = max((len(s) for s in shares), default=0)
    for i in range(longest):
        out.extend(s[i] for s in shares if i < len(s))
    return out
