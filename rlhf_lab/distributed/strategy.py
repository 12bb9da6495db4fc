"""The one object a training loop talks to for placement, precision, backward, stepping, generation and saving.

`Strategy` is the protocol; `TorchStrategy` (one process, or DDP under torchrun) and `DeepSpeedStrategy` (ZeRO
0–3 with offload, `distributed/deepspeed_strategy.py`) implement it with DeepSpeed-engine semantics, so trainers
never branch on the backend:

    model = strategy.setup(model, optimizer, scheduler)    # the trained model (DDP module / DeepSpeed engine)
    frozen = strategy.place(reference)                      # a frozen model (replica / ZeRO-3 eval engine)
    with strategy.autocast(): loss = ...                    # the same precision in every pass
    strategy.backward(loss); result = strategy.step()       # once per micro-batch: the *unscaled* loss; clip,
                                                            # optimizer, scheduler and zero_grad at boundaries
    with strategy.generation(model) as module: sample(...)  # full parameters for a sampling loop
    strategy.save_state(dir) / load_state(dir)              # collective: every rank calls them
    strategy.save_hf(dir, tokenizer)                        # collective HF export (rank 0 writes)

One strategy instance owns one trained model (PPO makes one for the actor and one for the critic).
"""
from __future__ import annotations

import contextlib
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator, Protocol

import torch
from torch import nn

from rlhf_lab.distributed import comm
from rlhf_lab.utils.cache import load_state_file


def resolve_device(name: str) -> torch.device:
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name.startswith("cuda") and not torch.cuda.is_available():
        raise RuntimeError(f"train.device={name!r} but CUDA is not available on this machine")
    device = torch.device(name)
    if device.type == "cuda" and comm.world_size() > 1:
        device = torch.device("cuda", comm.local_rank())  # one GPU per process
    return device


def unwrap_module(model: nn.Module) -> nn.Module:
    """The plain model inside a DDP wrapper or a DeepSpeed engine (both keep it in `.module`)."""
    while isinstance(getattr(model, "module", None), nn.Module):
        model = model.module
    return model


def is_wrapped(model: nn.Module) -> bool:
    return unwrap_module(model) is not model


def is_view(model: nn.Module) -> bool:
    """A frozen role that runs a trained model's own parameters (LoRA's adapters-off reference, models/lora.py):
    the trained model's strategy has placed them, so `place` returns it as it is (moving it again, or a second
    ZeRO-3 engine around the same parameters, would be wrong)."""
    return bool(getattr(model, "views_trained_model", False))


@dataclass
class StepResult:
    stepped: bool              # True at an accumulation boundary (an optimizer step happened)
    grad_norm: float | None    # global gradient norm before clipping, at boundaries (None when not available)


class Strategy(Protocol):
    device: torch.device
    precision: str
    grad_accum: int
    synced_generation: bool    # True: sampling forwards are collective, every rank must run the same number

    @property
    def is_main(self) -> bool: ...
    def describe(self) -> dict: ...
    def loading(self, role: str = "trained") -> contextlib.AbstractContextManager: ...
    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> nn.Module: ...
    def place(self, model: nn.Module, role: str = "reference") -> nn.Module: ...
    def autocast(self) -> contextlib.AbstractContextManager: ...
    def backward(self, loss: torch.Tensor) -> None: ...
    def step(self) -> StepResult: ...
    def unwrap(self, model: nn.Module | None = None) -> nn.Module: ...
    def lr(self) -> float: ...
    def generation(self, model: nn.Module | None = None) -> contextlib.AbstractContextManager: ...
    def modify(self, *models: nn.Module) -> contextlib.AbstractContextManager: ...
    def save_state(self, directory: Path) -> None: ...
    def load_state(self, directory: Path) -> None: ...
    def save_hf(self, directory: Path, tokenizer=None) -> None: ...


def autocast_context(device: torch.device, precision: str):
    """bf16 autocast (fp32 master weights) or nothing: used by both strategies for every pass."""
    if precision == "bf16":
        return torch.autocast(device_type=device.type, dtype=torch.bfloat16)
    return contextlib.nullcontext()


class TorchStrategy:
    """Plain PyTorch: one process (CPU or one GPU); DDP when launched with torchrun (WORLD_SIZE > 1)."""

    synced_generation = False

    def __init__(self, device: str = "auto", precision: str = "fp32", grad_accum: int = 1,
                 max_grad_norm: float | None = None):
        comm.init_process_group(resolve_device(device).type)
        self.world_size, self.rank = comm.world_size(), comm.rank()
        self.device = resolve_device(device)
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

    def describe(self) -> dict:
        return {"backend": "torch", "zero_stage": 0, "world_size": self.world_size}

    def loading(self, role: str = "trained") -> contextlib.AbstractContextManager:
        """Models are loaded whole on every rank (DDP keeps full replicas anyway)."""
        return contextlib.nullcontext()

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> nn.Module:
        """Place the trained model and take ownership of its optimizer and scheduler."""
        model.to(self.device)
        if self.world_size > 1:
            model = nn.parallel.DistributedDataParallel(model)
        self.model, self.optimizer, self.scheduler = model, optimizer, scheduler
        return model

    def place(self, model: nn.Module, role: str = "reference") -> nn.Module:
        """A frozen model (role reference | reward): a replica on this rank's device."""
        if is_view(model):
            return model
        return model.to(self.device).eval().requires_grad_(False)

    def autocast(self):
        return autocast_context(self.device, self.precision)

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
        return unwrap_module(model if model is not None else self.model)

    def lr(self) -> float:
        return self.optimizer.param_groups[0]["lr"]

    @contextlib.contextmanager
    def generation(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Every rank holds full parameters already: the plain module, without the DDP wrapper."""
        yield self.unwrap(model)

    @contextlib.contextmanager
    def modify(self, *models: nn.Module) -> Iterator[None]:
        """Write parameters of `models` in place (EMA): replicas are identical, every rank applies the update."""
        yield

    def save_state(self, directory: Path) -> None:
        """Collective; DDP replicas are identical, so rank 0 writes one file (and a failed write still reaches
        the barrier, so the caller can agree on the failure across ranks)."""
        try:
            if self.is_main:
                state = {"model": self.unwrap().state_dict(), "optimizer": self.optimizer.state_dict(),
                         "scheduler": None if self.scheduler is None else self.scheduler.state_dict(),
                         "micro_step": self._micro}
                torch.save(state, Path(directory) / "torch_state.pt")
        finally:
            comm.barrier()

    def load_state(self, directory: Path) -> None:
        state = load_state_file(Path(directory) / "torch_state.pt", map_location=self.device)
        self.unwrap().load_state_dict(state["model"])
        self.optimizer.load_state_dict(state["optimizer"])
        if self.scheduler is not None and state["scheduler"] is not None:
            self.scheduler.load_state_dict(state["scheduler"])
        self._micro = state["micro_step"]

    def save_hf(self, directory: Path, tokenizer=None) -> None:
        """HF-format checkpoint (rank 0); `AutoModelForCausalLM.from_pretrained(directory)` loads it."""
        if self.is_main:
            self.unwrap().save_pretrained(directory, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        comm.barrier()

    # kept for callers that predate save_hf
    save_model = save_hf


def make_strategy(strategy_cfg, device: str, precision: str, grad_accum: int, max_grad_norm: float | None,
                  micro_batch_size: int = 1) -> Strategy:
    """The strategy the `strategy` config group selects, for one trained model.

    micro_batch_size (rows per forward on one rank) only matters to DeepSpeed, whose config asserts
    train_batch_size = micro × accumulation × world size."""
    name = "torch" if strategy_cfg is None else strategy_cfg.name
    if name == "torch":
        return TorchStrategy(device=device, precision=precision, grad_accum=grad_accum, max_grad_norm=max_grad_norm)
    from rlhf_lab.distributed.deepspeed_strategy import DeepSpeedStrategy

    return DeepSpeedStrategy(strategy_cfg, device=device, precision=precision, grad_accum=grad_accum,
                             max_grad_norm=max_grad_norm, micro_batch_size=micro_batch_size)
