"""Scalar-output models: the reward model and the PPO critic.

Both are `AutoModelForSequenceClassification` with `num_labels=1`, built from the SFT causal-LM checkpoint (the
backbone weights are loaded, the head is new) and initialised as in PPO detail 9: head weight ~ N(0, 1/√(d+1)),
bias 0. Dropout is off (detail 3).

Scores are read by our own code — head(backbone hidden states) gathered at positions taken from the attention
mask — never through HF's pooling, which picks the rightmost token whose id differs from pad_token_id (wrong
whenever a real token shares the pad id, and blind to our masks). With the layout of `rlhf_lab.data.batches`:

    input_ids   [ pad pad p1 p2 p3 | c1 c2 c3 eos pad pad ]
    reward      read at the last real token (eos here): input index P + |y| − 1      -> sequence_scores (N,)
    values      completion step j reads the hidden state at input index P + j − 1     -> token_values (N, C)
                (the state that predicts token j, aligned with `models.logprobs.completion_logits`, so values line
                up with per-token log-probs for GAE)
"""
from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForSequenceClassification, PreTrainedModel

from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.distributed.strategy import is_wrapped, unwrap_module
from rlhf_lab.models.build import disable_dropout, remote_code_kwargs
from rlhf_lab.utils.cache import atomic_write_text
from rlhf_lab.utils.errors import UserError

NORMALIZATION_FILE = "reward_normalization.json"
_HEAD_NAMES = ("score", "classifier", "v_head", "value_head")


# ------------------------------------------------------------------------------------------------ build / init
def build_scalar_model(path_or_dir: str | Path, dtype: torch.dtype = torch.float32, *,
                       pad_token_id: int | None = None, init_head: bool = True,
                       seed: int | None = None) -> PreTrainedModel:
    """A num_labels=1 sequence-classification model whose backbone is loaded from a causal-LM checkpoint.

    The head is (re)initialised with `init_scalar_head` unless `init_head=False` (e.g. to load a checkpoint that
    already has a trained head — prefer `load_scalar_model` for that). `pad_token_id` overrides/sets the config's
    pad id; one must be set (HF's model refuses batches otherwise, and our batches are padded).
    """
    from transformers.utils import logging as hf_logging

    previous = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()  # the missing head / unused LM head are expected here; don't alarm the user
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(path_or_dir), num_labels=1, dtype=dtype,
                                                                   **remote_code_kwargs())
    except OSError as e:
        raise UserError(
            f"could not build a scalar (reward/value) model from {str(path_or_dir)!r}: not a local checkpoint and not "
            f"reachable on the hub ({str(e).splitlines()[0]})"
        ) from None
    finally:
        hf_logging.set_verbosity(previous)
    if pad_token_id is not None:
        model.config.pad_token_id = pad_token_id
    if model.config.pad_token_id is None:
        raise UserError(
            f"the checkpoint at {path_or_dir} has no pad_token_id in its config; pass pad_token_id= (the tokenizer's "
            "pad id, distinct from eos)"
        )
    if init_head:
        generator = None if seed is None else torch.Generator().manual_seed(seed)
        init_scalar_head(model, generator)
    disable_dropout(model)
    return model


def find_scalar_head(model: nn.Module) -> nn.Linear:
    """The model's output head: a known attribute (`score` for GPT-2/Llama/…, `classifier`, …) holding a Linear
    with out_features 1, else the single Linear with out_features 1 outside the backbone."""
    model = _unwrap(model)
    for name in _HEAD_NAMES:
        head = getattr(model, name, None)
        if isinstance(head, nn.Linear) and head.out_features == 1:
            return head
    backbone = {id(m) for m in _backbone(model).modules()}
    candidates = [m for m in model.modules()
                  if isinstance(m, nn.Linear) and m.out_features == 1 and id(m) not in backbone]
    if len(candidates) != 1:
        raise ValueError(
            f"{type(model).__name__}: cannot identify the scalar head (found {len(candidates)} Linear layers with one "
            "output outside the backbone); expected a num_labels=1 sequence-classification model"
        )
    return candidates[0]


@torch.no_grad()
def init_scalar_head(model: nn.Module, generator: torch.Generator | None = None) -> nn.Linear:
    """PPO detail 9: head weight ~ N(0, std = 1/√(d+1)) with d the hidden size, bias (if any) 0."""
    from rlhf_lab.distributed.deepspeed_strategy import writable_parameters

    head = find_scalar_head(model)
    d = head.in_features
    # the full (1, d) shape even when ZeRO-3 has partitioned the head (ds_shape), so every rank draws alike
    shape = getattr(head.weight, "ds_shape", head.weight.shape)
    weight = torch.randn(shape, generator=generator, dtype=torch.float32) / math.sqrt(d + 1)
    with writable_parameters([p for p in head.parameters()]):
        head.weight.copy_(weight.to(head.weight.dtype))
        if head.bias is not None:
            head.bias.zero_()
    return head


# ------------------------------------------------------------------------------------------------ scoring
def sequence_scores(model: nn.Module, seqs: SequenceBatch) -> torch.Tensor:
    """Scalar score of each row read at its last real token (from the attention mask): (N,) float32."""
    hidden = _hidden_states(model, seqs)                                          # (N, T, d)
    t = seqs.attention_mask.shape[1]
    positions = torch.arange(t, device=seqs.attention_mask.device)
    last = (positions * (seqs.attention_mask > 0)).argmax(-1)                     # rightmost real token per row
    gathered = hidden[torch.arange(hidden.shape[0], device=hidden.device), last.to(hidden.device)]  # (N, d)
    return find_scalar_head(model)(gathered).squeeze(-1).float()


def token_values(model: nn.Module, seqs: SequenceBatch) -> torch.Tensor:
    """Value at each completion step j, read from the hidden state at input index P+j−1 (the one predicting
    token j, as in `completion_logits`): (N, C) float32. Padding positions hold garbage; the caller masks them."""
    p, c = seqs.prompt_width, seqs.completion_width
    if p < 1:
        raise ValueError("token_values needs at least one prompt column (the state before completion token 0)")
    hidden = _hidden_states(model, seqs)[:, p - 1: p + c - 1]                    # (N, C, d)
    return find_scalar_head(model)(hidden).squeeze(-1).float()


def _hidden_states(model: nn.Module, seqs: SequenceBatch) -> torch.Tensor:
    """Final backbone hidden states (N, T, d) for the batch, positions counting real tokens only."""
    kwargs = {"input_ids": seqs.input_ids, "attention_mask": seqs.attention_mask, "position_ids": seqs.position_ids,
                  "use_cache": False}
    if is_wrapped(model):
        # The forward must go through the DDP wrapper / DeepSpeed engine (gradient synchronisation, ZeRO-3
        # parameter gathering): run the whole model and capture the backbone's output (HF's own pooled logits
        # are computed and ignored — one d×1 matmul).
        captured: dict = {}
        hook = _backbone(unwrap_module(model)).register_forward_hook(
            lambda _m, _i, out: captured.__setitem__("h", out[0] if isinstance(out, tuple) else out.last_hidden_state)
        )
        try:
            model(**kwargs)
        finally:
            hook.remove()
        return captured["h"]
    return _backbone(model)(**kwargs).last_hidden_state


def _backbone(model: nn.Module) -> nn.Module:
    backbone = getattr(model, "base_model", None)
    if backbone is None or backbone is model:
        raise ValueError(f"{type(model).__name__} has no separate backbone (`base_model`); expected an HF "
                         "sequence-classification model")
    return backbone


def _unwrap(model: nn.Module) -> nn.Module:
    return unwrap_module(model)


# ------------------------------------------------------------------------------------------------ save / load
def save_scalar_model(model: nn.Module, tokenizer, directory: str | Path, normalization: dict | None) -> Path:
    """HF checkpoint (`AutoModelForSequenceClassification.from_pretrained(directory)` loads it), the tokenizer,
    and `reward_normalization.json` {gain, bias, fitted_on, …} when a normalisation was fitted."""
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    _unwrap(model).save_pretrained(directory, safe_serialization=True)
    if tokenizer is not None:
        tokenizer.save_pretrained(directory)
    if normalization is not None:
        missing = [k for k in ("gain", "bias") if k not in normalization]
        if missing:
            raise ValueError(f"normalization dict lacks {missing}; expected {{gain, bias, fitted_on}}")
        payload = {"fitted_on": None, **normalization}
        payload["gain"], payload["bias"] = float(payload["gain"]), float(payload["bias"])
        atomic_write_text(directory / NORMALIZATION_FILE, json.dumps(payload, indent=2, sort_keys=True))
    return directory


def load_scalar_model(directory: str | Path, dtype: torch.dtype = torch.float32
                      ) -> tuple[PreTrainedModel, dict | None]:
    """(model in eval mode with dropout off, normalization dict or None when none was saved)."""
    directory = Path(directory)
    try:
        model = AutoModelForSequenceClassification.from_pretrained(str(directory), dtype=dtype, **remote_code_kwargs())
    except OSError as e:
        raise UserError(f"could not load a reward/value model from {str(directory)!r} "
                        f"({str(e).splitlines()[0]})") from None
    if model.config.num_labels != 1:
        raise UserError(f"{directory}: expected a scalar model (num_labels=1), found num_labels="
                        f"{model.config.num_labels}")
    disable_dropout(model)
    model.eval()
    path = directory / NORMALIZATION_FILE
    normalization = json.loads(path.read_text()) if path.is_file() else None
    return model, normalization
