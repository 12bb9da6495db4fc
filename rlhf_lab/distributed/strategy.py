"""The one object a training loop talks to for device placement, precision, backward, stepping and saving.

Its semantics follow DeepSpeed's engine so a DeepSpeed strategy can drop in without touching trainers:
the loop calls `backward(loss)` and `step()` once per micro-batch; the strategy scales the loss for gradient
accumulation, and clips, steps the optimizer and scheduler, and zeroes gradients only at accumulation boundaries.
Distributed (DDP) state is read from the usual RANK / WORLD_SIZE variables; everything else is single-process.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    return torch.device(name)


@dataclass
class StepResult:
    stepped: bool              # True at an accumulation boundary (an optimizer step happened)
    grad_norm: float | None    # global gradient norm before clipping, at boundaries


class TorchStrategy:
    """Plain PyTorch: one process (CPU or one GPU); DDP when launched with torchrun (WORLD_SIZE > 1)."""

    def __init__(self, device: str = "auto", precision: str = "fp32", grad_accum: int = 1,
                 max_grad_norm: float | None = None):
        self.world_size = int(os.environ.get("WORLD_SIZE", "1"))
        self.rank = int(os.environ.get("RANK", "0"))
        self.device = resolve_device(device)
        if self.world_size > 1 and self.device.type == "cuda":
            self.device = torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
        self.precision = precision
        self.grad_accum = grad_accum
        self.max_grad_norm = max_grad_norm
        self._micro = 0
        self.model: nn.Module | None = None
        self.optimizer: torch.optim.Optimizer | None = None
        self.scheduler = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> nn.Module:
        """Place the trained model and take ownership of its optimizer and scheduler."""
        model.to(self.device)
        if self.world_size > 1:
            if not torch.distributed.is_initialized():
                torch.distributed.init_process_group("nccl" if self.device.type == "cuda" else "gloo")
            model = nn.parallel.DistributedDataParallel(model)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model

    def place(self, model: nn.Module) -> nn.Module:
        """Place a frozen model (reference, reward). A later strategy may offload or shard it instead."""
        return model.to(self.device)

    def autocast(self):
        if self.precision == "bf16":
            return torch.autocast(device_type=self.device.type, dtype=torch.bfloat16)
        return contextlib.nullcontext()

    def backward(self, loss: torch.Tensor) -> None:
        (loss / self.grad_accum).backward()

    def step(self) -> StepResult:
        self._micro += 1
        if self._micro % self.grad_accum != 0:
            return StepResult(False, None)
        params = [p for p in self.model.parameters() if p.grad is not None]
        max_norm = self.max_grad_norm if self.max_grad_norm else float("inf")
        norm = torch.nn.utils.clip_grad_norm_(params, max_norm)
        self.optimizer.step()
        if self.scheduler is not None:
            self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        return StepResult(True, float(norm))

    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        model = model if model is not None else self.model
        return model.module if isinstance(model, nn.parallel.DistributedDataParallel) else model

    def all_reduce_mean(self, value: torch.Tensor) -> torch.Tensor:
        if self.world_size > 1:
            value = value.clone()
            torch.distributed.all_reduce(value)
            value /= self.world_size
        return value

    def barrier(self) -> None:
        if self.world_size > 1:
            torch.distributed.barrier()

    def save_model(self, directory: Path, tokenizer=None) -> None:
        """HF-format checkpoint (rank 0); `AutoModelForCausalLM.from_pretrained(directory)` loads it."""
        if self.is_main:
            self.unwrap().save_pretrained(directory, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        self.barrier()

    def state_dict(self) -> dict:
        return {
            "model": self.unwrap().state_dict(),
            "optimizer": self.optimizer.state_dict(),
            "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
            "micro_step": self._micro,
        }

    def load_state_dict(self, state: dict) -> None:
        self.unwrap().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro_step"]


def make_strategy(device: str, precision: str, grad_accum: int, max_grad_norm: float | None) -> TorchStrategy:
    return TorchStrategy(device=device, precision=precision, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
