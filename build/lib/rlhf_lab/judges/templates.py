"""Judge prompt templates and robust verdict parsing.

Built-in templates: the DPO paper's (Rafailov et al. 2023, App. C.2) GPT-4 prompts for summarisation (simple and
"concise") and single-turn dialogue, a sentiment prompt for the embedded IMDb task (with a rationale, and a
letter-only variant for small local judges), and an AlpacaEval-style instruction-following prompt. A template
from config (`template: custom`) works the same way.

Placeholders are substituted in one regex pass, never with `str.format`, so braces in model outputs are harmless.
"""
from __future__ import annotations

import hashlib
import json
import re
from dataclasses import asdict, dataclass

from rlhf_lab.utils.errors import ConfigError

PLACEHOLDERS = ("{prompt}", "{response_a}", "{response_b}")
_PLACEHOLDER = re.compile(r"\{(prompt|response_a|response_b)\}")


@dataclass(frozen=True)
class JudgeTemplate:
    name: str
    system: str                  # system message ("" = none)
    user: str                    # holds {prompt}, {response_a}, {response_b}
    answer_prefix: str = ""      # where the verdict letter follows (the local judge reads the next token here)
    answer_keys: tuple[str, ...] = ()  # labels that introduce the verdict in a free-text answer

    def __post_init__(self) -> None:
        missing = [p for p in PLACEHOLDERS if p not in self.user]
        if missing:
            raise ConfigError(f"judge template {self.name!r}: user message lacks placeholder(s) {', '.join(missing)}")

    def messages(self, prompt: str, response_a: str, response_b: str) -> list[dict[str, str]]:
        """Chat messages for one comparison (system first when there is one)."""
        values = {"prompt": prompt, "response_a": response_a, "response_b": response_b}
        # one pass, so a placeholder-like string inside a response is never substituted in turn
        user = _PLACEHOLDER.sub(lambda m: values[m.group(1)], self.user)
        head = [{"role": "system", "content": self.system}] if self.system else []
        return head + [{"role": "user", "content": user}]

    def hash(self) -> str:
        """Changes whenever the wording changes: part of the verdict cache key."""
        return hashlib.sha256(json.dumps(asdict(self), sort_keys=True).encode()).hexdigest()[:16]


_TWO_STEP = ('FIRST provide a one-sentence comparison of the two {things} and explain which you {feel}. SECOND, on a '
             'new line, state only "A" or "B" to indicate {which}. Your response should use the format:\n'
             'Comparison: <one-sentence comparison and explanation>\n{key}: <"A" or "B">')


def _two_step(things: str, feel: str, which: str, key: str) -> str:
    return _TWO_STEP.format(things=things, feel=feel, which=which, key=key)


_SUMMARY_BODY = "\n\nPost:\n{prompt}\n\nSummary A:\n{response_a}\n\nSummary B:\n{response_b}\n\n"

TEMPLATES: dict[str, JudgeTemplate] = {
    t.name: t for t in [
        JudgeTemplate(
            "summarization_simple", "",
            "Which of the following summaries does a better job of summarizing the most important points in the "
            "given forum post?" + _SUMMARY_BODY + _two_step("summaries", "prefer and why", "your choice", "Preferred"),
            "Preferred:", ("Preferred",)),
        JudgeTemplate(
            "summarization", "",
            "Which of the following summaries does a better job of summarizing the most important points in the "
            "given forum post, without including unimportant or irrelevant details? A good summary is both precise "
            "and concise." + _SUMMARY_BODY + _two_step("summaries", "prefer and why", "your choice", "Preferred"),
            "Preferred:", ("Preferred",)),
        JudgeTemplate(
            "dialogue", "",
            "For the following query to a chatbot, which response is more helpful?\n\nQuery: {prompt}\n\n"
            "Response A:\n{response_a}\n\nResponse B:\n{response_b}\n\n"
            + _two_step("responses", "feel is more helpful", "which response is more helpful", "More helpful"),
            "More helpful:", ("More helpful",)),
        JudgeTemplate(
            "sentiment", "",
            "Both texts below continue the same movie review opening. Which continuation expresses the more "
            "positive sentiment about the movie?\n\nReview opening: {prompt}\n\nContinuation A: {response_a}\n\n"
            "Continuation B: {response_b}\n\n"
            + _two_step("continuations", "find more positive", "the more positive one", "More positive"),
            "More positive:", ("More positive",)),
        JudgeTemplate(
            "sentiment_letter", "You rate the sentiment of movie reviews.",
            "Review opening: {prompt}\n\nContinuation A: {response_a}\n\nContinuation B: {response_b}\n\n"
            "Which continuation is more positive about the movie, A or B? Answer with one letter.",
            "Answer:", ("Answer",)),
        JudgeTemplate(
            "alpaca_eval",
            "You compare two AI assistant outputs for the same instruction and pick the one a careful, expert human "
            "reader would prefer.",
            "## Instruction\n{prompt}\n\n## Output A\n{response_a}\n\n## Output B\n{response_b}\n\n## Task\nWhich "
            "output follows the instruction better (helpful, correct, relevant, well written)? Do not favour an output "
            "for its length or position. Reply with a single letter, A or B.",
            "Better output:", ("Better output",)),
    ]
}

# Free-text labels models put before their verdict, beyond a template's own `answer_keys`.
_GENERIC_KEYS = ("preferred", "more helpful", "more positive", "better output", "better", "answer", "final answer",
                 "verdict", "winner", "choice", "decision")
_TIE_WORDS = ("tie", "equal", "neither", "both", "same")
_LABEL = r"[\"'“(\[<]*\s*(?:response|summary|output|continuation|option)?\s*[\"'(\[]*\s*(A|B|tie|equal|neither|both|same)\b"


def get_template(name: str, custom=None) -> JudgeTemplate:
    """A built-in template by name, or `custom` (a judges.config.TemplateConfig) when name == "custom"."""
    if name == "custom":
        if custom is None:
            raise ConfigError("config key 'judge.custom_template': required when judge.template is 'custom'")
        return JudgeTemplate("custom", custom.system, custom.user, custom.answer_prefix, tuple(custom.answer_keys))
    if name not in TEMPLATES:
        raise ConfigError(f"config key 'judge.template': unknown template {name!r}; valid: "
                          f"{', '.join(TEMPLATES)}, custom")
    return TEMPLATES[name]


def _normalise_label(label: str) -> str:
    label = label.strip().lower()
    return "tie" if label in _TIE_WORDS else label.upper()


def parse_verdict(text: str, template: JudgeTemplate | None = None) -> tuple[str | None, str]:
    """(winner, rationale) from a free-text judge answer; winner None when no verdict can be read.

    Order of evidence: the last "<key>: <label>" (template keys first, then generic ones), then an answer that is
    nothing but a label ("B", "(a)", "Output B."), then a last line that is nothing but a label."""
    if not text or not text.strip():
        return None, ""
    clean = re.sub(r"[*_`#]", "", text).strip()
    keys = list(template.answer_keys if template else ()) + list(_GENERIC_KEYS)
    for key in keys:
        hits = re.findall(rf"\b{re.escape(key)}\s*[:=\-–]\s*{_LABEL}", clean, flags=re.IGNORECASE)
        if hits:
            return _normalise_label(hits[-1]), _rationale(clean)
    whole = re.fullmatch(rf"\W*{_LABEL}\W*", clean, flags=re.IGNORECASE)
    if whole:
        return _normalise_label(whole.group(1)), ""
    last = clean.splitlines()[-1]
    tail = re.fullmatch(r"\W*(?:response|summary|output|continuation|option)?\s*\W*([AB])\W*", last)
    if tail:
        return tail.group(1), _rationale(clean)
    return None, _rationale(clean)


def _rationale(text: str) -> str:
    """The 'Comparison:' sentence when there is one, else the answer's first line."""
    found = re.search(r"comparison\s*:\s*(.+)", text, flags=re.IGNORECASE)
    return (found.group(1) if found else text.splitlines()[0]).strip()[:1000]
