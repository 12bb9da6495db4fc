"""Where the project's two shipped trees are: `conf/` (the Hydra configuration) and `experiments/` (one folder per
research question, each with its study file). In a checkout or an editable install they are the repository's
top-level folders; an installed wheel carries them inside the package as `rlhf_lab/conf` and
`rlhf_lab/experiments` (setup.py maps them there). One tree either way, never a copy."""
from __future__ import annotations

from pathlib import Path

PACKAGE_DIR = Path(__file__).resolve().parent


def _shipped(name: str) -> Path:
    inside = PACKAGE_DIR / name
    return inside if inside.is_dir() else PACKAGE_DIR.parent / name


CONF_DIR = _shipped("conf")
EXPERIMENTS_DIR = _shipped("experiments")


def study_file(name: str) -> Path:
    """A study by name: `experiments/<name>/study.yaml` (a research question) or `conf/studies/<name>.yaml` (the
    smoke study and other checks); a name ending in .yaml is a path."""
    if name.endswith(".yaml"):
        return Path(name)
    experiment = EXPERIMENTS_DIR / name / "study.yaml"
    return experiment if experiment.is_file() else CONF_DIR / "studies" / f"{name}.yaml"


def study_names() -> list[str]:
    return sorted({p.parent.name for p in EXPERIMENTS_DIR.glob("*/study.yaml")}
                  | {p.stem for p in (CONF_DIR / "studies").glob("*.yaml")})
