"""Reward model / critic heads, Bradley–Terry training, normalisation and the cached RM stage (tiny GPT-2)."""
from __future__ import annotations

import json
import math

import pytest
import torch
from transformers import AutoModelForSequenceClassification, GPT2Config, GPT2ForSequenceClassification

from rlhf_lab.algos.reward import bradley_terry_loss, normalize_rewards
from rlhf_lab.config import RewardModelConfig
from rlhf_lab.data.batches import TokenizedPair
from rlhf_lab.data.collate import collate_pairs, collate_sequences
from rlhf_lab.data.tokenize import TruncationConfig
from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.models.heads import (
    NORMALIZATION_FILE,
    build_scalar_model,
    find_scalar_head,
    init_scalar_head,
    load_scalar_model,
    save_scalar_model,
    sequence_scores,
    token_values,
)
from rlhf_lab.trainers.reward_model import (
    fit_normalization,
    margins_from_records,
    pair_loss,
    score_sequences,
    split_pairs_by_prompt,
    train_reward_model,
)

GOOD = 50  # the token that makes a completion "chosen" in the separable toy set


@pytest.fixture
def sft_dir(tiny_model, tiny_tokenizer, tmp_path):
    d = tmp_path / "sft"
    tiny_model.save_pretrained(d)
    tiny_tokenizer.save_pretrained(d)
    return d


@pytest.fixture
def rm(sft_dir, tiny_tokenizer):
    return build_scalar_model(sft_dir, pad_token_id=tiny_tokenizer.pad_token_id, seed=0)


def _manual_hidden(model, seqs):
    return model.base_model(input_ids=seqs.input_ids, attention_mask=seqs.attention_mask,
                            position_ids=seqs.position_ids).last_hidden_state


# ------------------------------------------------------------------------------------------------ heads
def test_head_init_std_and_zero_bias():
    d = 2048
    model = GPT2ForSequenceClassification(GPT2Config(n_layer=0, n_embd=d, n_head=4, vocab_size=8, n_positions=4,
                                                     num_labels=1, pad_token_id=1))
    head = init_scalar_head(model, torch.Generator().manual_seed(0))
    assert head is model.score
    w = head.weight.detach().double()
    expected = 1 / math.sqrt(d + 1)
    assert abs(w.mean().item()) < 4 * expected / math.sqrt(d)
    assert w.std().item() == pytest.approx(expected, rel=0.06)  # SE of a std over 2048 draws ≈ 1.6%
    model.score = torch.nn.Linear(d, 1, bias=True)
    torch.nn.init.ones_(model.score.bias)
    init_scalar_head(model)
    assert torch.all(model.score.bias == 0)


def test_build_loads_backbone_and_sets_up(rm, tiny_model, tiny_tokenizer):
    sft_state = tiny_model.transformer.state_dict()
    for k, v in rm.base_model.state_dict().items():
        assert torch.equal(v, sft_state[k]), k
    assert find_scalar_head(rm).out_features == 1 and rm.config.pad_token_id == tiny_tokenizer.pad_token_id
    assert all(m.p == 0 for m in rm.modules() if isinstance(m, torch.nn.Dropout))


# ------------------------------------------------------------------------------------------------ scoring
def test_sequence_scores_read_last_real_token(rm, tiny_tokenizer):
    pad = tiny_tokenizer.pad_token_id
    prompts, completions = [[5, 6, 7], [8], [9, 10]], [[11, 12, 0], [13, 0], [14, 15, 16, 17, 0]]
    seqs = collate_sequences(prompts, completions, pad)
    with torch.no_grad():
        scores = sequence_scores(rm, seqs)
        # manual: head(hidden at P + |y| - 1)
        hidden = _manual_hidden(rm, seqs)
        idx = seqs.prompt_width + torch.tensor([len(c) for c in completions]) - 1
        manual = hidden[torch.arange(3), idx] @ rm.score.weight.squeeze(0)
        torch.testing.assert_close(scores, manual)
        # padding content is irrelevant (even ids that are not the pad id)
        noisy = collate_sequences(prompts, completions, pad)
        noisy.input_ids[noisy.attention_mask == 0] = 42
        torch.testing.assert_close(sequence_scores(rm, noisy), scores)
        # each row alone, without any padding, scores the same
        for i, (p, c) in enumerate(zip(prompts, completions)):
            alone = sequence_scores(rm, collate_sequences([p], [c], pad))
            torch.testing.assert_close(alone[0], scores[i], atol=1e-5, rtol=1e-5)
        # a real token equal to the pad id does not move the read position (HF's pad-id pooling would)
        with_pad_id = collate_sequences([[5, 6, 7]], [[11, pad, 12, 0]], pad)
        h = _manual_hidden(rm, with_pad_id)
        torch.testing.assert_close(sequence_scores(rm, with_pad_id), (h[:, -1] @ rm.score.weight.T).squeeze(-1))


def test_token_values_alignment(rm, tiny_tokenizer):
    seqs = collate_sequences([[5, 6, 7], [8]], [[11, 12, 0], [13, 14, 15, 16, 0]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        values = token_values(rm, seqs)
        hidden = _manual_hidden(rm, seqs)
    p, c = seqs.prompt_width, seqs.completion_width
    assert values.shape == (2, c)
    for j in range(c):  # value of completion step j from the state that predicts token j
        torch.testing.assert_close(values[:, j], hidden[:, p + j - 1] @ rm.score.weight.squeeze(0))
    # the value at the last real completion token's predecessor state… and the reward at the last real token
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(rm, seqs)[1], (hidden[1, p + 4] @ rm.score.weight.squeeze(0)))


# ------------------------------------------------------------------------------------------------ training
def toy_pairs(n: int, seed: int = 0) -> list[TokenizedPair]:
    g = torch.Generator().manual_seed(seed)
    out = []
    for i in range(n):
        prompt = torch.randint(60, 200, (2 + i % 3,), generator=g).tolist()
        body_c = torch.randint(60, 200, (3,), generator=g).tolist()
        pos = i % 3
        chosen = body_c[:pos] + [GOOD] + body_c[pos:] + [0]
        rejected = torch.randint(60, 200, (2 + i % 3,), generator=g).tolist() + [0]
        out.append(TokenizedPair(prompt, chosen, rejected, index=i))
    return out


def test_bradley_terry_training_separates_toy_pairs(rm, tiny_tokenizer):
    pairs = toy_pairs(48)
    train, held = split_pairs_by_prompt(pairs, 0.25, seed=0)
    assert len(held) >= 12 and not {tuple(p.prompt_ids) for p in train} & {tuple(p.prompt_ids) for p in held}
    cfg = RewardModelConfig(steps=25, batch_size=12, lr=3e-3, warmup_steps=2, normalization_samples=0)
    logged = []
    metrics = train_reward_model(rm, tiny_tokenizer, train, held, cfg, TorchStrategy("cpu", "fp32", 1, None), 0,
                                 None, log_fn=lambda m, s: logged.append(s))
    assert metrics["eval_accuracy"] > 0.9 and metrics["train_accuracy"] > 0.9, metrics
    assert metrics["eval_loss"] < metrics["initial_eval_loss"]
    assert metrics["steps"] == 25 and metrics["eval_pairs"] == len(held) and logged[-1] == 25
    # normalisation fitted on some sequences gives them mean 0 / std 1
    seqs = collate_pairs(pairs[:16], tiny_tokenizer.pad_token_id).sequences
    norm = fit_normalization(rm, seqs, batch_size=8)
    z = normalize_rewards(score_sequences(rm, seqs), norm["gain"], norm["bias"]).double()
    assert abs(z.mean().item()) < 1e-5 and z.std(unbiased=False).item() == pytest.approx(1.0, abs=1e-5)
    assert norm["num_samples"] == 32


def test_pair_loss_uses_margins_and_centering(rm, tiny_tokenizer):
    pairs = toy_pairs(4)
    margins = {p.index: 0.1 * (p.index + 1) for p in pairs}
    loss, _ = pair_loss(rm, pairs, tiny_tokenizer.pad_token_id, "cpu", margins, 0.01)
    scores = sequence_scores(rm, collate_pairs(pairs, tiny_tokenizer.pad_token_id).sequences)
    expected, _ = bradley_terry_loss(scores[:4], scores[4:], torch.tensor([0.1, 0.2, 0.3, 0.4]), 0.01)
    torch.testing.assert_close(loss, expected)
    assert margins_from_records([{"chosen_score": 0.9, "rejected_score": 0.2}]) == {0: pytest.approx(0.7)}
    assert margins_from_records([{"chosen_score": 0.9}]) is None


# ------------------------------------------------------------------------------------------------ save / load
def test_save_load_round_trip(rm, tiny_tokenizer, tmp_path):
    seqs = collate_sequences([[5, 6], [7]], [[8, 0], [9, 10, 0]], tiny_tokenizer.pad_token_id)
    with torch.no_grad():
        before = sequence_scores(rm, seqs)
    norm = {"gain": 2.0, "bias": -0.5, "fitted_on": "test"}
    save_scalar_model(rm, tiny_tokenizer, tmp_path / "rm", norm)
    hf = AutoModelForSequenceClassification.from_pretrained(tmp_path / "rm").eval()
    loaded, loaded_norm = load_scalar_model(tmp_path / "rm")
    with torch.no_grad():
        torch.testing.assert_close(sequence_scores(hf, seqs), before)
        torch.testing.assert_close(sequence_scores(loaded, seqs), before)
    assert loaded_norm["gain"] == 2.0 and loaded_norm["bias"] == -0.5 and loaded_norm["fitted_on"] == "test"
    save_scalar_model(rm, None, tmp_path / "plain", None)
    assert not (tmp_path / "plain" / NORMALIZATION_FILE).exists()
    assert load_scalar_model(tmp_path / "plain")[1] is None


# ------------------------------------------------------------------------------------------------ stage
def test_reward_model_stage_caches(sft_dir, tmp_path):
    from rlhf_lab.config import OptimConfig
    from rlhf_lab.recipes.stages import StageTraining, reward_model_stage

    prompts = ["this movie was", "i loved the", "the worst film", "a fine cast"]
    rows = []
    for i, p in enumerate(prompts):
        rows.append({"prompt": p, "chosen": " great and wonderful", "rejected": " terrible and boring",
                     "chosen_score": 0.9, "rejected_score": 0.1 + 0.1 * i})
        rows.append({"prompt": p, "chosen": " a happy ending", "rejected": " awful acting",
                     "chosen_score": 0.8, "rejected_score": 0.3})
    pairs_path = tmp_path / "pairs.jsonl"
    pairs_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cfg = RewardModelConfig(steps=2, batch_size=4, warmup_steps=1, use_margin=True, eval_fraction=0.25,
                            normalization_samples=4, center_rewards_coefficient=0.01)
    trunc = TruncationConfig(max_prompt_length=8, max_completion_length=6)
    args = (tmp_path / "cache", "sftkey", sft_dir, "prefkey", pairs_path, cfg, trunc, 0, torch.device("cpu"),
            StageTraining(OptimConfig(), "fp32", lambda accum, clip, micro: TorchStrategy("cpu", "fp32", accum, clip)))
    first = reward_model_stage(*args)
    second = reward_model_stage(*args)
    assert first.built and not second.built and first.dir == second.dir
    info = json.loads((first.dir / "rm_info.json").read_text())
    assert info["steps"] == 2 and info["train_pairs"] + info["eval_pairs"] == 8 and info["eval_pairs"] >= 2
    assert info["margin_used"] is True and 0.0 <= info["eval_accuracy"] <= 1.0
    model, norm = load_scalar_model(first.dir)
    assert norm["num_samples"] == 4 and norm["gain"] > 0 and math.isfinite(norm["bias"])
    assert isinstance(model, GPT2ForSequenceClassification)
