"""The bad-input corpus: malformed configs, study files and datasets fed through the real `rlhf-lab` console
script. Each case must end with the user-error exit code (2) and one message naming the culprit (key, file,
row), no traceback and no output that looks complete (no points.csv, no summary.json); rows that the documented
policy skips are counted in the log instead, and the run goes on.

Everything here fails in the first seconds: no case trains (the skip case trains one step on a tiny model).
"""
from __future__ import annotations

import json
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import pandas as pd
import pytest
import torch
import yaml

from tests.cli import cli_env, run_cli

pytestmark = pytest.mark.integration

CHAT_TEMPLATE = ("{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|endoftext|>{% endfor %}"
                 "{% if add_generation_prompt %}<|assistant|>{% endif %}")
GOOD = [{"prompt": f"the film number {i} was", "chosen": " great fun", "rejected": " a bore"} for i in range(8)]


def _save_model(directory: Path, tokenizer, weights: bool = True) -> Path:
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=1, n_embd=16, n_head=2, n_positions=64, vocab_size=len(tokenizer),
                        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                        pad_token_id=tokenizer.pad_token_id)
    if weights:
        GPT2LMHeadModel(config).save_pretrained(directory)
    else:
        config.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module")
def ws(tmp_path_factory):
    """A workspace: a tiny model with a chat template, one whose tokenizer has no pad token, one without weights."""
    from tests.conftest import SENTENCES
    from tests.tokenizers_for_tests import tiny_bpe_tokenizer

    root = tmp_path_factory.mktemp("bad_inputs")
    tokenizer = tiny_bpe_tokenizer(SENTENCES * 4, pad="<|pad|>", eos="<|endoftext|>", bos="<|endoftext|>",
                                   special_order=["<|endoftext|>", "<|pad|>"], chat_template=CHAT_TEMPLATE)
    _save_model(root / "model", tokenizer)
    _save_model(root / "model_no_weights", tokenizer, weights=False)
    no_pad = tiny_bpe_tokenizer(SENTENCES * 4, pad=None, eos="<|endoftext|>", bos="<|endoftext|>",
                                special_order=["<|endoftext|>"])
    _save_model(root / "model_no_pad", no_pad)
    return root


def write_jsonl(path: Path, rows: list) -> Path:
    path.write_text("".join((r if isinstance(r, str) else json.dumps(r)) + "\n" for r in rows))
    return path


def run_args(ws: Path, name: str, data: Path | None = None, model: str = "model") -> list[str]:
    args = ["task=none", "model=hf", f"model.name_or_path={ws / model}", "logger=none", "train.steps=1",
            "train.batch_size=2", "train.micro_batch_size=2", "eval.every=1", "eval.num_prompts=2",
            "eval.max_new_tokens=4", "train.save_model=false", "data.max_completion_length=16",
            f"output_root={ws}", f"cache_dir={ws / 'cache'}", f"hydra.run.dir={ws / 'runs' / name}"]
    return args + ([f"data.source={data}"] if data is not None else [])


def assert_refused(out, run_dir: Path | None, *needles: str) -> None:
    text = out.stdout + out.stderr
    assert out.returncode == 2, f"exit {out.returncode}, expected 2 (user error):\n{text[-3000:]}"
    assert "Traceback" not in text, text[-3000:]
    for needle in needles:
        assert needle in text, f"{needle!r} not in the message:\n{text[-2000:]}"
    if run_dir is not None:
        assert not (run_dir / "points.csv").exists() and not (run_dir / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ run configs
# refused by Hydra while composing (the CLI turns its exception into one clear line): run through the CLI
COMPOSE_CASES = {
    "typo_key": (["train.stpes=3"], ["train.stpes"]),
    "unknown_group_option": (["algo=nope"], ["algo", "nope"]),
}
# refused by rlhf_lab's own checks after composition: checked in-process
CONFIG_CASES = {
    "wrong_type": (["train.steps=abc"], ["train.steps"]),
    "impossible_batch_division": (["train.batch_size=10", "train.micro_batch_size=4"], ["train.batch_size"]),
    "unknown_precision": (["train.precision=fp8"], ["train.precision"]),
    "unknown_loss": (["algo.loss_type=foo"], ["algo.loss_type", "foo"]),
    "negative_beta": (["algo.beta=-1"], ["beta"]),
    "reward_model_lr_zero": (["reward_model.lr=0"], ["reward_model.lr"]),
    "unknown_optimizer": (["optim.name=lion"], ["optim.name"]),
    "zero_eval_temperature": (["eval.temperature=0"], ["eval.temperature"]),
    "compile_under_deepspeed": (["strategy=zero2", "train.compile=true"], ["train.compile"]),
    "offload_param_below_zero3": (["strategy=zero2", "strategy.offload_param=true"], ["strategy.offload_param"]),
    "ppo_rollout_not_divisible": (["algo=ppo", "algo.rollout_batch_size=30", "algo.num_mini_batches=4"],
                                  ["algo."]),
    "task_none_without_data": (["task=none", "model=hf", "model.name_or_path=x"], ["data.source"]),
    # set but never read by the chosen algorithm: silently ignored before, refused now
    "ppo_given_dpo_batch": (["algo=ppo", "train.batch_size=16"], ["train.batch_size", "algo.rollout_batch_size"]),
    "dpo_given_reward_model_key": (["reward_model.steps=5"], ["reward_model.steps", "DPO family"]),
}


def compose_case(ws: Path, case: str) -> "Case":
    overrides, needles = COMPOSE_CASES[case]
    run_dir = ws / "runs" / f"cfg_{case}"
    return Case(["logger=none", *overrides, f"output_root={ws}", f"cache_dir={ws / 'cache'}",
                 f"hydra.run.dir={run_dir}"], needles, run_dir)


@pytest.mark.parametrize("case", sorted(COMPOSE_CASES))
def test_config_hydra_cannot_compose_is_refused_at_start(outcomes, case):
    outcomes.check(f"compose:{case}")


@pytest.mark.parametrize("case", sorted(CONFIG_CASES))
def test_bad_run_config_is_refused_at_start(case):
    """What the CLI does before anything runs (cli.train_app: compose, validate, refuse unread keys), in-process:
    the CLI's own exit code and message format are tested once in tests/test_config.py."""
    from rlhf_lab.config import validate_run_config
    from rlhf_lab.config_keys import check_keys_are_read, override_keys
    from rlhf_lab.utils.errors import ConfigError
    from tests.test_config import composed

    overrides, needles = CONFIG_CASES[case]
    with pytest.raises(ConfigError) as refused:
        check_keys_are_read(validate_run_config(composed(*overrides)), override_keys(overrides))
    for needle in needles:
        assert needle in str(refused.value), (needle, str(refused.value))


# ------------------------------------------------------------------------------------------------ datasets
def _parquet_wrong_types(path: Path) -> Path:
    pd.DataFrame({"prompt": [1, 2], "chosen": [3, 4], "rejected": [5, 6]}).to_parquet(path)
    return path


DATA_CASES = {   # name -> (file builder, needles); every case is an error naming the file (and row)
    "missing_file": (lambda d: d / "nope.jsonl", ["nope.jsonl"]),
    "empty_file": (lambda d: write_jsonl(d / "empty.jsonl", []), ["empty.jsonl", "no rows"]),
    "broken_jsonl_line": (lambda d: write_jsonl(d / "broken.jsonl", [GOOD[0], '{"prompt": "x", "chosen":']),
                          ["broken.jsonl", "line 2"]),
    "jsonl_line_not_object": (lambda d: write_jsonl(d / "list.jsonl", [GOOD[0], "[1, 2]"]), ["list.jsonl", "line 2"]),
    "missing_column": (lambda d: write_jsonl(d / "nocol.jsonl", [{"prompt": "a", "chosen": "b"}]),
                       ["nocol.jsonl", "rejected"]),
    "every_row_bad": (lambda d: write_jsonl(d / "allbad.jsonl", [{"prompt": "a", "chosen": "x", "rejected": "x"}] * 3),
                      ["allbad.jsonl", "every row was skipped", "chosen identical to rejected"]),
    "parquet_wrong_types": (lambda d: _parquet_wrong_types(d / "types.parquet"),
                            ["types.parquet", "every row was skipped"]),
    "unpaired_for_paired_loss": (lambda d: write_jsonl(d / "kto.jsonl", [{"prompt": "a", "completion": "b",
                                                                          "label": True}] * 4),
                                 ["kto.jsonl", "unpaired rows"]),
    "unpaired_labels_not_bool": (lambda d: write_jsonl(d / "labels.jsonl", [{"prompt": "a", "completion": "b",
                                                                             "label": "yes"}] * 4),
                                 ["labels.jsonl", "label missing or not a bool"]),
    "unsupported_suffix": (lambda d: (d / "prefs.txt").write_text("x") and d / "prefs.txt", ["prefs.txt"]),
}


def data_case(ws: Path, case: str) -> "Case":
    build, needles = DATA_CASES[case]
    data_dir = ws / "data"
    data_dir.mkdir(exist_ok=True)
    extra = ["algo=kto"] if case == "unpaired_labels_not_bool" else []
    return Case([*run_args(ws, f"data_{case}", build(data_dir)), *extra], needles, ws / "runs" / f"data_{case}")


MODEL_CASES = {"model_no_pad": ["model_no_pad", "no pad token"], "model_no_weights": ["model_no_weights", "could not load"]}


def model_case(ws: Path, model: str) -> "Case":
    path = write_jsonl(ws / "good.jsonl", GOOD)
    return Case(run_args(ws, f"model_{model}", path, model=model), MODEL_CASES[model], ws / "runs" / f"model_{model}")


@pytest.mark.parametrize("case", sorted(DATA_CASES))
def test_bad_dataset_is_refused_with_file_and_reason(outcomes, case):
    outcomes.check(f"data:{case}")


@pytest.mark.parametrize("model", sorted(MODEL_CASES))
def test_bad_model_directory_is_refused(outcomes, model):
    outcomes.check(f"model:{model}")


def test_skippable_rows_are_counted_and_the_run_goes_on(ws):
    """The documented policy for bad rows inside a usable file: skip, count per reason, report, train."""
    conversation = {"prompt": [{"role": "user", "content": "hi"}],
                    "chosen": [{"role": "assistant", "content": "hello"}],
                    "rejected": [{"role": "assistant", "content": "go"}]}
    bad = [
        {"prompt": "a", "chosen": "same", "rejected": "same"},                             # chosen == rejected
        {"prompt": "b", "chosen": "", "rejected": "x"},                                     # empty completion
        {"prompt": "c", "chosen": 3, "rejected": "x"},                                      # not a string
        {"prompt": "d", "chosen": None, "rejected": "x"},                                   # null field
        {**conversation, "chosen": [{"role": "wizard", "content": "hello"}]},              # unknown role
        {**conversation, "chosen": [{"role": "user", "content": "hello"}]},                # no assistant turn
        {"prompt": "e", "chosen": [{"role": "assistant", "content": "x"}], "rejected": "y"},  # mixed types
    ]
    path = write_jsonl(ws / "mixed.jsonl", GOOD + bad)
    out = run_cli(run_args(ws, "skips", path), ws, timeout=300)
    text = out.stdout + out.stderr
    assert f"kept {len(GOOD)}/{len(GOOD) + len(bad)} rows" in text
    for reason in ("chosen identical to rejected", "empty 'chosen'", "missing or null 'chosen'", "unknown role",
                   "no assistant turn", "mixes text and message-list"):
        assert reason in text, reason
    assert (ws / "runs" / "skips" / "summary.json").exists()


# ------------------------------------------------------------------------------------------------ study files
ARM = {"overrides": ["algo=dpo"], "sweep": {"algo.beta": [0.1]}}
STUDY_CASES = {
    "unknown_top_level_key": ({"name": "s", "arms": {"dpo": ARM}, "seedz": [0]}, ["seedz"]),
    "missing_arms": ({"name": "s"}, ["arms"]),
    "arms_empty": ({"name": "s", "arms": {}}, ["arms"]),
    "unknown_arm_key": ({"name": "s", "arms": {"dpo": {**ARM, "sweeps": {}}}}, ["sweeps", "dpo"]),
    "empty_sweep": ({"name": "s", "arms": {"dpo": {"sweep": {"algo.beta": []}}}}, ["algo.beta", "non-empty"]),
    "sweep_not_a_list": ({"name": "s", "arms": {"dpo": {"sweep": {"algo.beta": 0.1}}}}, ["algo.beta"]),
    "duplicate_run_ids": ({"name": "s", "arms": {"dpo": {"sweep": {"algo.beta": [0.1, "0.1"]}}}},
                          ["duplicate run ids", "dpo-beta0.1-seed0"]),
    "seeds_not_integers": ({"name": "s", "arms": {"dpo": ARM}, "seeds": ["one"]}, ["seeds"]),
    "seeds_duplicated": ({"name": "s", "arms": {"dpo": ARM}, "seeds": [0, 0]}, ["seeds"]),
    "overrides_not_strings": ({"name": "s", "arms": {"dpo": {"overrides": [{"algo": "dpo"}]}}}, ["overrides"]),
    "bad_arm_override": ({"name": "s", "arms": {"dpo": {"overrides": ["train.stpes=2"]}}}, ["train.stpes"]),
    "resources_zero_processes": ({"name": "s", "arms": {"dpo": ARM}, "resources": {"processes": 0}},
                                 ["resources.processes"]),
    "judges_unknown_preset": ({"name": "s", "arms": {"dpo": ARM}, "judges": {"presets": ["nobody"]}},
                              ["nobody"]),
    "judges_unknown_key": ({"name": "s", "arms": {"dpo": ARM}, "judges": {"presets": ["oracle"], "pairs": 3}},
                           ["judges", "pairs"]),
    "judge_api_key_missing": ({"name": "s", "arms": {"dpo": ARM}, "judges": {"presets": ["openai"]}},
                              ["OPENAI_API_KEY"]),
    "arm_sweeps_a_key_it_never_reads": ({"name": "s", "arms": {"ppo": {"overrides": ["algo=ppo"],
                                                                       "sweep": {"train.batch_size": [8, 16]}}}},
                                        ["study arm 'ppo'", "train.batch_size"]),
    "not_a_mapping": (["name", "arms"], ["expected a mapping"]),
    "invalid_yaml": ("name: s\narms: {dpo: [\n", ["not valid YAML"]),
}


def study_case(ws: Path, case: str) -> "Case":
    spec, needles = STUDY_CASES[case]
    path = ws / "studies" / f"{case}.yaml"
    path.parent.mkdir(exist_ok=True)
    path.write_text(spec if isinstance(spec, str) else yaml.safe_dump(spec))
    return Case(["study", f"study={path}", f"output_root={ws / 'study_out'}", f"cache_dir={ws / 'cache'}",
                 "train.steps=1"], needles, None)


@pytest.mark.parametrize("case", sorted(STUDY_CASES))
def test_bad_study_file_is_refused_before_anything_runs(ws, case, capsys, monkeypatch):
    """`rlhf-lab study` in-process (what the console script calls, minus its import time): refused with a
    message naming the key, nothing run. The console script's handling of a refusal is tested with the other
    CLI cases."""
    from rlhf_lab.study.runner import study_main
    from rlhf_lab.utils.errors import UserError

    monkeypatch.delenv("OPENAI_API_KEY", raising=False)   # the judge case needs it absent
    monkeypatch.chdir(ws)
    args = study_case(ws, case).args[1:]
    try:
        code, message = study_main(args), ""
    except UserError as e:
        code, message = 2, str(e)
    message += capsys.readouterr().err
    assert code != 0, f"study {case} was accepted"
    for needle in STUDY_CASES[case][1]:
        assert needle in message, (needle, message[-800:])
    assert not list((ws / "study_out").glob("*/points.csv"))


# ------------------------------------------------------------------------------------------------ runner
@dataclass
class Case:
    args: list[str]
    needles: list[str]
    run_dir: Path | None     # where a run would have written its outputs (None: a study)


class Outcomes:
    """Every case's CLI call, run two at a time (the calls are independent and mostly import time): the corpus
    costs half the wall time of running its cases one after another, and each case still reports on its own."""

    def __init__(self, ws: Path):
        self.ws = ws
        builders = {"compose": (compose_case, COMPOSE_CASES), "data": (data_case, DATA_CASES),
                    "model": (model_case, MODEL_CASES)}
        self.cases = {f"{kind}:{name}": build(ws, name) for kind, (build, table) in builders.items()
                      for name in table}
        env = cli_env()
        env.pop("OPENAI_API_KEY", None)   # the judge case needs it absent
        with ThreadPoolExecutor(max_workers=2) as pool:
            futures = {name: pool.submit(run_cli, case.args, ws, check=False, timeout=300, env=env)
                       for name, case in self.cases.items()}
            self.results = {name: future.result() for name, future in futures.items()}

    def check(self, name: str) -> None:
        case = self.cases[name]
        assert_refused(self.results[name], case.run_dir, *case.needles)


@pytest.fixture(scope="module")
def outcomes(ws) -> Outcomes:
    return Outcomes(ws)
