"""Judge prompt templates, verdict parsing and judge config validation."""
from __future__ import annotations

import pytest

from rlhf_lab.judges.config import TemplateConfig, load_judge_preset, parse_judge_config
from rlhf_lab.judges.templates import TEMPLATES, JudgeTemplate, get_template, parse_verdict
from rlhf_lab.utils.errors import ConfigError

SUMMARY = TEMPLATES["summarization"]


@pytest.mark.parametrize("answer, winner", [
    ("Comparison: A keeps the key points.\nPreferred: A", "A"),
    ("Comparison: B is shorter.\n**Preferred:** B", "B"),
    ("comparison: fine\npreferred - 'b'", "B"),
    ("Preferred: Summary A", "A"),
    ("More positive: Continuation B", "B"),
    ("B", "B"),
    ("(a)", "A"),
    ("Output B.", "B"),
    ("Preferred: neither", "tie"),
    ("Both are equally good.\nVerdict: tie", "tie"),
    ("Comparison: A rambles while B is crisp.\nB", "B"),
    ("Preferred: A\n\nOn reflection, Preferred: B", "B"),   # the last verdict wins
])
def test_parse_verdict_reads_many_formats(answer, winner):
    assert parse_verdict(answer, SUMMARY)[0] == winner


@pytest.mark.parametrize("answer", ["", "   ", "I cannot decide between these.", "Preferred: maybe", "{}"])
def test_unparseable_answers_give_none(answer):
    assert parse_verdict(answer, SUMMARY)[0] is None


def test_rationale_is_the_comparison_sentence():
    assert parse_verdict("Comparison: A is concise.\nPreferred: A", SUMMARY)[1] == "A is concise."


def test_messages_substitute_once_so_placeholders_in_outputs_stay_literal():
    msgs = TEMPLATES["sentiment"].messages("I {response_b} it", "great {prompt}", "bad")
    user = msgs[-1]["content"]
    assert "I {response_b} it" in user and "great {prompt}" in user
    assert TEMPLATES["alpaca_eval"].messages("p", "a", "b")[0]["role"] == "system"


def test_every_builtin_template_has_its_placeholders_and_distinct_hash():
    hashes = {t.hash() for t in TEMPLATES.values()}
    assert len(hashes) == len(TEMPLATES)
    for t in TEMPLATES.values():
        text = t.messages("PROMPT", "RESP_A", "RESP_B")[-1]["content"]
        assert "PROMPT" in text and "RESP_A" in text and "RESP_B" in text


def test_custom_templates_from_config_and_their_errors():
    custom = TemplateConfig(user="Q: {prompt}\n1) {response_a}\n2) {response_b}\nBest?", answer_keys=["Best"])
    template = get_template("custom", custom)
    assert parse_verdict("Best: B", template)[0] == "B"
    with pytest.raises(ConfigError, match="response_b"):
        JudgeTemplate("bad", "", "{prompt} {response_a}")
    with pytest.raises(ConfigError, match="unknown template 'nope'"):
        get_template("nope")


def test_judge_config_errors_name_the_key():
    with pytest.raises(ConfigError, match=r"judge\.temprature"):
        parse_judge_config({"kind": "openai", "temprature": 0.0})
    with pytest.raises(ConfigError, match=r"judge\.kind"):
        parse_judge_config({"kind": "gpt5"})
    with pytest.raises(ConfigError, match=r"judge\.api_key_env"):
        parse_judge_config({"kind": "openai", "api_key_env": "sk-live-123"})
    with pytest.raises(ConfigError, match=r"judge\.concurrency"):
        parse_judge_config({"kind": "openai", "concurrency": 0})
    with pytest.raises(ConfigError, match="custom_template"):
        parse_judge_config({"kind": "hf", "template": "custom"})


def test_presets_of_the_judge_config_group_load():
    assert load_judge_preset("oracle").kind == "oracle"
    assert load_judge_preset("smollm2").model is None
    cfg = load_judge_preset("openai", {"base_url": "http://127.0.0.1:1/v1"})
    assert cfg.base_url == "http://127.0.0.1:1/v1" and cfg.api_key_env == "OPENAI_API_KEY"
    with pytest.raises(ConfigError, match="valid: openai, oracle, smollm2"):
        load_judge_preset("gpt5")
