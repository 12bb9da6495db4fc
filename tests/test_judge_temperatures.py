"""Win rates per sampling temperature (judges/temperatures.py, `rlhf-lab judge`): greedy decoding at T=0, one row per
(temperature, judge) that matches a hand computation, the `chosen` baseline, free reruns, and the command line.
Tiny random GPT-2 checkpoints; the oracle scores text with a stand-in gold reward."""
from __future__ import annotations

import copy
import subprocess
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import torch
import yaml

from rlhf_lab.data.formats import load_preference_pairs, write_pairs_jsonl
from rlhf_lab.eval.samples import read_samples, write_samples
from rlhf_lab.judges import temperatures as temps
from rlhf_lab.judges.command import parse_judge_args
from rlhf_lab.judges.temperatures import (
    Baseline,
    SamplingConfig,
    check_temperatures,
    chosen_baseline,
    model_dir_of,
    win_rates_by_temperature,
)
from rlhf_lab.models.sampling import sample_completions
from rlhf_lab.utils.errors import ConfigError
from tests.cli import run_cli

PROMPTS = ["this movie", "the worst film", "a fine cast and", "i loved the music", "the plot was"]
SAMPLING = SamplingConfig(max_new_tokens=6, batch_size=4, seed=3)
JUDGES = [{"name": "oracle", "kind": "oracle"},
          {"name": "noisy", "kind": "oracle", "noise_temperature": 2.0, "seed": 1}]


def gold(completion: str) -> float:
    """Stand-in gold reward over text: more 'e' than 'o' is better."""
    return float(completion.count("e") - completion.count("o"))


class CountingScorer:
    """Gold scorer (prompts, completions) → (N,) that records what it was asked to score."""

    def __init__(self):
        self.calls, self.seen = 0, []

    def __call__(self, prompts, completions):
        self.calls += 1
        self.seen += list(completions)
        return np.array([gold(c) for c in completions])


@pytest.fixture
def checkpoints(tmp_path, tiny_model, tiny_tokenizer):
    """(policy dir, sft dir): the SFT model is the tiny GPT-2, the policy a perturbed copy."""
    policy = copy.deepcopy(tiny_model)
    torch.manual_seed(1)
    with torch.no_grad():
        for p in policy.parameters():
            p.add_(0.5 * torch.randn_like(p))
    dirs = tmp_path / "policy", tmp_path / "sft"
    for model, where in zip((policy, tiny_model), dirs):
        model.save_pretrained(where)
        tiny_tokenizer.save_pretrained(where)
    return dirs


def test_temperature_zero_is_greedy_and_deterministic(tiny_model, tiny_tokenizer):
    tok = tiny_tokenizer
    prompts = [tok.encode(p) for p in PROMPTS[:3]]   # different lengths: left padding in the batch
    kw = {"eos_id": tok.eos_token_id, "pad_id": tok.pad_token_id, "max_new_tokens": 4, "temperature": 0.0,
          "batch_size": 3}
    a = sample_completions(tiny_model, prompts, generator=torch.Generator().manual_seed(0), **kw)
    b = sample_completions(tiny_model, prompts, generator=torch.Generator().manual_seed(99), **kw)
    assert torch.equal(a.input_ids, b.input_ids)                  # no randomness at T=0
    for row, prompt in enumerate(prompts):                        # argmax decoding by hand, unpadded, no KV cache
        ids = list(prompt)
        for _ in range(4):
            with torch.no_grad():
                nxt = int(tiny_model(input_ids=torch.tensor([ids])).logits[0, -1].argmax())
            ids.append(nxt)
            if nxt == tok.eos_token_id:
                break
        got = a.completion_ids[row][a.completion_mask[row].bool()].tolist()
        assert got == ids[len(prompt):]
    warm = {**kw, "temperature": 1.0}   # T > 0 still samples from the generator
    c = sample_completions(tiny_model, prompts * 4, generator=torch.Generator().manual_seed(0), **warm)
    d = sample_completions(tiny_model, prompts * 4, generator=torch.Generator().manual_seed(1), **warm)
    assert not torch.equal(c.input_ids, d.input_ids)
    with pytest.raises(ValueError, match="temperature"):
        sample_completions(tiny_model, prompts, **{**kw, "temperature": -0.5})


def test_rows_per_temperature_match_the_oracle_by_hand_and_a_rerun_is_free(checkpoints, tmp_path, monkeypatch):
    policy_dir, sft_dir = checkpoints
    scorer, grid = CountingScorer(), [0.0, 0.5, 1.0]

    def run() -> pd.DataFrame:
        return win_rates_by_temperature(policy_dir, PROMPTS, grid, Baseline("sft", model_dir=sft_dir), JUDGES,
                                        tmp_path / "v.sqlite", tmp_path / "samples", scorer=scorer,
                                        sampling=SAMPLING, n_boot=300)

    table = run()
    assert list(zip(table.temperature, table.judge)) == [(t, j["name"]) for j in JUDGES for t in grid]
    assert (table.n + table.invalid == len(PROMPTS)).all() and (table.baseline == "sft").all()
    assert ((table.win_rate_ci_low <= table.win_rate) & (table.win_rate <= table.win_rate_ci_high)).all()
    files = sorted((tmp_path / "samples").glob("*.jsonl"))
    assert len(files) == 2 * len(grid)
    for t in grid:
        pol, base = (read_samples(next(f for f in files if f.name.startswith(f"{side}_T{t:g}_")))
                     for side in ("policy", "baseline"))
        assert [r["prompt"] for r in pol] == PROMPTS
        by_hand = np.mean([0.5 if gold(p["completion"]) == gold(b["completion"]) else
                           float(gold(p["completion"]) > gold(b["completion"])) for p, b in zip(pol, base)])
        row = table[(table.temperature == t) & (table.judge == "oracle")].iloc[0]
        assert row.win_rate == pytest.approx(by_hand)
        assert row.agreement_with_oracle == 1.0 and row.position_bias_rate == 0.0
        assert row.policy_len_mean == pytest.approx(np.mean([r["length"] for r in pol]))
    assert table[table.judge == "noisy"].agreement_with_oracle.between(0, 1).all()
    calls = scorer.calls
    assert calls > 0
    monkeypatch.setattr(temps, "draw_samples", lambda *a, **k: pytest.fail("rerun sampled again"))
    again = run()
    assert scorer.calls == calls and (again.requests == 0).all()        # zero judge calls, zero sampling
    assert (again.cached == 2 * len(PROMPTS)).all()
    pd.testing.assert_frame_equal(again.drop(columns="cached"), table.drop(columns="cached"))


def test_chosen_baseline_judges_the_datasets_chosen_texts(checkpoints, tmp_path, tiny_tokenizer):
    policy_dir, _ = checkpoints
    rows = [{"prompt": "this movie", "chosen": " was great", "rejected": " was awful"},
            {"prompt": "this movie", "chosen": " second pair", "rejected": " ignored"},
            {"prompt": "the plot was", "chosen": " clever", "rejected": " boring"},
            {"prompt": "a fine cast", "chosen": " and a happy ending", "rejected": " wasted"}]
    pairs, _ = load_preference_pairs(str(write_pairs_jsonl(tmp_path / "prefs.jsonl", rows)))
    prompts, baseline = chosen_baseline(pairs, 2, tiny_tokenizer)
    assert prompts == ["this movie", "the plot was"] and baseline.texts.completions == [" was great", " clever"]
    assert baseline.texts.lengths.tolist() == [len(tiny_tokenizer(c, add_special_tokens=False)["input_ids"]) + 1
                                               for c in (" was great", " clever")]
    scorer = CountingScorer()
    table = win_rates_by_temperature(policy_dir, prompts, [0.0, 1.0], baseline, JUDGES[:1], tmp_path / "v.sqlite",
                                     tmp_path / "samples", scorer=scorer, sampling=SAMPLING, n_boot=200)
    assert {" was great", " clever"} <= set(scorer.seen) and (table.baseline == "chosen").all()
    assert (table.baseline_len_mean == baseline.texts.lengths.mean()).all()
    assert len(list((tmp_path / "samples").glob("baseline_*"))) == 0   # nothing sampled for fixed texts


def test_bad_options_fail_with_the_key_named(tmp_path):
    for bad in ([-1.0], [0.5, 0.5], [], ["hot"], [float("nan")]):
        with pytest.raises(ConfigError, match="temperatures="):
            check_temperatures(bad)
    assert check_temperatures([0, 0.25, 1]) == [0.0, 0.25, 1.0]
    with pytest.raises(ConfigError, match=r"run_dir=.*no Hugging Face checkpoint"):
        model_dir_of(tmp_path / "nothing", "run_dir")
    with pytest.raises(ConfigError, match="unknown option 'temperature="):
        parse_judge_args([f"run_dir={tmp_path}", "temperature=[0]"])
    with pytest.raises(ConfigError, match="num_prompts="):
        parse_judge_args([f"run_dir={tmp_path}", "num_prompts=many"])
    with pytest.raises(ConfigError, match="run_dir=DIR is required"):
        parse_judge_args(["baseline=sft"])
    args = parse_judge_args([f"run_dir={tmp_path}", "temperatures=[0,0.5]", "judges=[oracle,smollm2]",
                             "num_prompts=8", "baseline=chosen"])
    assert (args.temperatures, args.judges, args.num_prompts, args.baseline) == ([0.0, 0.5], ["oracle", "smollm2"],
                                                                                8, "chosen")


def console(*args: str, cwd: Path) -> subprocess.CompletedProcess:
    return run_cli(["judge", *args], cwd, check=False, timeout=120)


def test_console_script_writes_the_table_and_names_bad_input(checkpoints, tmp_path):
    policy_dir, sft_dir = checkpoints
    run_dir = tmp_path / "run"
    run_dir.mkdir()
    policy_dir.rename(run_dir / "model")
    config = {"task": {"name": "none"}, "data": {"source": str(tmp_path / "prefs.jsonl")}, "logger": {"name": "none"},
              "model": {"name_or_path": str(sft_dir), "sft": False}, "reward": {"gold": "vader"},
              "eval": {"max_new_tokens": 5}, "cache_dir": str(tmp_path / "cache")}
    (run_dir / "config.yaml").write_text(yaml.safe_dump(config))
    write_samples(run_dir, 0, [{"index": i, "prompt": p, "completion": "x", "length": 1} for i, p in
                               enumerate(PROMPTS * 2)])   # evaluation rows repeat prompts: judged once each
    bad = console(f"run_dir={run_dir}", "baseline=sft", "judges=[oracle,nosuchjudge]", cwd=tmp_path)
    assert bad.returncode == 2 and "nosuchjudge" in bad.stderr and "Traceback" not in bad.stderr
    ok = console(f"run_dir={run_dir}", "temperatures=[0,1]", "baseline=sft", "judges=[oracle]", "num_prompts=4",
                 cwd=tmp_path)
    assert ok.returncode == 0, ok.stderr[-2000:]
    table = pd.read_csv(run_dir / "judge_temperatures.csv")
    assert table.temperature.tolist() == [0.0, 1.0] and (table.n + table.invalid == 4).all()
    assert (table.baseline == "sft").all() and "win_rate" in ok.stdout and "judge_temperatures.csv" in ok.stdout
    assert (tmp_path / "cache" / "judge_verdicts.sqlite").is_file()
