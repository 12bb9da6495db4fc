"""Config validation: typos, wrong types and out-of-range values fail early, naming the key."""
from __future__ import annotations

import subprocess
import sys

import pytest
from hydra import compose, initialize_config_dir

from rlhf_lab.cli import CONF_DIR
from rlhf_lab.config import validate_run_config
from rlhf_lab.utils.errors import ConfigError


def composed(*overrides: str):
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        return compose("config", overrides=list(overrides))


def test_default_config_is_valid():
    cfg = validate_run_config(composed())
    assert cfg.algo.loss_type == "sigmoid" and cfg.algo.beta == 0.1 and cfg.task.name == "imdb"


@pytest.mark.parametrize("name", ["dpo", "ipo", "simpo", "orpo", "kto", "rpo", "hinge", "robust"])
def test_every_algo_file_validates(name):
    assert validate_run_config(composed(f"algo={name}")).algo.name == "dpo"


@pytest.mark.parametrize(
    "overrides, match",
    [
        (["algo.beta=0"], r"algo.*beta.*> 0|beta must be > 0|beta"),
        (["algo.beta=-1"], r"beta"),
        (["algo=robust", "algo.label_smoothing=0.5"], r"label_smoothing"),
        (["algo.loss_type=sigmod"], r"unknown loss 'sigmod'; valid names: .*aot.*sigmoid"),
        (["algo.beta=abc"], r"algo.beta"),
        (["+algo.betta=0.1"], r"betta"),
        (["train.batch_size=30", "train.micro_batch_size=8"], r"train.batch_size.*multiple"),
        (["train.precision=fp8"], r"train.precision"),
        (["reward.gold=oracle"], r"reward.gold.*classifier \| vader"),
    ],
)
def test_invalid_configs_name_the_key(overrides, match):
    with pytest.raises(ConfigError, match=match):
        validate_run_config(composed(*overrides))


def test_cli_typo_is_a_clear_error_not_a_traceback(tmp_path):
    """A misspelt key on the command line ends with Hydra's message naming it, and no Python traceback."""
    out = subprocess.run([sys.executable, "-m", "rlhf_lab.cli", "algo.betta=0.1", f"output_root={tmp_path}"],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode != 0
    assert "betta" in out.stderr
    assert "Traceback" not in out.stderr


def test_cli_semantic_error_exits_2(tmp_path):
    out = subprocess.run([sys.executable, "-m", "rlhf_lab.cli", "algo.loss_type=nope", "logger=none",
                          f"output_root={tmp_path}"], capture_output=True, text=True, timeout=120)
    assert out.returncode == 2
    assert "unknown loss 'nope'" in (out.stderr + out.stdout)
    assert "Traceback" not in out.stderr
