"""Shared fixtures: a tiny BPE tokenizer and tiny GPT-2 models built here (no hub, no network)."""
from __future__ import annotations

from pathlib import Path

import os

import pytest
import torch

os.environ.setdefault("WANDB_MODE", "offline")
os.environ.setdefault("WANDB_SILENT", "true")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
torch.set_num_threads(2)

SENTENCES = [
    "this movie was great and the acting was wonderful",
    "this movie was terrible and the plot was boring",
    "i loved the music and the story of this film",
    "the worst film i have seen in years, awful acting",
    "a fine cast, a clever script and a happy ending",
]


@pytest.fixture(scope="session")
def tiny_tokenizer(tmp_path_factory):
    from tests.tokenizers_for_tests import tiny_bpe_tokenizer

    fast = tiny_bpe_tokenizer(SENTENCES * 4, pad="<|pad|>", eos="<|endoftext|>", bos="<|endoftext|>",
                              special_order=["<|endoftext|>", "<|pad|>"])
    fast.padding_side = "left"
    path = tmp_path_factory.mktemp("tok")
    fast.save_pretrained(path)
    return fast


@pytest.fixture
def tiny_model(tiny_tokenizer):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    cfg = GPT2Config(n_layer=2, n_embd=32, n_head=2, n_positions=64, vocab_size=len(tiny_tokenizer),
                     bos_token_id=tiny_tokenizer.bos_token_id, eos_token_id=tiny_tokenizer.eos_token_id,
                     pad_token_id=tiny_tokenizer.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0)
    return GPT2LMHeadModel(cfg).eval()


@pytest.fixture(scope="session")
def shared_stage_cache(tmp_path_factory):
    """One stage cache for the test modules that run the tiny task (TINY_BASE) as users would, each in its own
    workspace: its `cache` links here, so the task, SFT and preference stages are built once per session, not once
    per module (the cache is content-addressed and locked, the same sharing a study's runs rely on)."""
    return tmp_path_factory.mktemp("shared_stage_cache")


def workspace_with_shared_cache(tmp_path_factory, name: str, cache: Path) -> Path:
    workspace = tmp_path_factory.mktemp(name)
    (workspace / "cache").symlink_to(cache, target_is_directory=True)
    return workspace


@pytest.fixture(scope="session")
def smoke_study_dir(tmp_path_factory):
    """The real `smoke` study (every arm, tiny models) run once through the console script, two points at a time;
    tests that need a finished study (status, report, notebook) read its output directory."""
    from tests.cli import run_cli

    root = tmp_path_factory.mktemp("smoke_study")
    run_cli(["study", "study=smoke", "jobs=2", f"output_root={root}"], root, timeout=900)
    return root / "smoke"
