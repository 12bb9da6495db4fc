"""The Hydra launcher configs shipped in conf/hydra/launcher compose onto the installed plugins (no cluster needed;
tests/test_slurm.py runs them on a real one)."""
from __future__ import annotations

import pytest
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from rlhf_lab.cli import CONF_DIR


def launcher(name: str) -> dict:
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=[f"hydra/launcher={name}"], return_hydra_config=True)
    node = cfg.hydra.launcher
    OmegaConf.set_readonly(node, False)
    # what the launcher is built from; ${hydra.sweep.dir} etc. need a live Hydra run to resolve
    return {k: node[k] for k in node if not OmegaConf.is_interpolation(node, k)}


def test_slurm_launcher_extends_submitit_slurm_with_defaults():
    cfg = launcher("slurm")
    assert cfg["_target_"] == "hydra_plugins.hydra_submitit_launcher.submitit_launcher.SlurmLauncher"
    assert cfg["cpus_per_task"] == 4 and cfg["mem_gb"] == 16 and cfg["timeout_min"] == 240
    assert cfg["signal_delay_s"] == 120 and cfg["max_num_timeout"] == 3
    # the setup lines reach the sbatch script verbatim: no ${...}, which Hydra would try to resolve (twice)
    assert any("OMP_NUM_THREADS" in line for line in cfg["setup"])
    assert not any("${" in line for line in cfg["setup"])


@pytest.mark.parametrize("jobs, expected", [(None, 2), ("3", 3)])
def test_local_launcher_is_joblib_with_n_jobs_from_the_environment(monkeypatch, jobs, expected):
    if jobs is None:
        monkeypatch.delenv("RLHF_LAB_JOBS", raising=False)
    else:
        monkeypatch.setenv("RLHF_LAB_JOBS", jobs)
    with initialize_config_dir(config_dir=CONF_DIR, version_base="1.3"):
        cfg = compose("config", overrides=["hydra/launcher=local"], return_hydra_config=True)
    assert cfg.hydra.launcher._target_ == "hydra_plugins.hydra_joblib_launcher.joblib_launcher.JoblibLauncher"
    assert cfg.hydra.launcher.n_jobs == expected


def test_plain_joblib_launcher_still_composes():
    # our `local` must not shadow the plugin's own `joblib` (a same-named file would trigger schema matching)
    cfg = launcher("joblib")
    assert cfg["n_jobs"] == -1 and cfg["prefer"] == "processes"
