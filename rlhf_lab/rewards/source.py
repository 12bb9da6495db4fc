"""Where PPO's score comes from, behind one interface: the learned reward model (PPO), the task's gold reward
(PPO-GT, as in the DPO paper), or any user callable `(prompts, completions) -> scores`.

Every source returns float64 scores (B,) and may return NaN/inf; the trainer counts those and excludes the
episodes from the update instead of letting them corrupt training.
"""
from __future__ import annotations

import importlib
from typing import Callable, Optional, Protocol, Sequence

import numpy as np
import torch

from rlhf_lab.algos.reward import normalize_rewards
from rlhf_lab.data.batches import SequenceBatch
from rlhf_lab.data.collate import collate_sequences
from rlhf_lab.utils.errors import ConfigError


class RewardSource(Protocol):
    name: str

    def score(self, prompts: Sequence[str], completions: Sequence[str], seqs: SequenceBatch) -> torch.Tensor:
        """(B,) float64 scores of prompt + completion; `seqs` are the policy's tokens (same rows)."""


class GoldRewardSource:
    """The task's gold reward on the decoded text (PPO-GT), optionally as gain·gold + bias: `normalization`
    fitted on SFT samples as the learned reward model's is (mean 0, std 1), so PPO and PPO-GT penalties weigh
    the same against their rewards and one KL-coefficient grid serves both."""

    def __init__(self, gold, normalization: Optional[dict] = None):
        self.gold, self.name, self.normalization = gold, f"gold:{gold.name}", normalization

    def score(self, prompts, completions, seqs):
        raw = torch.as_tensor(self.gold.score([p + c for p, c in zip(prompts, completions)]), dtype=torch.float64)
        if self.normalization is None:
            return raw
        return normalize_rewards(raw, self.normalization["gain"], self.normalization["bias"])


class CallableRewardSource:
    """A user function `module:function` taking (prompts, completions) and returning B numbers."""

    def __init__(self, spec: str, key: str = "algo.reward_callable"):
        self.name = f"callable:{spec}"
        self.fn = load_callable(spec, key)

    def score(self, prompts, completions, seqs):
        out = np.asarray(self.fn(list(prompts), list(completions)), dtype=np.float64).reshape(-1)
        if out.shape[0] != len(prompts):
            raise ValueError(f"reward callable {self.name} returned {out.shape[0]} scores for {len(prompts)} rows")
        return torch.from_numpy(out)


class LearnedRewardSource:
    """A scalar-head reward model. If its tokenizer differs from the policy's, the text is re-tokenised with the
    reward model's own tokenizer (never fed foreign token ids)."""

    def __init__(self, model, tokenizer, policy_tokenizer, normalization: Optional[dict], device,
                 apply_normalization: bool = True, batch_size: int = 64):
        from rlhf_lab.models.heads import sequence_scores

        self._scores = sequence_scores
        self.model, self.tokenizer, self.device, self.batch_size = model.eval(), tokenizer, device, batch_size
        self.same_tokenizer = tokenizer.get_vocab() == policy_tokenizer.get_vocab()
        norm = normalization if (apply_normalization and normalization) else {"gain": 1.0, "bias": 0.0}
        self.gain, self.bias = float(norm["gain"]), float(norm["bias"])
        self.name = "reward_model"

    @torch.no_grad()
    def score(self, prompts, completions, seqs):
        if seqs is None or not self.same_tokenizer:   # text only (e.g. relabelling stored pairs)
            seqs = self._retokenize(prompts, completions)
        out = []
        for start in range(0, len(seqs), self.batch_size):
            chunk = SequenceBatch(seqs.input_ids[start:start + self.batch_size],
                                  seqs.attention_mask[start:start + self.batch_size],
                                  seqs.completion_mask[start:start + self.batch_size], seqs.prompt_width)
            out.append(self._scores(self.model, chunk.to(self.device)).double().cpu())
        return torch.cat(out) * self.gain + self.bias

    def _retokenize(self, prompts, completions) -> SequenceBatch:
        tok = self.tokenizer
        p_ids = [tok(p, add_special_tokens=False)["input_ids"] for p in prompts]
        c_ids = [tok(c, add_special_tokens=False)["input_ids"] + [tok.eos_token_id] for c in completions]
        return collate_sequences(p_ids, c_ids, tok.pad_token_id)


def load_callable(spec: str, key: str = "algo.reward_callable") -> Callable:
    """The function `module:function` names; `key` is the config key that named it (for the error)."""
    module_name, _, attr = spec.partition(":")
    if not module_name or not attr:
        raise ConfigError(f"{key}: expected 'module:function', got {spec!r}")
    try:
        fn = getattr(importlib.import_module(module_name), attr)
    except (ImportError, AttributeError) as e:
        raise ConfigError(f"{key}: cannot load {spec!r}: {e}") from None
    if not callable(fn):
        raise ConfigError(f"{key}: {spec!r} is not callable")
    return fn
