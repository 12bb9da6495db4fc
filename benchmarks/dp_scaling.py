"""Data-parallel scaling on this machine: DPO and PPO throughput at 1 and 2 processes, per strategy.

Every contestant is the real CLI on the embedded IMDb task's default policy (gpt2_tiny: 4 layers, 128 wide),
with the same global batch. Contestants per algorithm, in one run so the ratios are fair:
  1p x 1t   one process, one torch thread: the baseline of the scaling efficiency
  1p x 2t   one process, two threads: what the same two cores give without data parallelism
  2p x 1t   two processes (torchrun, gloo), one thread each: DDP (strategy=torch), ZeRO-2 and ZeRO-3
Throughput is the median over the timed steps of the trainer's own `train/pairs_per_s` (DPO) or
`train/episodes_per_s` (PPO) from metrics.jsonl, after `--warmup` steps. Speed-up = throughput / throughput(1p x 1t);
scaling efficiency = speed-up / cores used. The cached stages (SFT, preferences, reward model) are built by an
untimed run first, so no contestant pays for them and peak RSS per rank (each run's summary.json) is the run's own.
The CPU flags are recorded.

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


def run(algo: str, strategy: str, processes: int, threads: int, steps: int, work: Path) -> Path:
    run_dir = work / f"{algo}-{strategy}-{processes}p{threads}t"
    args = [*TASK, *ALGOS[algo][0], f"strategy={strategy}", f"train.steps={steps}", f"output_root={work}",
            f"cache_dir={work / 'cache'}", f"hydra.run.dir={run_dir}", "force=true", f"train.threads={threads}"]
    if processes == 1:
        command = [str(Path(sys.executable).with_name("rlhf-lab")), *args]
    else:
        command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node",
                   str(processes), "-m", "rlhf_lab.cli", *args]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads), "WANDB_MODE": "disabled"}
    proc = subprocess.run(command, cwd=work, env=env, capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"{algo} {strategy} {processes}p x {threads}t failed:\n{proc.stderr[-3000:]}")
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
        run(algo, "torch", 1, 2, 2, args.work)   # builds (or finds) the cached stages; not timed
        contestants = [("torch", 1, 1), ("torch", 1, 2)] + [(s, 2, 1) for s in args.strategies]
        baseline = None
        for strategy, processes, threads in contestants:
            result = measure(run(algo, strategy, processes, threads, args.steps, args.work), key, args.warmup)
            baseline = baseline or result["throughput"]
            speedup = result["throughput"] / baseline
            results["runs"].append({"algo": algo, "strategy": strategy, "processes": processes, "threads": threads,
                                    **result, "speedup": round(speedup, 3),
                                    "efficiency": round(speedup / (processes * threads), 3)})
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(results, indent=2))
    print(f"CPU: {results['cpu']}")
    print(f"{'algo':5} {'strategy':8} {'layout':>7} {'throughput':>11} {'speed-up':>9} {'efficiency':>10}  "
          "peak RSS/rank (MiB)")
    for r in results["runs"]:
        layout = f"{r['processes']}p x {r['threads']}t"
        print(f"{r['algo']:5} {r['strategy']:8} {layout:>7} {r['throughput']:>11.2f} {r['speedup']:>9.3f} "
              f"{r['efficiency']:>10.3f}  {r['peak_rss_mib_per_rank']}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
