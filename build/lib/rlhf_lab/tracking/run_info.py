"""What every run directory records so a result can be reproduced: resolved config, versions, git SHA."""
from __future__ import annotations

import importlib.metadata
import json
import platform
import subprocess
import sys
from pathlib import Path

import yaml

from rlhf_lab.utils.cache import atomic_write_text

PACKAGES = ("torch", "transformers", "tokenizers", "datasets", "accelerate", "hydra-core", "omegaconf", "wandb",
            "numpy", "pandas", "scikit-learn", "deepspeed", "trl", "rlhf_lab")


def package_versions() -> dict[str, str]:
    versions = {"python": sys.version.split()[0], "platform": platform.platform()}
    for name in PACKAGES:
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return versions


def git_info() -> dict[str, str | bool | None]:
    """SHA of the checkout that holds this package (None when installed from a wheel), and whether it is dirty."""
    repo = Path(__file__).resolve().parents[2]
    try:
        sha = subprocess.run(["git", "-C", str(repo), "rev-parse", "HEAD"], capture_output=True, text=True,
                             timeout=10, check=True).stdout.strip()
        dirty = bool(subprocess.run(["git", "-C", str(repo), "status", "--porcelain", "--untracked-files=no"],
                                    capture_output=True, text=True, timeout=10).stdout.strip())
        return {"sha": sha, "dirty": dirty}
    except (OSError, subprocess.SubprocessError):
        return {"sha": None, "dirty": None}


def write_run_info(run_dir: Path, resolved_config: dict) -> dict:
    """Write config.yaml, versions.json and git.json into the run directory; return the git info."""
    run_dir.mkdir(parents=True, exist_ok=True)
    atomic_write_text(run_dir / "config.yaml", yaml.safe_dump(resolved_config, sort_keys=False))
    atomic_write_text(run_dir / "versions.json", json.dumps(package_versions(), indent=2))
    git = git_info()
    atomic_write_text(run_dir / "git.json", json.dumps(git, indent=2))
    return git
