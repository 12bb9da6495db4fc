"""Log-probabilities of completions: one code path for training, reference caching and evaluation.

Batches follow the layout in `rlhf_lab.data.batches` (left-padded prompt, right-padded completion), so only the
last C+1 positions need the LM head (`logits_to_keep`): the logits at input index P+j−1 predict completion
token j. Logits are divided by the sampling temperature before the softmax (PPO detail 2), so that training,
reference and evaluation passes score exactly the distribution that was sampled.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from rlhf_lab.data.batches import SequenceBatch


def completion_logits(model, seqs: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
    """Tempered logits predicting each completion token: (N, C, V), in the model's compute dtype."""
    width = seqs.completion_width
    out = model(
        input_ids=seqs.input_ids,
        attention_mask=seqs.attention_mask,
        position_ids=seqs.position_ids,
        logits_to_keep=width + 1,
        use_cache=False,
    )
    logits = out.logits[:, :-1]  # positions P-1 .. P+C-2 predict completion tokens 0 .. C-1
    return logits / temperature if temperature != 1.0 else logits


def token_logps_from_logits(logits: torch.Tensor, seqs: SequenceBatch) -> torch.Tensor:
    """log π(y_t | x, y_<t) per completion token, 0 on padding: (N, C), float32.

    Uses the fused cross-entropy kernel (log-softmax + gather) in float32 for numerical safety under bf16.
    """
    n, c, v = logits.shape
    targets = seqs.completion_ids
    nll = F.cross_entropy(logits.float().reshape(n * c, v), targets.reshape(n * c), reduction="none")
    return -nll.view(n, c) * seqs.completion_mask


def sequence_logps(model, seqs: SequenceBatch, temperature: float = 1.0) -> torch.Tensor:
    """Σ_t log π(y_t | x, y_<t) over completion tokens only (prompt and padding masked): (N,)."""
    return token_logps_from_logits(completion_logits(model, seqs, temperature), seqs).sum(-1)


@dataclass
class KLTerms:
    sampled: torch.Tensor   # (N,) Σ_t [log π(y_t) − log π_ref(y_t)] on the sampled tokens (unbiased, noisy)
    exact: torch.Tensor     # (N,) Σ_t KL(π(·|x,y_<t) ‖ π_ref(·|x,y_<t)) over the whole vocabulary (≥ 0)
    policy_logps: torch.Tensor  # (N,) Σ_t log π(y_t)


@torch.no_grad()
def sequence_kl(policy, reference, seqs: SequenceBatch, temperature: float = 1.0) -> KLTerms:
    """Sequence-level KL(π‖π_ref) on given samples, two ways (every method's KL is measured this way: one KL for the whole frontier)."""
    pol = torch.log_softmax(completion_logits(policy, seqs, temperature).float(), -1)   # (N, C, V)
    ref = torch.log_softmax(completion_logits(reference, seqs, temperature).float(), -1)
    mask = seqs.completion_mask
    exact = (pol.exp() * (pol - ref)).sum(-1)                                            # (N, C)
    idx = seqs.completion_ids.unsqueeze(-1)
    pol_tok = pol.gather(-1, idx).squeeze(-1)
    ref_tok = ref.gather(-1, idx).squeeze(-1)
    return KLTerms(
        sampled=((pol_tok - ref_tok) * mask).sum(-1),
        exact=(exact * mask).sum(-1),
        policy_logps=(pol_tok * mask).sum(-1),
    )
