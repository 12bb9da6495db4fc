"""Measured ZeRO model-state memory beside the planner's prediction (rlhf_lab.distributed.planner).

For each ZeRO stage, launches `torchrun --nproc_per_node 2` (gloo, CPU) on a small GPT-2, builds a DeepSpeed engine
around a client `torch.optim.AdamW` with fp32 weights and bf16 torch autocast (the project's default precision),
runs one training step (so Adam state exists), then the next backward, and counts per rank the bytes of the model
states DeepSpeed holds just before its gradient reduction ("peak": ZeRO-0/1 still hold every full gradient) and
after it: weights (`p.ds_tensor` at ZeRO-3, the flat weight buffer at ZeRO-1/2, the parameters at ZeRO-0),
gradients (`p.grad`, the partitioned gradient buffers), the optimizer's fp32 master partitions and Adam state, each
storage once; other optimizer buffers (reduce buckets) apart. Also the per-rank RSS delta since before the model was
built (psutil, else /proc/self/status VmRSS). The planner's prediction is `trained_state_bytes` for the same P and
N = 2 at precision autocast_bf16. Prints a table and writes the JSON (default benchmarks/results/zero_memory.json).

    python benchmarks/zero_memory.py [--stages 0,1,2,3] [--layers 4 --hidden 256 --vocab 4096]
                                     [--out benchmarks/results/zero_memory.json]

Every stage starts from the same weights and batches, so the two losses printed per stage must agree across stages.
The model is built whole and partitioned by `deepspeed.initialize` (not under `deepspeed.zero.Init`, which would
initialise the weights differently; zero_init only changes the estimators' host figure). ZeRO-3 runs with
`stage3_param_persistence_threshold: 0` (by default DeepSpeed keeps every parameter under 1e5 elements whole on
every rank, which in a model this small is most of them). The bucket sizes are set small (5e5 elements) so the
reduce / prefetch buffers do not dwarf the model; what is still in flight before the reduction epilogue at
ZeRO-2/3 (gradients waiting for their bucket, the bucket itself) is that transient.
"""
from __future__ import annotations

import argparse
import json
import os
import socket
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
MODEL = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": 128, "vocab_size": 4096, "bos_token_id": 0,
         "eos_token_id": 0}
MICRO_BATCH, SEQ, BUCKET = 4, 64, 500_000
STATE_ATTRS = {   # optimizer attributes holding gradients / master weights, by DeepSpeed version 0.19
    "grads": ("averaged_gradients", "grads_in_partition", "grad_partitions_flat_buffer"),
    "master": ("single_partition_of_fp32_groups", "fp32_partitioned_groups_flat"),
}


def rss_bytes() -> int:
    try:
        import psutil

        return psutil.Process().memory_info().rss
    except ImportError:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def tensors_in(value, depth: int = 2):
    """Tensors in a value: a tensor, or lists / tuples / dicts of them (nested up to `depth`)."""
    import torch

    if isinstance(value, torch.Tensor):
        yield value
    elif depth > 0 and isinstance(value, (list, tuple)):
        for v in value:
            yield from tensors_in(v, depth - 1)
    elif depth > 0 and isinstance(value, dict):
        for v in value.values():
            yield from tensors_in(v, depth - 1)


class StorageCounter:
    """Bytes of distinct storages, by category: a storage already counted (under any category) is not again."""

    def __init__(self):
        self.seen: set[int] = set()
        self.bytes: dict[str, int] = {}

    def add(self, category: str, tensors) -> None:
        self.bytes.setdefault(category, 0)
        for t in tensors:
            if t is None or t.numel() == 0 or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            if storage.data_ptr() not in self.seen:
                self.seen.add(storage.data_ptr())
                self.bytes[category] += storage.nbytes()


def count_model_states(engine, stage: int) -> dict[str, int]:
    """Per-rank bytes of weights, gradients, master partitions and Adam state, plus other optimizer tensors."""
    counter = StorageCounter()
    params = list(engine.module.parameters())
    counter.add("weights", (p.ds_tensor if stage == 3 else p.data for p in params))
    counter.add("grads", (p.grad for p in params))
    opt = engine.optimizer
    for category, attrs in STATE_ATTRS.items():
        for attr in attrs:
            counter.add(category, tensors_in(getattr(opt, attr, None)))
    inner = getattr(opt, "optimizer", opt)
    counter.add("adam", (t for state in inner.state.values() for t in tensors_in(state)))
    counter.add("other_optimizer_buffers", (t for v in vars(opt).values() for t in tensors_in(v)))
    return counter.bytes


def ds_config(stage: int) -> dict:
    zero = {"stage": stage, "reduce_bucket_size": BUCKET, "allgather_bucket_size": BUCKET}
    if stage == 3:
        zero.update(stage3_param_persistence_threshold=0, stage3_prefetch_bucket_size=BUCKET,
                    stage3_max_live_parameters=BUCKET, stage3_max_reuse_distance=BUCKET)
    return {"train_micro_batch_size_per_gpu": MICRO_BATCH, "gradient_accumulation_steps": 1,
            "zero_optimization": zero, "torch_autocast": {"enabled": True, "dtype": "bfloat16"},
            "steps_per_print": 10 ** 9}


def worker(stage: int, part_dir: Path) -> None:
    """One rank (under torchrun): build, step once, backward again, count; write this rank's JSON."""
    import deepspeed
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.set_num_threads(1)
    deepspeed.init_distributed(dist_backend="gloo")
    rank = torch.distributed.get_rank()
    config = ds_config(stage)
    generator = torch.Generator().manual_seed(rank)
    batches = [torch.randint(0, MODEL["vocab_size"], (MICRO_BATCH, SEQ), generator=generator) for _ in range(2)]
    rss0 = rss_bytes()
    torch.manual_seed(0)
    model = GPT2LMHeadModel(GPT2Config(**MODEL, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0))
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    engine, *_ = deepspeed.initialize(model=model, optimizer=optimizer, config=config)
    counts = []
    reduce = engine.allreduce_gradients

    def counted_reduce(*args, **kwargs):   # before the reduction: ZeRO-0/1 still hold every full gradient
        if len(losses) == 2:
            counts.append(count_model_states(engine, stage))
        return reduce(*args, **kwargs)

    engine.allreduce_gradients = counted_reduce
    started, losses = time.perf_counter(), []
    for ids in batches:
        loss = engine(input_ids=ids, labels=ids).loss
        losses.append(float(loss.detach()))
        engine.backward(loss)
        if len(losses) == 2:   # Adam state from step 1, this backward's gradients: the model states' peak
            counts.append(count_model_states(engine, stage))
        engine.step()
    model_states = [sum(v for k, v in c.items() if k != "other_optimizer_buffers") for c in counts]
    counted = counts[model_states.index(max(model_states))]
    result = {"rank": rank, "stage": stage, "counted": counted, "counts_before_and_after_reduce": counts,
              "model_states": max(model_states),
              "rss_delta": rss_bytes() - rss0, "losses": losses, "train_seconds": time.perf_counter() - started}
    (part_dir / f"stage{stage}_rank{rank}.json").write_text(json.dumps(result))
    torch.distributed.barrier()
    torch.distributed.destroy_process_group()


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def cpu_flags() -> dict:
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = next((line.split(":", 1)[1].split() for line in text.splitlines() if line.startswith("flags")), [])
    model = next((line.split(":", 1)[1].strip() for line in text.splitlines() if line.startswith("model name")), "")
    return {"model_name": model, "cpus": os.cpu_count(), **{f: f in flags for f in ("avx2", "avx512f", "avx512_bf16")}}


def predicted(stage: int, world: int = 2) -> dict:
    """The planner's numbers for this model (counted on the meta device, as `rlhf-lab plan` does)."""
    from transformers import GPT2Config

    from rlhf_lab.distributed.planner import PRECISIONS, Option, shape_from_config, trained_state_bytes

    shape = shape_from_config(GPT2Config(**MODEL))
    gpu, _ = trained_state_bytes(shape.params, shape.largest_layer, world, 1, Option(stage),
                                 PRECISIONS["autocast_bf16"])
    gathered = 8 * shape.largest_layer if stage == 3 else 0   # the gathered-layer term, not held after backward
    return {"params": shape.params, "largest_layer": shape.largest_layer, "model_states": gpu,
            "model_states_partitioned": gpu - gathered}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--stages", default="0,1,2,3")
    parser.add_argument("--out", type=Path, default=ROOT / "benchmarks/results/zero_memory.json")
    parser.add_argument("--layers", type=int, default=MODEL["n_layer"])
    parser.add_argument("--hidden", type=int, default=MODEL["n_embd"])
    parser.add_argument("--vocab", type=int, default=MODEL["vocab_size"])
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    parser.add_argument("--stage", type=int, help=argparse.SUPPRESS)
    parser.add_argument("--part-dir", type=Path, help=argparse.SUPPRESS)
    args = parser.parse_args()
    MODEL.update(n_layer=args.layers, n_embd=args.hidden, vocab_size=args.vocab)
    if args.worker:
        return worker(args.stage, args.part_dir)
    rows = []
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT)}
    with tempfile.TemporaryDirectory() as tmp:
        for stage in (int(s) for s in args.stages.split(",")):
            started = time.perf_counter()
            subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2",
                            "--master_port", str(free_port()), __file__, "--worker", "--stage", str(stage),
                            "--part-dir", tmp, "--layers", str(args.layers), "--hidden", str(args.hidden),
                            "--vocab", str(args.vocab)], check=True, env=env, cwd=ROOT)
            ranks = [json.loads((Path(tmp) / f"stage{stage}_rank{r}.json").read_text()) for r in range(2)]
            pred = predicted(stage)
            peak = max(r["model_states"] for r in ranks)
            after = max(sum(v for k, v in r["counts_before_and_after_reduce"][-1].items()
                            if k != "other_optimizer_buffers") for r in ranks)
            rows.append({"stage": stage, "ranks": ranks, "predicted": pred, "measured_peak": peak,
                         "measured_after_reduce": after, "peak_over_predicted": peak / pred["model_states"],
                         "after_reduce_over_predicted_partitioned": after / pred["model_states_partitioned"],
                         "wall_seconds": time.perf_counter() - started})
    report = {"model": MODEL, "micro_batch": MICRO_BATCH, "seq_len": SEQ, "world_size": 2, "backend": "gloo",
              "precision": "autocast_bf16 (fp32 weights, bf16 torch autocast)", "cpu": cpu_flags(), "rows": rows}
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(report, indent=2) + "\n")
    MiB = 2 ** 20
    print(f"P = {rows[0]['predicted']['params']:,} parameters, N = 2, autocast_bf16; MiB per rank")
    print(f"{'stage':>5} {'predicted':>9} {'w/o 8L':>7} {'peak':>6} {'ratio':>6} {'after':>6} {'ratio':>6} "
          f"{'RSS delta':>9}  losses (rank 0)")
    for row in rows:
        p, r0 = row["predicted"], row["ranks"][0]
        rss = max(r["rss_delta"] for r in row["ranks"]) / MiB
        print(f"{row['stage']:>5} {p['model_states'] / MiB:>9.1f} {p['model_states_partitioned'] / MiB:>7.1f} "
              f"{row['measured_peak'] / MiB:>6.1f} {row['peak_over_predicted']:>6.3f} "
              f"{row['measured_after_reduce'] / MiB:>6.1f} {row['after_reduce_over_predicted_partitioned']:>6.3f} "
              f"{rss:>9.1f}  {', '.join(f'{x:.4f}' for x in r0['losses'])}")
    print("peak: before the gradient reduction (ZeRO-0/1 hold every full gradient); after: once reduced, beside "
          "the prediction without the gathered-layer term")
    print(f"written {args.out}; cpu: {report['cpu']}")


if __name__ == "__main__":
    main()
