"""The wheel carries the top-level conf/ and experiments/ trees inside the package, and an installed rlhf_lab
finds them there (rlhf_lab/paths.py); a checkout finds the top-level folders."""
from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

from rlhf_lab import paths

REPO = Path(__file__).resolve().parents[1]


def test_checkout_uses_the_top_level_trees():
    assert paths.CONF_DIR == REPO / "conf" and paths.EXPERIMENTS_DIR == REPO / "experiments"
    assert paths.study_file("frontier-imdb") == REPO / "experiments" / "frontier-imdb" / "study.yaml"
    assert paths.study_file("smoke") == REPO / "conf" / "studies" / "smoke.yaml"
    assert {"frontier-imdb", "smoke"} <= set(paths.study_names())


def test_installed_wheel_finds_conf_and_experiments(tmp_path):
    source = tmp_path / "source"          # a copy: building in the checkout would leave build/ behind
    source.mkdir()
    for name in ("pyproject.toml", "setup.py", "README.md", "rlhf_lab", "conf", "experiments"):
        copy = shutil.copytree if (REPO / name).is_dir() else shutil.copy2
        copy(REPO / name, source / name, **({"ignore": shutil.ignore_patterns("__pycache__")}
                                            if (REPO / name).is_dir() else {}))
    subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w",
                    str(tmp_path / "wheel"), str(source)], check=True, capture_output=True, timeout=300)
    wheel = next((tmp_path / "wheel").glob("rlhf_lab-*.whl"))
    names = zipfile.ZipFile(wheel).namelist()
    shipped = {str(p.relative_to(REPO)) for tree in ("conf", "experiments") for p in (REPO / tree).rglob("*")
               if p.is_file() and p.suffix in (".yaml", ".md", ".csv", ".png")}
    assert {f"rlhf_lab/{p}" for p in shipped} <= set(names)
    zipfile.ZipFile(wheel).extractall(tmp_path / "site")
    probe = ("from rlhf_lab import paths; print(paths.CONF_DIR); print(paths.study_file('frontier-imdb').is_file())")
    out = subprocess.run([sys.executable, "-c", probe], cwd=tmp_path, capture_output=True, text=True, timeout=60,
                         env={"PYTHONPATH": str(tmp_path / "site"), "PATH": "/usr/bin:/bin"}, check=True).stdout
    conf, found = out.split()
    assert Path(conf) == tmp_path / "site" / "rlhf_lab" / "conf" and found == "True"
