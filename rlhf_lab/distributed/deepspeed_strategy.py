"""DeepSpeed ZeRO behind the `Strategy` protocol: stages 0–3, optimizer and parameter offload, bf16 autocast.

Facts this relies on (DeepSpeed 0.19.8, read in its source):
  * `engine.backward(loss)` takes the unscaled loss and divides by gradient_accumulation_steps itself; clipping,
    the optimizer, zero_grad and the lr scheduler run inside `engine.step()` only at accumulation boundaries.
  * `DeepSpeedEngine.forward` disables an outer `torch.autocast` unless the config has a `torch_autocast`
    section, so precision=bf16 maps to that section (fp32 master weights: TorchStrategy's numerics), not to the
    `bf16` section (which casts the parameters themselves).
  * A ZeRO-3 engine without an optimizer (our frozen reference / reward) is a `DeepSpeedZeRoOffload`; its
    forwards are collectives, like the trained engines'.
  * `save_checkpoint` / `load_checkpoint` are collective and keep each rank's optimizer partition; the
    data-parallel world size must match on load, so checkpoints record it (trainers/checkpoint.py).
"""
from __future__ import annotations

import contextlib
import json
import os
import socket
from pathlib import Path
from typing import Iterator

import torch
from torch import nn

from rlhf_lab.distributed import comm
from rlhf_lab.distributed.strategy import StepResult, autocast_context, is_view, resolve_device, unwrap_module
from rlhf_lab.utils.errors import ConfigError

ENGINE_TAG = "engine"


ROLES = ("trained", "reference", "reward")   # a training engine, or the frozen reference / reward eval engine


def deepspeed_config(cfg, *, precision: str, micro_batch_size: int, grad_accum: int, world_size: int,
                     max_grad_norm: float | None, role: str = "trained") -> dict:
    """The DeepSpeed JSON for one engine, from the `strategy` config group (+ an optional user JSON).

    The batch keys are derived here, never taken from the user file: DeepSpeed asserts
    train_batch_size = micro × accumulation × world size, and the trainers own that arithmetic."""
    user = _load_user_json(cfg.config_path) if cfg.config_path else {}
    zero = {"stage": cfg.zero_stage, **user.get("zero_optimization", {})}
    stage = int(zero["stage"])
    if role not in ROLES:
        raise ValueError(f"role must be one of {ROLES}, got {role!r}")
    if role == "trained":
        if cfg.offload_optimizer:
            zero["offload_optimizer"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
        if cfg.offload_param and stage == 3:
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    else:
        # an eval engine: no optimizer state; partitioned only when the trained models are (ZeRO-3)
        zero = {k: v for k, v in zero.items() if k not in ("offload_optimizer", "offload_param")}
        zero["stage"] = 3 if stage == 3 else 0
        if stage == 3 and getattr(cfg, f"{role}_offload_param"):
            zero["offload_param"] = {"device": "cpu", "pin_memory": torch.cuda.is_available()}
    config = {k: v for k, v in user.items() if k not in _DERIVED_KEYS}
    config.update({
        "train_micro_batch_size_per_gpu": micro_batch_size,
        "gradient_accumulation_steps": grad_accum,
        "train_batch_size": micro_batch_size * grad_accum * world_size,
        "zero_optimization": zero,
        # the client optimizer (torch AdamW built from the `optim` group) also runs with optimizer offload:
        # same numerics as TorchStrategy; DeepSpeedCPUAdam is faster on big models (strategy.cpu_adam)
        "zero_force_ds_cpu_optimizer": False,
        "steps_per_print": 10**9,
        "wall_clock_breakdown": False,
    })
    if max_grad_norm:
        config["gradient_clipping"] = float(max_grad_norm)
    if precision == "bf16":
        config["torch_autocast"] = {"enabled": True, "dtype": "bfloat16"}
    return config


_DERIVED_KEYS = ("train_micro_batch_size_per_gpu", "gradient_accumulation_steps", "train_batch_size",
                 "gradient_clipping", "zero_optimization", "optimizer", "scheduler", "fp16", "bf16")


def _load_user_json(path: str) -> dict:
    p = Path(path)
    if not p.is_file():
        raise ConfigError(f"config key 'strategy.config_path': no DeepSpeed JSON at {path!r}")
    try:
        user = json.loads(p.read_text())
    except json.JSONDecodeError as e:
        raise ConfigError(f"strategy.config_path {path!r}: not valid JSON ({e})") from None
    for key in ("optimizer", "scheduler", "fp16", "bf16"):
        if key in user:
            raise ConfigError(f"strategy.config_path {path!r}: key '{key}' is not supported: the optimizer and "
                              "schedule come from the `optim` group, precision from train.precision")
    return user


def ensure_process_group(device_type: str) -> None:
    """DeepSpeed needs a process group even in one process; without RANK/MASTER_* it would try MPI discovery
    (and fail on a missing mpi4py), so a single process gets explicit variables and a free port."""
    import deepspeed

    if torch.distributed.is_initialized():
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)
        return
    if "WORLD_SIZE" not in os.environ:
        os.environ.update({"RANK": "0", "LOCAL_RANK": "0", "WORLD_SIZE": "1", "MASTER_ADDR": "127.0.0.1",
                           "MASTER_PORT": str(_free_port())})
    comm.init_process_group(device_type)
    if not torch.distributed.is_initialized():  # WORLD_SIZE == 1: comm leaves one process alone
        deepspeed.init_distributed(dist_backend="nccl" if device_type == "cuda" else "gloo",
                                   auto_mpi_discovery=False)
    else:
        deepspeed.init_distributed(dist_backend=torch.distributed.get_backend(), auto_mpi_discovery=False)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class DeepSpeedStrategy:
    """One DeepSpeed engine for the trained model; frozen models become eval engines (ZeRO-3) or replicas."""

    def __init__(self, cfg, device: str = "auto", precision: str = "fp32", grad_accum: int = 1,
                 max_grad_norm: float | None = None, micro_batch_size: int = 1):
        self.cfg, self.precision, self.grad_accum = cfg, precision, grad_accum
        self.max_grad_norm, self.micro_batch_size = max_grad_norm, micro_batch_size
        self.device = resolve_device(device)
        ensure_process_group(self.device.type)
        self.world_size, self.rank = comm.world_size(), comm.rank()
        self.zero_stage = int(deepspeed_config(cfg, precision=precision, micro_batch_size=1, grad_accum=1,
                                               world_size=1, max_grad_norm=None)
                              ["zero_optimization"]["stage"])
        self.synced_generation = self.zero_stage == 3 and cfg.generation == "synced"
        self.engine = None

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def model(self):
        return self.engine

    @property
    def optimizer(self):
        return self.engine.optimizer

    def describe(self) -> dict:
        return {"backend": "deepspeed", "zero_stage": self.zero_stage, "world_size": self.world_size,
                "offload_optimizer": bool(self.cfg.offload_optimizer), "offload_param": bool(self.cfg.offload_param)}

    def _config(self, role: str) -> dict:
        return deepspeed_config(self.cfg, precision=self.precision, micro_batch_size=self.micro_batch_size,
                                grad_accum=self.grad_accum, world_size=self.world_size,
                                max_grad_norm=self.max_grad_norm, role=role)

    @contextlib.contextmanager
    def loading(self, role: str = "trained") -> Iterator[None]:
        """`from_pretrained` inside builds ZeRO-3 models already partitioned (transformers runs it under
        `deepspeed.zero.Init` while an `HfDeepSpeedConfig` is alive), so no rank ever holds a whole model: what
        lets a model larger than one device's (or one host's) memory load at all. `role` (trained | reference |
        reward) picks the engine config the model will be placed with (a frozen role may offload its parameters). Function-scoped on
        purpose: a global one would partition every later load too (gold classifiers, judges). Other stages:
        nothing to do, the engine takes a whole model."""
        if self.zero_stage != 3:
            yield
            return
        from transformers.integrations import HfDeepSpeedConfig, unset_hf_deepspeed_config

        hf_config = HfDeepSpeedConfig(self._config(role))  # transformers keeps only a weak reference
        try:
            yield
        finally:
            del hf_config
            unset_hf_deepspeed_config()

    def setup(self, model: nn.Module, optimizer: torch.optim.Optimizer, scheduler=None) -> nn.Module:
        import deepspeed

        _to_device_unless_partitioned(model, self.device)
        self.engine, _, _, _ = deepspeed.initialize(model=model, optimizer=optimizer, lr_scheduler=scheduler,
                                                    config=self._config("trained"))
        self._client_optimizer = optimizer
        return self.engine

    def place(self, model: nn.Module, role: str = "reference") -> nn.Module:
        """Frozen model (`role` reference | reward): a ZeRO-3 eval engine (parameters on the CPU with
        strategy.<role>_offload_param) when the trained models are ZeRO-3, else a replica on this rank's device
        (stage 0/1/2 keep full parameters on every rank anyway)."""
        import deepspeed

        if is_view(model):
            return model
        model.eval().requires_grad_(False)
        if self.zero_stage != 3:
            return model.to(self.device)
        _to_device_unless_partitioned(model, self.device)
        engine, *_ = deepspeed.initialize(model=model, config=self._config(role))
        engine.eval()
        return engine

    def autocast(self):
        return autocast_context(self.device, self.precision)

    def backward(self, loss: torch.Tensor) -> None:
        self.engine.backward(loss)

    def step(self) -> StepResult:
        boundary = self.engine.is_gradient_accumulation_boundary()  # read before step() moves the counter
        self.engine.step()
        if not boundary:
            return StepResult(False, None)
        norm = self.engine.get_global_grad_norm()
        return StepResult(True, None if norm is None else float(norm))

    def unwrap(self, model: nn.Module | None = None) -> nn.Module:
        return unwrap_module(model if model is not None else self.engine)

    def lr(self) -> float:
        return self._client_optimizer.param_groups[0]["lr"]

    @contextlib.contextmanager
    def generation(self, model: nn.Module | None = None) -> Iterator[nn.Module]:
        """Full parameters for a sampling loop. ZeRO-3: gathered once and the hooks dropped for the duration
        (DeepSpeed's unwrap_model_for_generation) — without that, ranks whose samples end early would stop
        calling the collective forwards and the others would hang. With strategy.generation=synced the engine
        itself is yielded and the sampler agrees on "all finished" across ranks instead (no gathering)."""
        model = model if model is not None else self.engine
        if self.zero_stage != 3 or not is_engine(model):
            yield unwrap_module(model)
        elif self.synced_generation:
            yield model
        else:
            from deepspeed.runtime.zero.stage3 import unwrap_model_for_generation

            with unwrap_model_for_generation(model) as engine:
                yield engine.module

    @contextlib.contextmanager
    def modify(self, *models: nn.Module) -> Iterator[None]:
        """Write parameters of `models` in place (the EMA reference). ZeRO-3 gathers them with modifier_rank=0:
        rank 0's values are re-partitioned on exit (with modifier_rank=None DeepSpeed drops the update)."""
        params = [p for m in models for p in unwrap_module(m).parameters()]
        with writable_parameters(params):
            yield

    def save_state(self, directory: Path) -> None:
        """Collective: module, this rank's optimizer partition, scheduler and step counters."""
        self.engine.save_checkpoint(str(directory), tag=ENGINE_TAG, save_latest=False)

    def load_state(self, directory: Path) -> None:
        path, _ = self.engine.load_checkpoint(str(directory), tag=ENGINE_TAG, load_optimizer_states=True,
                                              load_lr_scheduler_states=True)
        if path is None:
            raise FileNotFoundError(f"no DeepSpeed checkpoint '{ENGINE_TAG}' in {directory}")

    def save_hf(self, directory: Path, tokenizer=None) -> None:
        """HF-format export every rank calls. ZeRO-3 consolidates the partitions on rank 0 first (in the module
        dtype: fp32 master weights under autocast), so `from_pretrained` gets the exact trained weights."""
        module = self.unwrap()
        state = self.engine._zero3_consolidated_16bit_state_dict() if self.zero_stage == 3 else None
        if self.is_main:
            module.save_pretrained(directory, state_dict=state, safe_serialization=True)
            if tokenizer is not None:
                tokenizer.save_pretrained(directory)
        comm.barrier()

    save_model = save_hf


def is_partitioned(module: nn.Module) -> bool:
    """True when ZeRO-3 owns the module's parameters (built under zero.Init or wrapped by a stage-3 engine)."""
    return any(hasattr(p, "ds_id") for p in module.parameters())


def _to_device_unless_partitioned(model: nn.Module, device: torch.device) -> None:
    """A model loaded under zero.Init already lives where its config put it (each rank's shard; offloaded
    shards on the CPU): `.to()` on its empty placeholders would be wrong, so only whole models are moved."""
    if not is_partitioned(model):
        model.to(device)


@contextlib.contextmanager
def writable_parameters(params: list) -> Iterator[None]:
    """Write ZeRO-3-partitioned parameters in place (rank 0's values are re-partitioned on exit); plain
    parameters need nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=0):
        yield


def is_engine(model) -> bool:
    from deepspeed import DeepSpeedEngine

    return isinstance(model, DeepSpeedEngine)
