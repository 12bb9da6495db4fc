"""A model directory that ships its own Python code (`auto_map`) is never executed unless the run sets
model.trust_remote_code=true: by default loading it is a clear error naming the key, and the code did not run."""
from __future__ import annotations

import json

import pytest

from rlhf_lab.models.build import allow_remote_code, load_causal_lm, load_tokenizer
from rlhf_lab.utils.errors import UserError

PAYLOAD = """
from pathlib import Path
Path({marker!r}).write_text("the model's own code ran")
from transformers import GPT2Config


class RemoteConfig(GPT2Config):
    model_type = "remote_gpt2"
"""


@pytest.fixture
def remote_code_model(tmp_path):
    """A model directory whose config points transformers at a Python file of its own; running that file leaves
    a marker file behind."""
    model_dir, marker = tmp_path / "model", tmp_path / "executed.txt"
    model_dir.mkdir()
    (model_dir / "configuration_remote.py").write_text(PAYLOAD.format(marker=str(marker)))
    (model_dir / "config.json").write_text(json.dumps({
        "model_type": "remote_gpt2", "auto_map": {"AutoConfig": "configuration_remote.RemoteConfig"},
        "n_layer": 1, "n_embd": 8, "n_head": 2, "vocab_size": 16}))
    (model_dir / "tokenizer_config.json").write_text(json.dumps(
        {"auto_map": {"AutoTokenizer": ["configuration_remote.RemoteTokenizer", None]}}))
    yield model_dir, marker
    allow_remote_code(False)


def test_remote_code_is_refused_by_default_and_runs_only_when_allowed(remote_code_model):
    model_dir, marker = remote_code_model
    for load in (load_causal_lm, load_tokenizer):
        with pytest.raises(UserError, match="model.trust_remote_code=true"):
            load(model_dir)
    assert not marker.exists()
    allow_remote_code(True)                 # what model.trust_remote_code=true does at a run's start
    with pytest.raises(Exception):          # the toy has no weights; what matters is that its code ran
        load_causal_lm(model_dir)
    assert marker.read_text() == "the model's own code ran"
