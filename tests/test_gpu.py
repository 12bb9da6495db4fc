"""CUDA checks, run by `make gpu-check` on a machine with GPUs (skipped elsewhere; the suite passes on CPU alone):
bf16 autocast on the GPU tracks fp32, ZeRO-3 on every visible GPU trains DPO and PPO, and the sampler, the
log-prob path and the evaluation agree between CPU and GPU."""
from __future__ import annotations

import json

import pytest
import torch

from tests.cli import run_cli
from tests.distributed import run_torchrun
from tests.test_pipeline_smoke import DPO_BATCH, TINY, TINY_BASE

pytestmark = [pytest.mark.gpu, pytest.mark.integration,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")]


def test_bf16_autocast_loss_on_gpu_tracks_fp32(tiny_model):
    from rlhf_lab.data.collate import collate_sequences
    from rlhf_lab.models.logprobs import sequence_logps

    model = tiny_model.cuda()
    seqs = collate_sequences([[5, 6, 7], [8, 9]], [[10, 11, 12], [13]], pad_id=1).to("cuda")
    fp32 = sequence_logps(model, seqs)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        bf16 = sequence_logps(model, seqs)
    torch.testing.assert_close(bf16.float(), fp32, rtol=0.02, atol=0.05)


@pytest.mark.parametrize("algo", ["dpo", "ppo_gt"])
def test_zero3_on_every_visible_gpu(tmp_path, algo):
    extra = ["algo.rollout_batch_size=8", "algo.micro_batch_size=2", "algo.response_length=8"] if algo == "ppo_gt" \
        else DPO_BATCH
    run = tmp_path / algo
    run_torchrun([*TINY_BASE, f"algo={algo}", *extra, "strategy=zero3", "train.device=cuda", "train.precision=bf16",
                  f"output_root={tmp_path}", f"hydra.run.dir={run}"], tmp_path, nproc=torch.cuda.device_count())
    summary = json.loads((run / "summary.json").read_text())
    assert summary["world_size"] == torch.cuda.device_count() and summary["peak_gpu_mib"] > 0


def test_single_gpu_run_matches_cpu_points_closely(tmp_path):
    for device in ("cpu", "cuda"):
        run_cli([*TINY, f"train.device={device}", f"output_root={tmp_path}", f"hydra.run.dir={tmp_path / device}"],
                tmp_path)
    import csv

    rows = {d: list(csv.DictReader(open(tmp_path / d / "points.csv"))) for d in ("cpu", "cuda")}
    assert [r["step"] for r in rows["cpu"]] == [r["step"] for r in rows["cuda"]]
    for a, b in zip(rows["cpu"], rows["cuda"]):
        assert abs(float(a["gold_reward_mean"]) - float(b["gold_reward_mean"])) < 0.1
