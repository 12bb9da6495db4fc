"""Progress reports: periodic lines when the output is not a terminal, a snapshot file for `rlhf-lab status`, and
the status text for a run and a stage being built elsewhere."""
from __future__ import annotations

import json
import logging

from rlhf_lab.study.status import format_status, stage_states
from rlhf_lab.utils.lock import file_lock
from rlhf_lab.utils import progress as progress_module
from rlhf_lab.utils.progress import Progress, describe, reporting_to, track


def test_lines_and_snapshot_report_done_total_rate_and_eta(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("RLHF_LAB_PROGRESS_SECONDS", "0")      # a line on every advance
    monkeypatch.setattr(progress_module, "SNAPSHOT_EVERY_S", 0.0)  # and a snapshot
    snapshot = tmp_path / "progress.json"
    with caplog.at_level(logging.INFO), reporting_to(snapshot):
        with Progress("dpo training", total=4, unit="step", initial=1) as progress:   # resumed at step 1
            first = json.loads(snapshot.read_text())
            progress.advance()
            progress.advance()
            during = json.loads(snapshot.read_text())
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("progress:")]
    assert len(lines) == 2                     # one per advance; closing adds none when the last line is current
    assert lines[0].startswith("progress: dpo training 2/4 steps (50%), ") and "steps/s, ETA 0:00:0" in lines[0]
    assert lines[1].startswith("progress: dpo training 3/4 steps (75%)")
    assert (first["done"], first["total"], first["rate"]) == (1, 4, None)       # nothing measured yet
    assert during["done"] == 3 and during["rate"] > 0 and during["eta_s"] >= 0  # resumed steps are not in the rate
    assert during["eta_s"] == (4 - 3) / during["rate"]


def test_short_work_is_quiet_and_off_is_silent(tmp_path, monkeypatch, caplog):
    with caplog.at_level(logging.INFO):
        assert list(track(range(3), "evaluation: sampling", 3, "batch")) == [0, 1, 2]   # under 30 s: no line
        monkeypatch.setenv("RLHF_LAB_PROGRESS", "off")
        monkeypatch.setenv("RLHF_LAB_PROGRESS_SECONDS", "0")
        with reporting_to(tmp_path / "p.json"):
            list(track(range(3), "judging", 3, "run"))
    assert "progress:" not in caplog.text and not (tmp_path / "p.json").exists()


def test_describe_formats_a_snapshot():
    snap = {"what": "ppo training", "done": 30, "total": 100, "unit": "step", "rate": 2.0, "eta_s": 35.0}
    assert describe(snap) == "ppo training 30/100 steps (30%), 2.00 steps/s, ETA 0:00:35"
    assert describe({**snap, "done": 100, "eta_s": 0.0}) == "ppo training 100/100 steps (100%), 2.00 steps/s"
    assert describe({**snap, "unit": "batch", "rate": None, "eta_s": None}) == "ppo training 30/100 batches (30%)"
    assert describe({**snap, "rate": 1234.5, "eta_s": 3725}) == "ppo training 30/100 steps (30%), 1234 steps/s, ETA 1:02:05"


def test_status_shows_the_progress_of_a_running_run_and_stage(tmp_path):
    """What `rlhf-lab status` prints for work another process is doing: it holds the lock, the snapshot says
    how far it is."""
    study_dir, cache = tmp_path / "study", tmp_path / "cache"
    run = study_dir / "runs" / "ppo-kl_coef0.05-seed0"
    run.mkdir(parents=True)
    with reporting_to(run / "progress.json"):
        Progress("ppo training", total=10, unit="step", initial=3)
    (cache / "sft").mkdir(parents=True)
    with reporting_to(cache / "sft" / ".abc123.progress.json"):
        Progress("sft training", total=20, unit="step", initial=5)
    with file_lock(run / ".run.lock"), file_lock(cache / "sft" / ".abc123.lock"):
        text, not_done = format_status("demo", study_dir, cache, [run.name, "dpo-beta0.1-seed0"])
        (stage,) = stage_states(study_dir, cache)
    assert not_done == 2
    assert "running      ppo-kl_coef0.05-seed0" in text and "ppo training 3/10 steps (30%)" in text
    assert "missing      dpo-beta0.1-seed0" in text
    assert stage[:2] == ("sft", "abc123") and "running (being built now): sft training 5/20 steps (25%)" in stage[2]
