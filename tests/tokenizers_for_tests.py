"""Tiny byte-level BPE tokenizers built in-process for tests (no hub): one builder shared by every test module."""
from __future__ import annotations

from typing import Optional, Sequence


def tiny_bpe_tokenizer(texts: Sequence[str], *, pad: str, eos: str, bos: str,
                       special_order: Optional[Sequence[str]] = None, chat_template: Optional[str] = None,
                       add_bos: bool = False, vocab_size: int = 300):
    """Special tokens get ids 0, 1, ... in `special_order` (default: pad, eos, bos; a repeat such as bos == eos
    counts once). `add_bos=True` makes tokenizer(text) prepend bos by default (Llama-style)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    specials = list(dict.fromkeys(special_order or [pad, eos, bos]))
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials, show_progress=False,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(list(texts), trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(single=f"{bos} $A",
                                                           special_tokens=[(bos, specials.index(bos))])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token=pad, eos_token=eos, bos_token=bos)
    if chat_template:
        hf.chat_template = chat_template
    return hf
