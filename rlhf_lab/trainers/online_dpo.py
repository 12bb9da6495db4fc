"""Online DPO (Guo et al. 2024, "Direct Language Model Alignment from Online AI Feedback") and iterative DPO
(Xu et al. 2023, "Some things are more CRINGE than others"), readable top to bottom:

    every refresh_every steps: the next refresh_every × rollout_batch_size prompts → two samples of each from the
        current policy → the annotator (gold reward, reward model or a judge preset) labels each pair → a buffer
        of refresh_every batches (1 = online: every step trains on pairs its own policy just sampled)
    every step: the next buffered batch → reference log-probs (frozen SFT model) → any paired loss of
        `algos.preference.LOSSES` (offline DPO's `paired_loss`) → one optimiser step

Ties and invalid verdicts are counted, kept in the batch with weight 0 (every rank runs the same forwards) and
never trained on. The buffer is part of the checkpoint, so a resume mid-round trains on the same pairs.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass, replace

import torch

from rlhf_lab.algos.preference import REFERENCE_FREE_LOSSES, LossOutput
from rlhf_lab.config import OnlineDPOConfig, loss_params
from rlhf_lab.data.batches import SequenceBatch, TokenizedPair
from rlhf_lab.data.collate import collate_pairs
from rlhf_lab.distributed import comm
from rlhf_lab.models.logprobs import sequence_logps
from rlhf_lab.rewards.annotators import PairLabels, agreement, labels_from_scores
from rlhf_lab.trainers.dpo import paired_loss
from rlhf_lab.trainers.loop import accumulate, accumulation_steps
from rlhf_lab.trainers.on_policy import OnPolicyRun, OnPolicyTrainer, decode_completions, rows


@dataclass
class LabelledPair:
    prompt_ids: list[int]
    chosen_ids: list[int]        # completion tokens as sampled (EOS included when it was sampled)
    rejected_ids: list[int]
    weight: float                # 1 = decided by the annotator, 0 = tie or invalid (not trained on)


class OnlineDPOTrainer(OnPolicyTrainer):
    def __init__(self, policy, reference, annotator, run: OnPolicyRun, cfg: OnlineDPOConfig, strategy):
        """`policy` is set up by `strategy`; `reference` (the frozen SFT model) is placed by it."""
        super().__init__(run, cfg, policy, strategy, {"policy": strategy})
        self.reference, self.annotator, self.params = reference, annotator, loss_params(cfg)
        self.accum = accumulation_steps(cfg.rollout_batch_size, cfg.micro_batch_size, "algo.rollout_batch_size")
        self.buffer: list[list[LabelledPair]] = []
        self.watch("policy", policy)
        self.watch("reference", reference)
        self.watch("reward", getattr(getattr(annotator, "source", None), "model", None))
        self.round_metrics: dict = {}
        # noisy annotators draw from their own stream (checkpointed with the others): flips do not move sampling
        self.labels_generator = self.generators["labels"] = torch.Generator().manual_seed(
            run.seed + 3 + 1000 * comm.rank())

    def train_step(self) -> dict:
        started = time.perf_counter()
        if not self.buffer:
            self.buffer, self.round_metrics = self.collect(self.cfg.refresh_every)
        batch = self.buffer.pop(0)
        decided = max(sum(p.weight for p in batch), 1.0)
        micro = len(batch) // self.accum
        chunks = [batch[i * micro:(i + 1) * micro] for i in range(self.accum)]
        self.policy.train()
        metrics = accumulate(self.policy_strategy, chunks, lambda chunk: self._loss(chunk, decided), "train")
        self.policy.eval()
        return {**metrics, **self.round_metrics,
                "train/pairs_per_s": self.cfg.rollout_batch_size / (time.perf_counter() - started)}

    # ------------------------------------------------------------------------------------------------ labels
    def collect(self, rounds: int) -> tuple[list[list[LabelledPair]], dict]:
        """Sample two completions of each of the next rounds × rollout_batch_size prompts (this rank's share),
        label them, and cut them into `rounds` batches in prompt order."""
        prompts = self.next_prompts(rounds * self.cfg.rollout_batch_size)
        seqs, _, texts = self.sample(prompts, per_prompt=2)
        completions = decode_completions(self.tokenizer, seqs)
        first, second = rows(seqs, slice(0, None, 2)), rows(seqs, slice(1, None, 2))
        labels = self.annotator.label(texts[::2], completions[::2], completions[1::2], first, second)
        if self.cfg.annotator_flip_rate > 0:
            labels = flip_labels(labels, self.cfg.annotator_flip_rate, self.labels_generator)
        identical = torch.tensor([a == b for a, b in zip(completions[::2], completions[1::2])])
        decided = labels.decided & ~identical     # two equal texts carry no preference, whatever the annotator says
        pairs = []
        for i, prompt_ids in enumerate(prompts.ids):
            a, b = _ids(first, i), _ids(second, i)
            chosen, rejected = (a, b) if labels.first_wins[i] else (b, a)
            pairs.append(LabelledPair(prompt_ids, chosen, rejected, float(decided[i])))
        size = len(pairs) // rounds
        return [pairs[r * size:(r + 1) * size] for r in range(rounds)], self._label_metrics(
            labels, decided, identical, texts[::2], completions)

    def _label_metrics(self, labels: PairLabels, decided, identical, prompts, completions) -> dict:
        """Counts summed over ranks; the annotator's agreement with the gold reward and the samples' gold."""
        counts = comm.all_reduce_sum(torch.tensor([float(len(prompts)), float(decided.sum()), float(labels.ties),
                                                   float(labels.invalid), float(identical.sum())]))
        metrics = {"annotator/pairs": int(counts[0]), "annotator/decided": int(counts[1]),
                   "annotator/ties": int(counts[2]), "annotator/invalid": int(counts[3]),
                   "annotator/identical_pairs": int(counts[4])}
        gold = self.run.gold
        if gold is not None:
            scores = torch.as_tensor(gold.score([p + c for p, c in zip([t for t in prompts for _ in range(2)],
                                                                       completions)]), dtype=torch.float64)
            gold_labels = labels_from_scores(scores[0::2], scores[1::2])
            share, n = agreement(PairLabels(labels.first_wins, decided, 0, 0), gold_labels)
            agree = comm.all_reduce_sum(torch.tensor([0.0 if n == 0 else share * n, float(n)]))
            metrics["annotator/gold_agreement"] = float(agree[0] / agree[1]) if agree[1] > 0 else None
            metrics["objective/gold"] = float(comm.all_reduce_mean(scores.mean()))
        return metrics

    # ------------------------------------------------------------------------------------------------ loss
    def _loss(self, chunk: list[LabelledPair], decided: float) -> tuple[torch.Tensor, dict]:
        items = [TokenizedPair(p.prompt_ids, p.chosen_ids, p.rejected_ids, i) for i, p in enumerate(chunk)]
        batch = collate_pairs(items, self.tokenizer.pad_token_id).to(self.device)
        if self.cfg.loss_type not in REFERENCE_FREE_LOSSES:
            with torch.no_grad():
                batch.reference_logps = sequence_logps(self.reference, batch.sequences)
        out, _ = paired_loss(self.policy, batch, self.cfg.loss_type, self.params)
        weights = torch.tensor([p.weight for p in chunk], device=out.losses.device, dtype=out.losses.dtype)
        # Σ w·ℓ over the rank's decided pairs, divided by their number (accumulate divides by accum again)
        loss = (out.losses * weights).sum() * self.accum / decided
        return loss, {"train/loss": float(loss.detach()), **_decided_metrics(out, weights > 0)}

    # ------------------------------------------------------------------------------------------------ resume
    def extra_state(self) -> dict:
        return {"buffer": [[asdict(p) for p in batch] for batch in self.buffer], "round_metrics": self.round_metrics}

    def load_extra_state(self, state: dict) -> None:
        self.buffer = [[LabelledPair(**p) for p in batch] for batch in state["buffer"]]
        self.round_metrics = state["round_metrics"]


def flip_labels(labels: PairLabels, rate: float, generator: torch.Generator) -> PairLabels:
    """Each label flipped with probability `rate` (a Bernoulli draw per pair; undecided pairs stay undecided)."""
    flip = torch.rand(len(labels.first_wins), generator=generator) < rate
    return replace(labels, first_wins=labels.first_wins ^ flip)


def _ids(seqs: SequenceBatch, i: int) -> list[int]:
    """Row i's completion tokens (padding removed)."""
    return [t for t, m in zip(seqs.completion_ids[i].tolist(), seqs.completion_mask[i].tolist()) if m]


def _decided_metrics(out: LossOutput, keep: torch.Tensor) -> dict[str, float]:
    """TRL's reward metrics over the pairs that were trained on; the same keys on every rank and micro-batch
    (they are averaged across both), 0 when none were trained on."""
    if not bool(keep.any()):
        return dict.fromkeys(("train/rewards/chosen", "train/rewards/rejected", "train/rewards/accuracies",
                              "train/rewards/margins"), 0.0)
    chosen, rejected = out.chosen_rewards[keep].double(), out.rejected_rewards[keep].double()
    return {"train/rewards/chosen": float(chosen.mean()), "train/rewards/rejected": float(rejected.mean()),
            "train/rewards/accuracies": float((chosen > rejected).double().mean()),
            "train/rewards/margins": float((chosen - rejected).mean())}
