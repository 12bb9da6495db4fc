"""Sequence log-probs: summed over completion tokens only; prompt and padding never count; KL on samples."""
from __future__ import annotations

import copy

import pytest
import torch

from rlhf_lab.data.collate import collate_sequences
from rlhf_lab.models.logprobs import sequence_kl, sequence_logps
from rlhf_lab.models.sampling import sample_completions


@torch.no_grad()
def manual_logps(model, prompt: list[int], completion: list[int], temperature: float = 1.0) -> float:
    """Unpadded single sequence, full logits, explicit loop over completion positions (float64)."""
    ids = torch.tensor([prompt + completion])
    logits = model(input_ids=ids).logits[0].double() / temperature
    logp = torch.log_softmax(logits, -1)
    return sum(float(logp[len(prompt) + j - 1, tok]) for j, tok in enumerate(completion))


def test_logps_mask_prompt_and_padding(tiny_model):
    prompts = [[5, 6, 7], [8, 9], [10, 11, 12, 13, 14]]
    completions = [[20, 21, 22, 23], [24], [25, 26]]
    batch = collate_sequences(prompts, completions, pad_id=1)
    with torch.no_grad():
        got = sequence_logps(tiny_model, batch, temperature=0.7)
    expected = [manual_logps(tiny_model, p, c, 0.7) for p, c in zip(prompts, completions)]
    torch.testing.assert_close(got.double(), torch.tensor(expected, dtype=torch.float64), rtol=0, atol=1e-4)


def test_logps_independent_of_batch_padding(tiny_model):
    """The same pair scores the same whether padded next to a long or a short neighbour."""
    alone = collate_sequences([[5, 6]], [[20, 21]], pad_id=1)
    padded = collate_sequences([[5, 6], [7, 8, 9, 10, 11, 12]], [[20, 21], [22, 23, 24, 25, 26, 27]], pad_id=1)
    with torch.no_grad():
        a = sequence_logps(tiny_model, alone)
        b = sequence_logps(tiny_model, padded)
    torch.testing.assert_close(a[0], b[0], rtol=0, atol=1e-5)


def test_kl_zero_for_identical_models_and_matches_manual(tiny_model):
    batch = collate_sequences([[5, 6, 7], [8, 9]], [[20, 21, 22], [23]], pad_id=1)
    terms = sequence_kl(tiny_model, copy.deepcopy(tiny_model), batch)
    assert torch.allclose(terms.exact, torch.zeros(2), atol=1e-6)
    assert torch.allclose(terms.sampled, torch.zeros(2), atol=1e-6)

    other = copy.deepcopy(tiny_model)
    with torch.no_grad():
        for p in other.parameters():
            p.add_(0.05 * torch.randn_like(p))
    terms = sequence_kl(tiny_model, other, batch)
    # manual exact KL for row 1: one completion token predicted from prompt [8, 9]
    with torch.no_grad():
        lp = torch.log_softmax(tiny_model(input_ids=torch.tensor([[8, 9]])).logits[0, -1].double(), -1)
        lq = torch.log_softmax(other(input_ids=torch.tensor([[8, 9]])).logits[0, -1].double(), -1)
    expected = float((lp.exp() * (lp - lq)).sum())
    assert expected > 0
    assert abs(float(terms.exact[1]) - expected) < 1e-5
    assert abs(float(terms.sampled[1]) - float(lp[23] - lq[23])) < 1e-5


def test_sampling_is_deterministic_and_stops_after_eos(tiny_model, tiny_tokenizer):
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    prompts = [[5, 6], [7, 8, 9], [10]] * 4

    def draw(seed):
        return sample_completions(tiny_model, prompts, eos_id=eos, pad_id=pad, max_new_tokens=10,
                                  temperature=1.5, batch_size=5, generator=torch.Generator().manual_seed(seed))

    a, b, c = draw(0), draw(0), draw(1)
    assert torch.equal(a.input_ids, b.input_ids)
    assert not torch.equal(a.input_ids, c.input_ids)
    for row, mask in zip(a.completion_ids.tolist(), a.completion_mask.tolist()):
        real = [t for t, m in zip(row, mask) if m]
        assert pad not in real
        if eos in real:
            assert real.index(eos) == len(real) - 1  # nothing after the first EOS
        assert 1 <= len(real) <= 10


def test_sampling_matches_scored_distribution(tiny_model, tiny_tokenizer):
    """Empirical first-token frequencies follow the tempered softmax that log-prob passes score."""
    eos, pad = tiny_tokenizer.eos_token_id, tiny_tokenizer.pad_token_id
    n = 4000
    seqs = sample_completions(tiny_model, [[5, 6]] * n, eos_id=eos, pad_id=pad, max_new_tokens=1,
                              temperature=2.0, batch_size=1000, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        probs = torch.softmax(tiny_model(input_ids=torch.tensor([[5, 6]])).logits[0, -1] / 2.0, -1)
    counts = torch.bincount(seqs.completion_ids[:, 0], minlength=probs.numel()).double() / n
    top = probs.argsort(descending=True)[:5]
    # binomial standard error at n=4000 is < 0.008; allow 4 SE
    assert torch.all((counts[top] - probs[top].double()).abs() < 0.032)


def _tiny(arch: str):
    from transformers import GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    if arch == "gpt2":
        return GPT2LMHeadModel(GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=40,
                                          bos_token_id=2, eos_token_id=3, pad_token_id=1)).eval()
    return LlamaForCausalLM(LlamaConfig(num_hidden_layers=2, hidden_size=32, intermediate_size=64,
                                        num_attention_heads=2, num_key_value_heads=1, vocab_size=40,
                                        max_position_embeddings=64, bos_token_id=2, eos_token_id=3,
                                        pad_token_id=1)).eval()


@pytest.mark.parametrize("arch", ["gpt2", "llama"])
def test_cached_sampling_uses_the_current_cache_api_and_equals_uncached_greedy(arch):
    """The installed transformers' KV-cache argument (no FutureWarning/DeprecationWarning from our calls, which
    would turn into a TypeError on the next major), and cached greedy decoding equals full re-forwards."""
    import warnings

    model = _tiny(arch)
    prompts = [[5, 6, 7], [8, 9]]
    with warnings.catch_warnings():
        warnings.simplefilter("error", FutureWarning)
        warnings.simplefilter("error", DeprecationWarning)
        seqs = sample_completions(model, prompts, eos_id=3, pad_id=1, max_new_tokens=6, temperature=0.0)
    for row, prompt in enumerate(prompts):
        ids = list(prompt)
        for _ in range(int(seqs.completion_lengths[row])):
            with torch.no_grad():
                ids.append(int(model(input_ids=torch.tensor([ids])).logits[0, -1].argmax()))
        assert seqs.input_ids[row, seqs.prompt_width:][: len(ids) - len(prompt)].tolist() == ids[len(prompt):]


@pytest.mark.parametrize("temperature", [1.0, 0.7])
def test_sampler_logprobs_equal_a_separate_forward(tiny_model, tiny_tokenizer, temperature):
    """PPO's π_old comes from the sampler's own logits; a second forward over the finished sequences (what the
    rollout used to run) gives the same numbers, up to the float rounding of KV-cached against full matmuls."""
    from rlhf_lab.models.logprobs import completion_logits, token_logps_from_logits
    from rlhf_lab.models.sampling import sample_with_logprobs

    prompts = [[5, 6, 7, 8], [9], [10, 11], [12, 13, 14]]
    eos = tiny_tokenizer.eos_token_id
    seqs, logps = sample_with_logprobs(tiny_model, prompts, eos_id=eos, pad_id=tiny_tokenizer.pad_token_id,
                                       max_new_tokens=12, temperature=temperature, batch_size=3,
                                       generator=torch.Generator().manual_seed(3))
    again = token_logps_from_logits(completion_logits(tiny_model, seqs, temperature), seqs)
    assert logps.shape == again.shape == seqs.completion_mask.shape
    assert torch.equal(logps == 0, seqs.completion_mask == 0)         # 0 exactly on padding, nowhere else
    torch.testing.assert_close(logps, again, rtol=0, atol=2e-6)
    plain = sample_completions(tiny_model, prompts, eos_id=eos, pad_id=tiny_tokenizer.pad_token_id,
                               max_new_tokens=12, temperature=temperature, batch_size=3,
                               generator=torch.Generator().manual_seed(3))
    assert torch.equal(plain.input_ids, seqs.input_ids)                # the same samples either way
