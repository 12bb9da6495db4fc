"""Peak memory of LoRA DPO against full DPO on the same model, each contestant in its own subprocess.

Both contestants build their models with the recipe's own `recipes.dpo.dpo_models` (full: policy + a frozen
reference loaded afresh; LoRA: one model whose adapters are the policy and whose adapters-off view is the
reference) from ONE saved GPT-2 (seeded initialisation), and train it with `trainers.dpo.DPOTrainer.train_step`
(sigmoid loss, β = 0.1, AdamW, fp32, TorchStrategy on one process) on the same seeded synthetic pairs. The
reference log-probs come from a table, as in every rlhf_lab DPO run (the cached reference stage; zeros here: the
loss's value does not change the memory). Evaluation is not run.

Reported per contestant: peak RSS of the process (getrusage) and its growth over the RSS after imports, trainable
and total parameters, and the bytes of what full fine-tuning holds and LoRA does not — distinct parameter storages
(policy and reference together: LoRA's reference shares the policy's), gradients (counted after one more
backward, before the optimizer step that frees them) and optimizer state (AdamW's two moments) — plus the median
step time.

    python benchmarks/lora_memory.py [--layers 6 --hidden 512 --heads 8 --vocab 4096] [--r 8] [--steps 4]
        [--batch 16 --micro 8] [--threads 2] [--out benchmarks/results/lora_memory.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
PROMPT, COMPLETION = 16, 48      # tokens per prompt and per completion (eos included)
CONTESTANTS = ("full", "lora")


def rss_bytes() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) * 1024
    return 0


def storage_bytes(tensors) -> int:
    """Bytes of the distinct storages behind `tensors` (a shared storage counts once)."""
    seen: dict[int, int] = {}
    for t in tensors:
        if t is not None and t.numel():
            seen[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
    return sum(seen.values())


def synthetic_pairs(count: int, vocab: int, seed: int = 0) -> list:
    import torch

    from rlhf_lab.data.batches import TokenizedPair

    g = torch.Generator().manual_seed(seed)

    def tokens(n: int) -> list[int]:
        return torch.randint(2, vocab, (n,), generator=g).tolist()

    return [TokenizedPair(tokens(PROMPT), tokens(COMPLETION - 1) + [0], tokens(COMPLETION - 1) + [0], index=i)
            for i in range(count)]


def build_trainer(contestant: str, base_dir: Path, work: Path, args):
    """The recipe's models for `contestant` in a DPO trainer; returns (trainer, policy, reference)."""
    import types

    import torch

    from rlhf_lab.config import (AlgoConfig, EvalConfig, LoggerConfig, LoraConfig, OptimConfig, RunConfig,
                                 TrainConfig)
    from rlhf_lab.distributed.strategy import TorchStrategy
    from rlhf_lab.eval.points import PointsWriter, RunIdentity
    from rlhf_lab.recipes.dpo import dpo_models
    from rlhf_lab.tracking.logger import RunLogger
    from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer

    lora = LoraConfig(r=args.r if contestant == "lora" else None, alpha=2.0 * args.r)
    cfg = RunConfig(algo=AlgoConfig(), lora=lora)
    strategy = TorchStrategy("cpu", "fp32", args.batch // args.micro, 10.0)
    policy, reference = dpo_models(cfg, base_dir, strategy)
    pairs = synthetic_pairs(args.batch * (args.steps + 1), args.vocab)
    tokenizer = types.SimpleNamespace(pad_token_id=1, eos_token_id=0)
    inputs = DPOInputs(policy, reference, tokenizer, pairs, torch.zeros(len(pairs), 2), [], None,
                       RunIdentity("bench", contestant, "dpo", "sigmoid", 0, beta=0.1, lora_r=lora.r))
    train = TrainConfig(steps=args.steps, batch_size=args.batch, micro_batch_size=args.micro)
    logger = RunLogger(work, LoggerConfig(name="none", mode="disabled"), {}, name=contestant, group="bench", tags=[])
    trainer = DPOTrainer(inputs, AlgoConfig(beta=0.1), OptimConfig(lr=1e-4, warmup_steps=1), train, EvalConfig(),
                         strategy, logger, PointsWriter(work / "points.csv"), seed=0, run_dir=work)
    return trainer, policy, reference


def child(contestant: str, base_dir: Path, args) -> dict:
    """One contestant in this process: train, then count the model states; returns the figures."""
    import torch

    from rlhf_lab.models.lora import trainable_parameters

    torch.set_num_threads(args.threads)
    rss_start = rss_bytes()
    with tempfile.TemporaryDirectory() as work:
        trainer, policy, reference = build_trainer(contestant, base_dir, Path(work), args)
        times = []
        for _ in range(args.steps):
            started = time.perf_counter()
            trainer.train_step()
            times.append(time.perf_counter() - started)
        loss, _ = trainer.compute_loss(trainer.batches.next()[: args.micro])   # one more backward: gradients live
        trainer.strategy.backward(loss)
        params = [*policy.parameters(), *reference.parameters()]
        optimizer = trainer.strategy.optimizer
        states = [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
        trainable, total = trainable_parameters(policy)
        weights, grads, optim = (storage_bytes(x) for x in (params, (p.grad for p in params), states))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
    return {"contestant": contestant, "peak_rss_mib": peak / 2**20, "rss_growth_mib": (peak - rss_start) / 2**20,
            "trainable_params": trainable, "policy_params": total, "weights_mib": weights / 2**20,
            "grads_mib": grads / 2**20, "optimizer_state_mib": optim / 2**20,
            "model_states_mib": (weights + grads + optim) / 2**20, "median_step_s": statistics.median(times),
            "last_loss": float(loss)}


def save_base_model(directory: Path, args) -> None:
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(0)
    config = GPT2Config(n_layer=args.layers, n_embd=args.hidden, n_head=args.heads, n_positions=PROMPT + COMPLETION,
                        vocab_size=args.vocab, bos_token_id=0, eos_token_id=0, pad_token_id=1, resid_pdrop=0.0,
                        embd_pdrop=0.0, attn_pdrop=0.0)
    GPT2LMHeadModel(config).save_pretrained(directory)


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), []))
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {"model_name": model, "cpus": os.cpu_count(),
            **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_bf16")}}


def run_child(contestant: str, base_dir: Path, argv: list[str], timeout: int) -> dict:
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "2")}
    out = subprocess.run([sys.executable, __file__, "--child", contestant, "--base", str(base_dir), *argv],
                         capture_output=True, text=True, timeout=timeout, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"{contestant} failed ({out.returncode}):\n{out.stderr[-3000:]}")
    return json.loads(out.stdout.strip().splitlines()[-1])


def report(rows: list[dict]) -> str:
    lines = ["contestant  trainable      peak RSS  RSS growth  weights  grads  optimizer  states  s/step"]
    for r in rows:
        lines.append(f"{r['contestant']:<10} {r['trainable_params']:>10,} {r['peak_rss_mib']:>10.0f} "
                     f"{r['rss_growth_mib']:>10.0f} {r['weights_mib']:>8.1f} {r['grads_mib']:>6.1f} "
                     f"{r['optimizer_state_mib']:>9.1f} {r['model_states_mib']:>7.1f} {r['median_step_s']:>7.2f}")
    return "\n".join(lines)


def parse_args() -> tuple[argparse.Namespace, list[str]]:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=6)
    p.add_argument("--hidden", type=int, default=512)
    p.add_argument("--heads", type=int, default=8)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--r", type=int, default=8)
    p.add_argument("--steps", type=int, default=4)
    p.add_argument("--batch", type=int, default=16)
    p.add_argument("--micro", type=int, default=8)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--timeout", type=int, default=1800)
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results" / "lora_memory.json"))
    p.add_argument("--child", choices=CONTESTANTS)
    p.add_argument("--base")
    args = p.parse_args()
    shared = [f"--{k}={getattr(args, k)}" for k in ("layers", "hidden", "heads", "vocab", "r", "steps", "batch",
                                                     "micro", "threads")]
    return args, shared


def main() -> None:
    args, shared = parse_args()
    if args.child:
        print(json.dumps(child(args.child, Path(args.base), args)))
        return
    with tempfile.TemporaryDirectory() as tmp:
        save_base_model(Path(tmp), args)
        rows = [run_child(c, Path(tmp), shared, args.timeout) for c in CONTESTANTS]
    full, lora = rows
    result = {"command": " ".join(["python", "benchmarks/lora_memory.py", *sys.argv[1:]]),
              "model": {"arch": "gpt2", "n_layer": args.layers, "n_embd": args.hidden, "n_head": args.heads,
                        "vocab_size": args.vocab},
              "lora": {"r": args.r, "alpha": 2.0 * args.r, "target_modules": "peft default (gpt2: c_attn)"},
              "batch": {"pairs_per_step": args.batch, "micro_batch": args.micro, "prompt_tokens": PROMPT,
                        "completion_tokens": COMPLETION, "steps": args.steps},
              "precision": "fp32", "threads": args.threads, "cpu": cpu_flags(), "python": platform.python_version(),
              "versions": {p: metadata.version(p) for p in ("torch", "transformers", "peft")},
              "rows": rows,
              "saved": {"peak_rss_mib": full["peak_rss_mib"] - lora["peak_rss_mib"],
                        "model_states_mib": full["model_states_mib"] - lora["model_states_mib"],
                        "peak_rss_ratio": lora["peak_rss_mib"] / full["peak_rss_mib"]}}
    print(report(rows))
    print(f"LoRA saves {result['saved']['peak_rss_mib']:.0f} MiB of peak RSS "
          f"({100 * (1 - result['saved']['peak_rss_ratio']):.0f}%), {result['saved']['model_states_mib']:.0f} MiB "
          "of parameters + gradients + optimizer state")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
