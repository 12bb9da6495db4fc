"""Data-parallel scaling on this machine: DPO and PPO throughput at 1 and 2 processes, per strategy.

Every contestant is the real CLI on the embedded IMDb task's default policy (gpt2_tiny: 4 layers, 128 wide),
with the same global batch and the same cores: 1 process × 2 torch threads against 2 processes × 1 thread each
(torchrun, gloo), for DDP (strategy=torch) and DeepSpeed ZeRO-2 / ZeRO-3. Throughput is the median over the
timed steps of the trainer's own `train/pairs_per_s` (DPO) or `train/episodes_per_s` (PPO) from metrics.jsonl,
after `--warmup` steps; scaling efficiency = throughput(2) / (2 × throughput(1)). Peak RSS per rank comes from
each run's summary.json. One run, contestants in turn, so the ratios are fair; the CPU flags are recorded.

    python benchmarks/dp_scaling.py [--steps 24] [--warmup 4] [--out benchmarks/results/dp_scaling.json]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
TASK = ["logger=none", "train.device=cpu", "eval.every=100000", "eval.num_prompts=8", "train.save_model=false",
        "train.checkpoint_every=100000"]
ALGOS = {
    "dpo": (["algo=dpo", "train.batch_size=32", "train.micro_batch_size=16"], "train/pairs_per_s"),
    "ppo": (["algo=ppo", "algo.rollout_batch_size=32", "algo.micro_batch_size=16", "algo.ppo_epochs=2"],
            "train/episodes_per_s"),
}
STRATEGIES = ("torch", "zero2", "zero3")


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "?")
    return {"model": model, "cores": os.cpu_count(), "avx2": "avx2" in flags, "avx512f": "avx512f" in flags,
            "avx512_bf16": "avx512_bf16" in flags, "amx_bf16": "amx_bf16" in flags}


def run(algo: str, strategy: str, processes: int, steps: int, work: Path) -> Path:
    run_dir = work / f"{algo}-{strategy}-{processes}p"
    args = [*TASK, *ALGOS[algo][0], f"strategy={strategy}", f"train.steps={steps}", f"output_root={work}",
            f"cache_dir={work / 'cache'}", f"hydra.run.dir={run_dir}", "force=true"]
    if processes == 1:
        command = [str(Path(sys.executable).with_name("rlhf-lab")), *args, "train.threads=2"]
        env = {**os.environ, "OMP_NUM_THREADS": "2"}
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", "rlhf_lab.cli", *args, "train.threads=1"]
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
    proc = subprocess.run(command, cwd=work, env={**env, "WANDB_MODE": "disabled"}, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{algo} {strategy} {processes}p failed:\n{proc.stderr[-3000:]}")
    return run_dir


def measure(run_dir: Path, key: str, warmup: int) -> dict:
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rates = [r[key] for r in rows if key in r and r["step"] > warmup]
    summary = json.loads((run_dir / "summary.json").read_text())
    return {"throughput": statistics.median(rates), "steps_timed": len(rates),
            "peak_rss_mib_per_rank": [round(x) for x in summary["peak_rss_mib_per_rank"]]}


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=24)
    parser.add_argument("--warmup", type=int, default=4)
    parser.add_argument("--algos", nargs="+", default=list(ALGOS))
    parser.add_argument("--strategies", nargs="+", default=list(STRATEGIES))
    parser.add_argument("--work", type=Path, default=REPO / "outputs" / "dp_scaling")
    parser.add_argument("--out", type=Path, default=REPO / "benchmarks" / "results" / "dp_scaling.json")
    args = parser.parse_args()
    args.work.mkdir(parents=True, exist_ok=True)
    results = {"cpu": cpu_flags(), "steps": args.steps, "warmup": args.warmup, "runs": []}
    for algo in args.algos:
        key = ALGOS[algo][1]
        single = measure(run(algo, "torch", 1, args.steps, args.work), key, args.warmup)
        results["runs"].append({"algo": algo, "strategy": "torch", "processes": 1, **single})
        for strategy in args.strategies:
            two = measure(run(algo, strategy, 2, args.steps, args.work), key, args.warmup)
            two["efficiency"] = round(two["throughput"] / (2 * single["throughput"]), 3)
            results["runs"].append({"algo": algo, "strategy": strategy, "processes": 2, **two})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"CPU: {results['cpu']}")
    print(f"{'algo':5} {'strategy':8} {'procs':>5} {'throughput':>11} {'efficiency':>10}  peak RSS/rank (MiB)")
    for r in results["runs"]:
        print(f"{r['algo']:5} {r['strategy']:8} {r['processes']:>5} {r['throughput']:>11.2f} "
              f"{r.get('efficiency', ''):>10}  {r['peak_rss_mib_per_rank']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
