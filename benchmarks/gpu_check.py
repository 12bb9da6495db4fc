"""The GPU check (`make gpu-check`): what a machine with GPUs can verify that the CPU suite cannot.

    1. the `gpu`-marked tests (tests/test_gpu.py: bf16 on CUDA, ZeRO-3 on every visible GPU, CPU vs GPU points);
    2. a ZeRO-3 DPO run and a ZeRO-3 PPO run (learned reward: four roles) across all visible GPUs through the CLI
       under torchrun, on a GPT-2-small-shaped policy (12 layers, 768 wide, the task's 4,096-token vocabulary);
    3. each run's peak `torch.cuda.max_memory_allocated` (every rank, from its summary.json) beside the memory
       planner's ZeRO-3 prediction for the same model, algorithm, GPU count and batch shape.

Everything goes to benchmarks/results/gpu_check.json (device, GPU count, measured, predicted, ratio, wall time).

    python benchmarks/gpu_check.py [--out benchmarks/results/gpu_check.json] [--steps 20] [--skip-tests]
"""
from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
MODEL = ["model.config.n_layer=12", "model.config.n_embd=768", "model.config.n_head=12",
         "model.config.n_positions=128", "sft.steps=100"]
RUNS = {
    # algo overrides; planner (algo, micro_batch, seq_len): DPO rows are pairs of prompt 16 + completion 49
    "dpo": (["algo=dpo", "train.micro_batch_size=8", "train.batch_size={b}"], ("dpo", 8, 65)),
    "ppo": (["algo=ppo", "algo.rollout_batch_size={b}", "algo.micro_batch_size=8", "algo.num_mini_batches=1"],
            ("ppo", 8, 56)),
}


def run(algo: str, gpus: int, steps: int, out: Path) -> dict:
    overrides, _ = RUNS[algo]
    batch = 8 * gpus
    run_dir = out / f"{algo}-zero3"
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
               "-m", "rlhf_lab.cli", *MODEL, *(o.format(b=batch) for o in overrides), "strategy=zero3",
               "train.device=cuda", "train.precision=bf16", f"train.steps={steps}", f"eval.every={steps}",
               "logger=none", f"output_root={out}", f"hydra.run.dir={run_dir}"]
    started = time.time()
    proc = subprocess.run(command, cwd=out, capture_output=True, text=True)
    if proc.returncode != 0:
        return {"ok": False, "returncode": proc.returncode, "stderr_tail": proc.stderr[-3000:]}
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"ok": True, "wall_s": round(time.time() - started, 1), "run_seconds": summary["seconds"],
            "peak_gpu_mib_per_rank": summary.get("peak_gpu_mib_per_rank"), "peak_gpu_mib": summary.get("peak_gpu_mib")}


def predicted_mib(algo: str, gpus: int, gpu_gib: float) -> float:
    """The planner's ZeRO-3 total per GPU for the run's model (vocabulary 4,096 as the task's tokenizer)."""
    from transformers import AutoConfig

    from rlhf_lab.distributed.planner import OPTIONS, plan, shape_from_config

    config = AutoConfig.for_model("gpt2", n_layer=12, n_embd=768, n_head=12, n_positions=128, vocab_size=4096)
    _, (plan_algo, micro, seq) = RUNS[algo]
    zero3 = [o for o in OPTIONS if o.stage == 3 and not o.offload_optimizer]
    result = plan(shape_from_config(config), plan_algo, gpus, gpu_gib, micro_batch=micro, seq_len=seq,
                  options=zero3)
    return result.rows[0].total / 2**20


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "gpu_check.json")
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "gpu_check")
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--skip-tests", action="store_true")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("gpu-check: no CUDA device visible; nothing to check", file=sys.stderr)
        return 2
    gpus = torch.cuda.device_count()
    props = torch.cuda.get_device_properties(0)
    gpu_gib = props.total_memory / 2**30
    report = {"device": props.name, "gpus": gpus, "gpu_gib": round(gpu_gib, 1), "torch": torch.__version__,
              "cuda": torch.version.cuda}
    if not args.skip_tests:
        tests = subprocess.run([sys.executable, "-m", "pytest", "-q", "-m", "gpu", "tests/test_gpu.py"], cwd=REPO,
                               capture_output=True, text=True)
        report["gpu_tests"] = {"returncode": tests.returncode, "tail": tests.stdout[-1500:]}
    args.work.mkdir(parents=True, exist_ok=True)
    for algo in RUNS:
        measured = run(algo, gpus, args.steps, args.work)
        measured["planner_zero3_mib"] = round(predicted_mib(algo, gpus, gpu_gib), 1)
        if measured.get("peak_gpu_mib"):
            measured["measured_over_predicted"] = round(measured["peak_gpu_mib"] / measured["planner_zero3_mib"], 3)
        report[algo] = measured
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2))
    print(json.dumps(report, indent=2))
    ok = all(report[a].get("ok") for a in RUNS) and report.get("gpu_tests", {"returncode": 0})["returncode"] == 0
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
