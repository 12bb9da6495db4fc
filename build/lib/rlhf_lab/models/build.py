"""Build causal LMs from config: a hub name, a local path, or `from_config` for tiny models trained here."""
from __future__ import annotations

from pathlib import Path

import torch
from torch import nn
from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer, PreTrainedModel, PreTrainedTokenizerBase

from rlhf_lab.config import ModelConfig
from rlhf_lab.utils.errors import UserError

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}

# transformers runs a checkpoint's own Python files (its `auto_map`) only with trust_remote_code=True. It stays off
# unless the run's config sets model.trust_remote_code=true (`allow_remote_code`, called where a run or a study's
# stages start), and is passed explicitly to every load, so nothing is executed or prompted for by default.
_trust_remote_code = False


def allow_remote_code(enabled: bool) -> None:
    global _trust_remote_code
    _trust_remote_code = bool(enabled)


def remote_code_kwargs() -> dict:
    return {"trust_remote_code": _trust_remote_code}


def _loading_error(what: str, where: str | Path, e: Exception) -> UserError:
    first = str(e).splitlines()[0] if str(e) else type(e).__name__
    if "trust_remote_code" in str(e):
        return UserError(f"{where}: this {what} ships its own Python code, which runs only with "
                         f"model.trust_remote_code=true; set it if you trust the model's source ({first})")
    return UserError(f"could not load a {what} from {str(where)!r}: not a local checkpoint and not reachable on the "
                     f"hub ({first})")


def disable_dropout(model: nn.Module) -> None:
    """Dropout makes log-prob ratios noisy: off in every role (PPO detail 3, TRL's disable_dropout)."""
    for module in model.modules():
        if isinstance(module, nn.Dropout):
            module.p = 0.0


def load_tokenizer(path: str | Path) -> PreTrainedTokenizerBase:
    try:
        tok = AutoTokenizer.from_pretrained(str(path), **remote_code_kwargs())
    except (OSError, ValueError) as e:
        raise _loading_error("tokenizer", path, e) from None
    if tok.pad_token_id is None:
        raise UserError(f"tokenizer at {path} has no pad token; set one distinct from eos ({tok.eos_token!r})")
    tok.padding_side = "left"
    return tok


def build_causal_lm(cfg: ModelConfig, tokenizer: PreTrainedTokenizerBase, seed: int) -> PreTrainedModel:
    """A fresh model from `cfg.config` (seeded init) or pretrained weights from `cfg.name_or_path`."""
    dtype = DTYPES[cfg.dtype]
    if cfg.name_or_path is not None:
        return load_causal_lm(cfg.name_or_path, dtype)
    special = dict(
        vocab_size=len(tokenizer), bos_token_id=tokenizer.bos_token_id,
        eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id,
    )
    config = AutoConfig.for_model(cfg.arch, **dict(cfg.config), **special)   # a built-in architecture: no remote code
    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=dtype)
    disable_dropout(model)
    return model


def load_causal_lm(name_or_path: str | Path, dtype: torch.dtype = torch.float32) -> PreTrainedModel:
    try:
        model = AutoModelForCausalLM.from_pretrained(str(name_or_path), dtype=dtype, **remote_code_kwargs())
    except (OSError, ValueError) as e:
        raise _loading_error("causal LM", name_or_path, e) from None
    disable_dropout(model)
    return model


def freeze(model: PreTrainedModel) -> PreTrainedModel:
    """A reference / reward role: eval mode, no gradients (in place)."""
    model.eval()
    model.requires_grad_(False)
    return model


def frozen_copy(model: PreTrainedModel) -> PreTrainedModel:
    """A frozen deep copy of an in-memory model. Never of a ZeRO-3-partitioned one (its parameters are empty
    placeholders): the recipes load frozen roles afresh with `freeze(load_causal_lm(...))` instead."""
    import copy

    return freeze(copy.deepcopy(model))


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())
