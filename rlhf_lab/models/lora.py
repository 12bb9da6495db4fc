"""LoRA (peft) on a trained model, and the reference it leaves behind.

With LoRA only the adapters train; the base weights are the starting model's (the SFT model) and never change.
So the reference model is the trained model itself with its adapters switched off: `AdapterOffReference` runs the
same parameters under `peft_model.disable_adapter()`, and a DPO or PPO run holds one copy of the weights instead
of two. Its log-probs equal the base model's exactly (the LoRA layers call their base layer alone).

    policy = wrap_causal_lm(model, cfg.lora, seed)      # a peft model: base frozen, adapters trainable
    reference = AdapterOffReference(policy)             # placed with the policy: `strategy.place` returns it as is
    export_lora(strategy, run_dir, base_dir, tokenizer) # adapter/ (peft format) and model/ (merged HF causal LM)

The reference reaches the policy through the plain module (never its DDP wrapper or DeepSpeed engine), so its
forward neither synchronises gradients nor counts as a policy forward; under ZeRO-3 the module's own hooks gather
the parameters, or the policy's `strategy.generation` has gathered them already.
"""
from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Iterator

import peft
import torch
from torch import nn

from rlhf_lab.config import LoraConfig
from rlhf_lab.distributed import comm
from rlhf_lab.distributed.strategy import unwrap_module
from rlhf_lab.utils.errors import ConfigError

ADAPTER_DIR = "adapter"     # in the run directory: the trained adapter, loadable with peft.PeftModel.from_pretrained
MODEL_DIR = "model"         # the merged model, a plain causal LM for every downstream consumer


def peft_config(cfg: LoraConfig, task_type: str | None) -> peft.LoraConfig:
    """peft's config for the `lora` group. bias="none": a trained bias would survive `disable_adapter` and the
    reference would no longer be the base model."""
    return peft.LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, bias="none",
                           target_modules=None if cfg.target_modules is None else list(cfg.target_modules),
                           task_type=task_type)


def _adapted(build, seed: int):
    """Run `build` with the global RNG seeded (peft draws the adapters' initial A matrices from it) and restored
    afterwards: the initial adapters do not depend on how much randomness the cached or fresh stages used."""
    with torch.random.fork_rng(devices=[]), warnings.catch_warnings():
        # peft sets fan_in_fan_out itself for GPT-2's Conv1D layers and says so; nothing for the user to do
        warnings.filterwarnings("ignore", message="fan_in_fan_out is set to False")
        torch.manual_seed(seed)
        try:
            return build()
        except ValueError as e:   # peft: a target module the architecture does not have, or none by default
            raise ConfigError(f"config key 'lora.target_modules': {e}") from None


def wrap_causal_lm(model: nn.Module, cfg: LoraConfig, seed: int) -> peft.PeftModel:
    """The causal LM with adapters on `cfg.target_modules`: only they require gradients."""
    return _adapted(lambda: peft.get_peft_model(model, peft_config(cfg, "CAUSAL_LM")), seed)


def wrap_scalar_backbone(model: nn.Module, cfg: LoraConfig, seed: int) -> nn.Module:
    """A scalar-head model (the PPO critic) with adapters injected into its backbone in place: the backbone's
    base weights freeze, the head stays trained whole, and the model keeps its class (models/heads.py reads it)."""
    backbone = model.base_model
    _adapted(lambda: peft.inject_adapter_in_model(peft_config(cfg, None), backbone), seed)
    return model


def trainable_parameters(model: nn.Module) -> tuple[int, int]:
    """(trainable, total) parameter counts (full sizes under ZeRO-3, where a rank holds a shard: `ds_numel`)."""
    sizes = [(getattr(p, "ds_numel", p.numel()), p.requires_grad) for p in model.parameters()]
    return sum(n for n, trained in sizes if trained), sum(n for n, _ in sizes)


class AdapterOffReference(nn.Module):
    """The frozen reference of a LoRA model: the same module with its adapters disabled, under no_grad and in eval
    mode. The peft model is a registered submodule so that compute accounting counts its weights; the view never
    moves, freezes or switches the mode of the model it borrows (`to`, `requires_grad_` and `train` act on the
    view alone), and strategies place it as it is (`views_trained_model`)."""

    views_trained_model = True

    def __init__(self, policy: nn.Module):
        super().__init__()
        peft_model = unwrap_module(policy)   # the plain module inside a DDP wrapper or a DeepSpeed engine
        if not isinstance(peft_model, peft.PeftModel):
            raise TypeError(f"AdapterOffReference needs a peft model (wrap_causal_lm), got {type(peft_model).__name__}")
        self.peft_model = peft_model
        self.training = False

    def train(self, mode: bool = True) -> "AdapterOffReference":
        return self

    def requires_grad_(self, requires_grad: bool = True) -> "AdapterOffReference":
        return self

    def to(self, *args, **kwargs) -> "AdapterOffReference":
        return self

    def forward(self, *args, **kwargs):
        model = self.peft_model
        was_training = model.training
        with torch.no_grad(), model.disable_adapter():
            model.eval()
            try:
                # the LoRA model under the PeftModel: the policy's compute-meter hook (on the PeftModel) stays silent
                return model.base_model(*args, **kwargs)
            finally:
                model.train(was_training)


# ------------------------------------------------------------------------------------------------ export
@contextlib.contextmanager
def _gathered(params: list[nn.Parameter]) -> Iterator[None]:
    """Whole values of ZeRO-3-partitioned parameters for reading (collective); plain parameters need nothing."""
    if not any(hasattr(p, "ds_id") for p in params):
        yield
        return
    import deepspeed

    with deepspeed.zero.GatheredParameters(params, modifier_rank=None):
        yield


def adapter_state(model: peft.PeftModel) -> dict[str, torch.Tensor] | None:
    """The adapter's parameters (named as in `model`, which `save_pretrained(state_dict=...)` expects), whole, on
    the CPU, on rank 0 (None elsewhere). Collective: under ZeRO-3 only the adapters are gathered, never the base."""
    named = [(name, p) for name, p in model.named_parameters() if "lora_" in name]
    with _gathered([p for _, p in named]):
        if not comm.is_main():
            return None
        return {name: p.detach().to("cpu", copy=True) for name, p in named}


def merged_model(base_dir: Path, adapter_dir: Path, dtype: torch.dtype = torch.float32) -> nn.Module:
    """The base model (re-read from disk: its weights never changed) with the saved adapter merged into it."""
    from rlhf_lab.models.build import load_causal_lm

    base = load_causal_lm(base_dir, dtype)
    return peft.PeftModel.from_pretrained(base, str(adapter_dir)).merge_and_unload()


def export_lora(strategy, run_dir: Path, base_dir: Path, tokenizer=None) -> None:
    """`run_dir/adapter` (peft format) and `run_dir/model` (the merged HF causal LM that judges and evaluation load
    like any other run's). Collective: every rank calls it; rank 0 writes."""
    model = strategy.unwrap()
    state = adapter_state(model)
    if comm.is_main():
        adapter_dir, model_dir = Path(run_dir) / ADAPTER_DIR, Path(run_dir) / MODEL_DIR
        model.save_pretrained(adapter_dir, state_dict=state, safe_serialization=True)
        merged_model(base_dir, adapter_dir).save_pretrained(model_dir, safe_serialization=True)
        if tokenizer is not None:
            tokenizer.save_pretrained(model_dir)
    comm.barrier()
