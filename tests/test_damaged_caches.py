"""Damaged caches are caught on use: a stage, checkpoint or finished run whose files no longer match the manifest
written when it was published (a truncated or missing file, a directory renamed to another key, a key.json that
does not hash to its name) is rebuilt, skipped or refused with a message — never used."""
from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.recipes.run import _finished
from rlhf_lab.recipes.stages import cached_stage
from rlhf_lab.trainers.checkpoint import complete_checkpoints
from rlhf_lab.trainers.loop import Checkpointer
from rlhf_lab.utils.cache import COMPLETE_MARKER, atomic_dir, damage, mark_complete

KEY = {"stage": "toy", "lr": 0.001}


def toy_stage(cache: Path, payload: bytes = b"weights" * 100):
    """A stage whose build writes one file and counts its builds."""
    builds = []

    def build(tmp: Path) -> None:
        builds.append(tmp)
        (tmp / "model.bin").write_bytes(payload)

    return cached_stage(cache, "toy", KEY, build), builds


def truncate(path: Path, keep: int = 5) -> None:
    path.write_bytes(path.read_bytes()[:keep])


def test_the_manifest_names_what_is_wrong(tmp_path):
    with atomic_dir(tmp_path / "abc") as tmp:
        (tmp / "sub").mkdir()
        (tmp / "sub" / "a.bin").write_bytes(b"12345678")
        (tmp / "b.txt").write_text("hello")
    published = tmp_path / "abc"
    manifest = json.loads((published / COMPLETE_MARKER).read_text())
    assert manifest == {"published_as": "abc", "files": {"b.txt": 5, "sub/a.bin": 8}}
    assert damage(published) is None
    truncate(published / "sub" / "a.bin", 3)
    assert damage(published) == "sub/a.bin has 3 bytes, 8 when it was published (truncated?)"
    (published / "sub" / "a.bin").unlink()
    assert damage(published) == "sub/a.bin is missing"
    (published / "sub" / "a.bin").write_bytes(b"12345678")
    published.rename(tmp_path / "xyz")
    assert "published as 'abc', not 'xyz'" in damage(tmp_path / "xyz")
    (tmp_path / "xyz" / COMPLETE_MARKER).write_text("ok\n")           # an older marker without a manifest
    assert "manifest is missing or unreadable" in damage(tmp_path / "xyz")


def test_a_link_to_a_growing_file_outside_is_not_damage(tmp_path):
    """W&B links each run's logs/debug-core.log to its service's shared log, which grows with every later run: a
    finished run must stay intact (a study rerun once found all 28 of its finished runs 'damaged' by this)."""
    shared = tmp_path / "shared.log"
    shared.write_text("a")
    with atomic_dir(tmp_path / "run") as tmp:
        (tmp / "points.csv").write_text("x")
        (tmp / "debug-core.log").symlink_to(shared)
    assert json.loads((tmp_path / "run" / COMPLETE_MARKER).read_text())["files"] == {"points.csv": 1}
    shared.write_text("grown by another run")
    assert damage(tmp_path / "run") is None
    # a manifest written before links were left out lists it: the link is still not the directory's to check
    mark = tmp_path / "run" / COMPLETE_MARKER
    mark.write_text(json.dumps({"published_as": "run", "files": {"points.csv": 1, "debug-core.log": 1}}))
    assert damage(tmp_path / "run") is None


def test_a_truncated_stage_is_moved_aside_and_rebuilt(tmp_path, caplog):
    first, builds = toy_stage(tmp_path)
    assert first.built and len(builds) == 1
    again, builds = toy_stage(tmp_path)
    assert not again.built and not builds                              # intact: reused
    truncate(first.dir / "model.bin")
    with caplog.at_level(logging.WARNING):
        rebuilt, builds = toy_stage(tmp_path)
    assert rebuilt.built and len(builds) == 1 and rebuilt.dir == first.dir
    assert (rebuilt.dir / "model.bin").read_bytes() == b"weights" * 100
    (aside,) = (tmp_path / "toy").glob(f".damaged-{first.key}-*")
    assert (aside / "model.bin").read_bytes() == b"weigh"              # kept for inspection, never used
    assert "model.bin has 5 bytes, 700 when it was published" in caplog.text and str(aside) in caplog.text


def test_a_stage_whose_key_does_not_match_is_rebuilt(tmp_path, caplog):
    first, _ = toy_stage(tmp_path)
    key_file = first.dir / "key.json"
    edited = json.dumps({**KEY, "lr": 0.002}, indent=2, sort_keys=True)  # same length: the manifest still fits
    assert len(edited) == key_file.stat().st_size
    key_file.write_text(edited)
    with caplog.at_level(logging.WARNING):
        rebuilt, builds = toy_stage(tmp_path)
    assert rebuilt.built and len(builds) == 1
    assert json.loads((rebuilt.dir / "key.json").read_text()) == KEY
    assert "key.json hashes to" in caplog.text and "not to the directory's name" in caplog.text


def test_a_damaged_checkpoint_is_skipped_for_the_previous_one(tmp_path, caplog):
    strategy = TorchStrategy("cpu")
    model = torch.nn.Linear(3, 1)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpoints = Checkpointer(tmp_path / "checkpoints", {"policy": strategy}, "hash")
    first = checkpoints.save(1, {"cursor": 1}, {})
    second = checkpoints.save(2, {"cursor": 2}, {})
    assert checkpoints.latest() == second
    truncate(second / "policy" / "torch_state.pt")
    with caplog.at_level(logging.WARNING):
        assert complete_checkpoints(checkpoints.root) == [first]
    assert checkpoints.latest() == first and checkpoints.load(first, {})["cursor"] == 1
    assert "torch_state.pt has 5 bytes" in caplog.text


def test_a_damaged_finished_run_is_refused_with_a_message(tmp_path):
    run = tmp_path / "dpo-beta0.1-seed0"
    run.mkdir()
    (run / "points.csv").write_text("step,kl_mean\n0,0.0\n3,0.5\n")
    mark_complete(run)
    assert _finished(run, force=False) == (True, None)
    truncate(run / "points.csv", 10)
    finished, problem = _finished(run, force=False)
    assert not finished and "points.csv has 10 bytes" in problem and "force=true" in problem
    assert _finished(run, force=True) == (False, None)                # force: trained afresh
    (run / COMPLETE_MARKER).write_text("ok\n")                        # finished by an rlhf_lab without manifests
    assert _finished(run, force=False) == (True, None)                # reused (with a warning), not refused
