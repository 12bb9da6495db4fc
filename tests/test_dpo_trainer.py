"""The DPO trainer in-process on a tiny model: the reference never changes, the loss moves the policy toward the
chosen completions, gradient accumulation and bf16 autocast work, and a NaN loss stops the run."""
from __future__ import annotations

import copy
import csv

import pytest
import torch

from rlhf_lab.config import AlgoConfig, BudgetConfig, EvalConfig, LoggerConfig, OptimConfig, TrainConfig
from rlhf_lab.data.batches import TokenizedPair
from rlhf_lab.data.collate import collate_pairs
from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.eval.points import PointsWriter, RunIdentity
from rlhf_lab.models.build import frozen_copy
from rlhf_lab.models.logprobs import sequence_logps
from rlhf_lab.tracking.logger import RunLogger
from rlhf_lab.trainers.compute import matmul_weights
from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer, NonFiniteLossError


def make_pairs(n: int) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(0)
    pairs = []
    for i in range(n):
        prompt = torch.randint(10, 200, (3 + i % 3,), generator=g).tolist()
        chosen = [20, 21, 22, 0]           # a fixed "good" completion (+ eos id 0)
        rejected = torch.randint(30, 200, (2 + i % 4,), generator=g).tolist() + [0]
        pairs.append(TokenizedPair(prompt, chosen, rejected, index=i))
    return pairs


def reference_table(model, pairs, pad_id) -> torch.Tensor:
    batch = collate_pairs(pairs, pad_id)
    with torch.no_grad():
        logps = sequence_logps(model, batch.sequences)
    return torch.stack([logps[: len(pairs)], logps[len(pairs):]], dim=1)


def build_trainer(tiny_model, tiny_tokenizer, tmp_path, *, table=None, precision="fp32", micro=4, loss="sigmoid",
                  budget=None):
    pairs = make_pairs(16)
    reference = frozen_copy(tiny_model)
    policy = copy.deepcopy(tiny_model)
    table = reference_table(reference, pairs, tiny_tokenizer.pad_token_id) if table is None else table
    inputs = DPOInputs(policy, reference, tiny_tokenizer, pairs, table, [[5, 6], [7, 8]], None,
                       RunIdentity("t", "r", "dpo", loss, 0, beta=0.1))
    train = TrainConfig(steps=4, batch_size=8, micro_batch_size=micro, precision=precision)
    train.budget = budget or train.budget
    strategy = TorchStrategy("cpu", precision, train.batch_size // train.micro_batch_size, 10.0)
    logger = RunLogger(tmp_path, LoggerConfig(name="none", mode="disabled"), {}, name="r", group="t", tags=[])
    points = PointsWriter(tmp_path / "points.csv")
    trainer = DPOTrainer(inputs, AlgoConfig(loss_type=loss, beta=0.1), OptimConfig(lr=3e-3, warmup_steps=1), train,
                         EvalConfig(every=2, max_new_tokens=4, batch_size=4), strategy, logger, points, seed=0)
    return trainer, reference, pairs


def test_reference_frozen_and_policy_learns(tiny_model, tiny_tokenizer, tmp_path):
    trainer, reference, pairs = build_trainer(tiny_model, tiny_tokenizer, tmp_path)
    before = {k: v.clone() for k, v in reference.state_dict().items()}
    assert all(not p.requires_grad for p in reference.parameters())
    batch = collate_pairs(pairs, tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        margin0 = sequence_logps(trainer.policy, batch.sequences)
    trainer.train()
    for k, v in reference.state_dict().items():
        assert torch.equal(v, before[k]), f"reference parameter {k} changed during training"
    with torch.no_grad():
        margin1 = sequence_logps(trainer.policy, batch.sequences)
    n = len(pairs)
    # the policy's chosen-minus-rejected log-ratio grows (what DPO optimises)
    assert (margin1[:n] - margin1[n:]).mean() > (margin0[:n] - margin0[n:]).mean() + 0.1
    rows = (tmp_path / "points.csv").read_text().splitlines()
    assert len(rows) == 1 + 3  # header + steps 0, 2, 4


def test_first_step_loss_is_log2_when_policy_equals_reference(tiny_model, tiny_tokenizer, tmp_path):
    trainer, _, pairs = build_trainer(tiny_model, tiny_tokenizer, tmp_path)
    loss, metrics = trainer.compute_loss(pairs[:4])
    assert abs(loss.item() - torch.log(torch.tensor(2.0)).item()) < 1e-5
    assert abs(metrics["train/rewards/margins"]) < 1e-5


def test_bf16_autocast_loss_close_to_fp32(tiny_model, tiny_tokenizer, tmp_path):
    fp32, _, pairs = build_trainer(tiny_model, tiny_tokenizer, tmp_path / "a")
    bf16, _, _ = build_trainer(tiny_model, tiny_tokenizer, tmp_path / "b", precision="bf16")
    with torch.no_grad():
        for p in fp32.policy.parameters():
            p.add_(0.01)
        for p in bf16.policy.parameters():
            p.add_(0.01)
    loss32, _ = fp32.compute_loss(pairs[:4])
    with bf16.strategy.autocast():
        loss16, _ = bf16.compute_loss(pairs[:4])
    assert torch.isfinite(loss16)
    assert abs(loss16.item() - loss32.item()) < 0.05


def test_nan_loss_stops_the_run(tiny_model, tiny_tokenizer, tmp_path):
    table = torch.full((16, 2), float("nan"))
    trainer, _, _ = build_trainer(tiny_model, tiny_tokenizer, tmp_path, table=table)
    with pytest.raises(NonFiniteLossError, match="loss became nan"):
        trainer.train()


def test_fixed_width_collation_pads_to_the_dataset_maximum():
    from rlhf_lab.data.collate import collate_sequences

    seqs = collate_sequences([[5, 6]], [[7]], pad_id=1, min_widths=(4, 3))
    assert seqs.input_ids.tolist() == [[1, 1, 5, 6, 7, 1, 1]]
    assert seqs.completion_mask.tolist() == [[1.0, 0.0, 0.0]]


@pytest.mark.slow
def test_compiled_training_forward_matches_eager(tiny_model, tiny_tokenizer, tmp_path):
    eager, _, pairs = build_trainer(tiny_model, tiny_tokenizer, tmp_path / "e")
    trainer, _, _ = build_trainer(tiny_model, tiny_tokenizer, tmp_path / "c")
    trainer.train_cfg.compile = True
    trainer.train_model = torch.compile(trainer.policy)
    from rlhf_lab.trainers.dpo import fixed_widths

    trainer.min_widths = fixed_widths(pairs)
    with torch.no_grad():
        for p in list(eager.policy.parameters()) + list(trainer.policy.parameters()):
            p.add_(0.01)
    loss_e, _ = eager.compute_loss(pairs[:4])
    loss_c, _ = trainer.compute_loss(pairs[:4])
    assert abs(loss_e.item() - loss_c.item()) < 1e-4


def test_points_carry_the_cost_and_a_flops_budget_stops_where_it_is_spent(tiny_model, tiny_tokenizer, tmp_path):
    full, _, _ = build_trainer(tiny_model, tiny_tokenizer, tmp_path / "full")
    full.train()
    rows = list(csv.DictReader(open(tmp_path / "full" / "points.csv")))
    assert [int(r["step"]) for r in rows] == [0, 2, 4]
    assert float(rows[0]["train_flops"]) == 0 and int(rows[0]["tokens_backward_policy"]) == 0
    # the cached reference table means no reference forwards; the sigmoid loss needs none without a backward
    at_2, at_4 = rows[1], rows[2]
    assert int(at_2["tokens_forward_reference"]) == 0 and int(at_2["tokens_forward_policy"]) == 0
    assert float(at_2["train_flops"]) == 6 * matmul_weights(tiny_model) * int(at_2["tokens_backward_policy"])
    assert int(at_4["tokens_backward_policy"]) > int(at_2["tokens_backward_policy"]) > 0
    assert float(at_4["train_seconds"]) > float(at_2["train_seconds"]) > 0

    budget = BudgetConfig(by="flops", value=float(at_2["train_flops"]))
    capped, _, _ = build_trainer(tiny_model, tiny_tokenizer, tmp_path / "capped", budget=budget)
    capped.train()
    capped_rows = list(csv.DictReader(open(tmp_path / "capped" / "points.csv")))
    assert [int(r["step"]) for r in capped_rows] == [0, 2]         # stopped, and evaluated, where it was spent
    assert capped_rows[-1]["train_flops"] == at_2["train_flops"]
