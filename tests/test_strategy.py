"""The strategy's gradient accumulation reproduces one large-batch step; the warm-up schedule is linear;
checkpoints refuse pickles and survive a full disk; a stop signal checkpoints before the run hands over."""
from __future__ import annotations

import copy

import pytest
import torch

from rlhf_lab.distributed.strategy import TorchStrategy
from rlhf_lab.trainers.optim import warmup_schedule


def _loss(model, x, y):
    return torch.nn.functional.mse_loss(model(x), y)


def test_accumulation_equals_large_batch():
    torch.manual_seed(0)
    base = torch.nn.Linear(4, 1)
    x, y = torch.randn(8, 4), torch.randn(8, 1)

    big = copy.deepcopy(base)
    s1 = TorchStrategy("cpu", "fp32", grad_accum=1, max_grad_norm=None)
    s1.setup(big, torch.optim.SGD(big.parameters(), lr=0.1))
    s1.backward(_loss(big, x, y))
    assert s1.step().stepped

    small = copy.deepcopy(base)
    s2 = TorchStrategy("cpu", "fp32", grad_accum=2, max_grad_norm=None)
    s2.setup(small, torch.optim.SGD(small.parameters(), lr=0.1))
    s2.backward(_loss(small, x[:4], y[:4]))
    assert not s2.step().stepped
    s2.backward(_loss(small, x[4:], y[4:]))
    assert s2.step().stepped
    for a, b in zip(big.parameters(), small.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-6, atol=1e-7)


def test_clipping_reports_preclip_norm_and_clips():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.zero_()
    s = TorchStrategy("cpu", "fp32", grad_accum=1, max_grad_norm=1.0)
    s.setup(model, torch.optim.SGD(model.parameters(), lr=1.0))
    s.backward((model(torch.tensor([[30.0, 40.0]])) - 1).sum() * -1)  # gradient (-30, -40), norm 50
    result = s.step()
    assert abs(result.grad_norm - 50.0) < 1e-4
    torch.testing.assert_close(model.weight.detach(), torch.tensor([[0.6, 0.8]]))  # step of clipped norm 1


def test_warmup_is_linear_then_constant():
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=1.0)
    sched = warmup_schedule(opt, warmup_steps=4)
    lrs = []
    for _ in range(6):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        sched.step()
    assert lrs == [0.25, 0.5, 0.75, 1.0, 1.0, 1.0]


class _Payload:
    """Unpickling this runs code (writes a marker file): what a tampered checkpoint could do."""

    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return (open, (str(self.marker), "w"))


def test_checkpoint_files_with_a_pickle_payload_are_refused(tmp_path):
    from rlhf_lab.utils.cache import load_state_file
    from rlhf_lab.utils.errors import UserError

    marker = tmp_path / "code_ran"
    torch.save({"step": 3, "trainer": _Payload(marker)}, tmp_path / "state.pt")
    with pytest.raises(UserError, match="state.pt: refusing to load"):
        load_state_file(tmp_path / "state.pt")
    assert not marker.exists()
    torch.save({"step": 3, "order": [2, 0, 1], "weights": torch.ones(2)}, tmp_path / "ok.pt")
    assert load_state_file(tmp_path / "ok.pt")["order"] == [2, 0, 1]


def test_rng_capture_round_trips_through_a_weights_only_file(tmp_path):
    import random

    import numpy as np

    from rlhf_lab.trainers.checkpoint import capture_rng, restore_rng
    from rlhf_lab.utils.cache import load_state_file

    g = torch.Generator().manual_seed(5)
    torch.save(capture_rng({"data": g}), tmp_path / "rng.pt")
    expected = (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item())
    restore_rng(load_state_file(tmp_path / "rng.pt"), {"data": g})
    assert (random.random(), np.random.rand(), torch.rand(1).item(), torch.rand(1, generator=g).item()) == expected


def test_a_full_disk_while_checkpointing_keeps_the_previous_checkpoint(tmp_path, monkeypatch):
    """A failing writer (ENOSPC) mid-save: a clear StorageError naming the checkpoint, the previous checkpoint
    still the newest complete one (a rerun resumes from it), nothing half-written that looks complete."""
    import errno

    from rlhf_lab.trainers.checkpoint import complete_checkpoints
    from rlhf_lab.trainers.loop import Checkpointer
    from rlhf_lab.utils.errors import StorageError

    strategy = TorchStrategy("cpu")
    model = torch.nn.Linear(3, 1)
    strategy.setup(model, torch.optim.SGD(model.parameters(), lr=0.1))
    checkpoints = Checkpointer(tmp_path / "checkpoints", {"policy": strategy}, "hash")
    first = checkpoints.save(1, {"cursor": 1}, {})
    real_save = torch.save

    def full_disk(obj, path, *a, **k):
        if "state.pt" in str(path):
            raise OSError(errno.ENOSPC, "No space left on device", str(path))
        return real_save(obj, path, *a, **k)

    monkeypatch.setattr(torch, "save", full_disk)
    with pytest.raises(StorageError, match=f"step-000002.*No space left.*{first} is intact"):
        checkpoints.save(2, {"cursor": 2}, {})
    assert complete_checkpoints(checkpoints.root) == [first]
    assert checkpoints.load(first, {})["cursor"] == 1


def test_a_full_disk_while_publishing_a_stage_publishes_nothing(tmp_path):
    import errno

    from rlhf_lab.utils.cache import atomic_dir, is_complete
    from rlhf_lab.utils.errors import StorageError

    with pytest.raises(StorageError, match="stage/abc.*nothing was published"):
        with atomic_dir(tmp_path / "stage" / "abc") as tmp:
            (tmp / "part.bin").write_bytes(b"x")
            raise OSError(errno.ENOSPC, "No space left on device", str(tmp / "model.safetensors"))
    assert not (tmp_path / "stage" / "abc").exists() and not is_complete(tmp_path / "stage" / "abc")
    assert list((tmp_path / "stage").iterdir()) == []


def test_submitits_preemption_signal_waits_for_the_checkpoint_then_reaches_submitit(monkeypatch):
    """Under submitit its preemption signal (USR2) only asks for a stop at the end of the step; submitit's own
    handler (requeue and exit) gets it once the run has checkpointed. Outside submitit, USR2 is left alone."""
    import signal

    from rlhf_lab.trainers.errors import PreemptedError
    from rlhf_lab.trainers.loop import StopRequest

    received = []

    def submitit_handler(signum, _frame):   # the stand-in for submitit's checkpoint_and_try_requeue
        received.append(signum)

    previous = signal.signal(signal.SIGUSR2, submitit_handler)
    try:
        monkeypatch.delenv("SUBMITIT_EXECUTOR", raising=False)
        stop = StopRequest()
        assert signal.getsignal(signal.SIGUSR2) is submitit_handler
        stop.close()
        monkeypatch.setenv("SUBMITIT_EXECUTOR", "slurm")
        stop = StopRequest()
        signal.raise_signal(signal.SIGUSR2)
        assert stop.agreed() and not received            # held back: the step finishes and checkpoints first
        with pytest.raises(PreemptedError, match="checkpointed at step 3.*submitit requeues") as e:
            stop.stop(3, "checkpoints")
        signal.raise_signal(e.value.requeue_signal)      # what cli.train_app does once the run has unwound
        assert received == [signal.SIGUSR2]
    finally:
        signal.signal(signal.SIGUSR2, previous)
