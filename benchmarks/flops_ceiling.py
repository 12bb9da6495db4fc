"""How close the DPO and PPO training steps run to this machine's fp32 matmul ceiling.

Measures the machine's matmul rate on large square matrices and on the shapes of the benchmark models, counts the
FLOPs of one DPO step and one PPO step on the benchmark shapes (dense layers, attention, LM head; backward = 2×
forward), and reports what sustained rate a given step time implies. Used to tell "slower than it could be" from
"at the hardware's limit": a target step time that needs more than the measured matmul ceiling is not reachable
at fp32 on this machine, whatever the framework.

    python benchmarks/flops_ceiling.py [--dpo-ms 699] [--dpo-target 35.2] [--ppo-s 5.41] [--ppo-target 14.1]

Defaults: our measured step times and 3× TRL's best measured rates (11.73 pairs/s, 4.70 episodes/s) from the
runs recorded in the README.
"""
from __future__ import annotations

import argparse
import time

import torch

D, LAYERS, VOCAB = 256, 4, 8192


def matmul_gflops(m: int, k: int, n: int, repeats: int = 5) -> float:
    a, b = torch.randn(m, k), torch.randn(k, n)
    for _ in range(2):
        a @ b
    started = time.perf_counter()
    for _ in range(repeats):
        a @ b
    return 2 * m * k * n * repeats / (time.perf_counter() - started) / 1e9


def body_fwd(tokens: int, seq: int) -> float:
    """Dense layers (QKV, projection, MLP = 12·d² multiply-adds per token per layer) and attention (QKᵀ, AV)."""
    return LAYERS * (tokens * 2 * 12 * D * D + tokens * 2 * 2 * seq * D)


def dpo_step_flops(pairs: int = 16, prompt: int = 16, completion: int = 48) -> float:
    rows, seq = 2 * pairs, prompt + completion
    forward = body_fwd(rows * seq, seq) + rows * completion * 2 * D * VOCAB
    return 3 * forward  # forward + backward (2× forward)


def ppo_step_flops(batch: int = 32, prompt: int = 8, response: int = 48, epochs: int = 4) -> float:
    seq = prompt + response
    tokens = batch * seq
    head = batch * response * 2 * D * VOCAB
    sampling = body_fwd(tokens, seq) + head                     # incremental decoding, one position per step
    scoring = 2 * (body_fwd(tokens, seq) + head) + 2 * body_fwd(tokens, seq)   # actor, reference; critic, reward
    training = epochs * 3 * ((body_fwd(tokens, seq) + head) + body_fwd(tokens, seq))  # actor + critic, fwd+bwd
    return sampling + scoring + training


def matmul_seconds(tokens: int, head_positions: int, rates: dict, heads: int = 1) -> float:
    """Lower bound on one forward's time: each of its matmuls at the rate measured for that shape (attention and
    all elementwise work, the optimiser and the backward's extra transposes counted as free)."""
    per_layer = {(2048, 256, 768): 2 * D * 3 * D, (2048, 256, 1024): 2 * D * 4 * D, (2048, 1024, 256): 2 * 4 * D * D,
                 (2048, 256, 256): 2 * D * D}
    seconds = sum(LAYERS * tokens * flops / (rates[shape] * 1e9) for shape, flops in per_layer.items())
    return seconds + heads * head_positions * 2 * D * VOCAB / (rates[(2048, 256, 8192)] * 1e9)


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--dpo-ms", type=float, default=699.0, help="measured rlhf_lab DPO step (ms)")
    p.add_argument("--dpo-target", type=float, default=3 * 11.73, help="target DPO pairs/s (16 pairs per step)")
    p.add_argument("--ppo-s", type=float, default=5.41, help="measured rlhf_lab PPO step (s)")
    p.add_argument("--ppo-target", type=float, default=3 * 4.70, help="target PPO episodes/s (32 per step)")
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)
    shapes = [(2048, 256, 8192), (2048, 256, 768), (2048, 256, 1024), (2048, 1024, 256), (2048, 256, 256)]
    rates = {shape: matmul_gflops(*shape) for shape in shapes}
    for (m, k, n), rate in rates.items():
        print(f"matmul {m}x{k}x{n} (a shape of the model): {rate:.0f} GFLOP/s")
    print(f"matmul 4096x4096x4096 (large square, not in the model): {matmul_gflops(4096, 4096, 4096):.0f} GFLOP/s")
    dpo, ppo = dpo_step_flops(), ppo_step_flops()
    print(f"DPO step: {dpo / 1e9:.1f} GFLOP; at {args.dpo_ms:.0f} ms = {dpo / args.dpo_ms / 1e6:.0f} GFLOP/s sustained")
    print(f"PPO step: {ppo / 1e9:.0f} GFLOP; at {args.ppo_s:.2f} s = {ppo / args.ppo_s / 1e9:.0f} GFLOP/s sustained")
    # DPO: one policy forward + backward (3x forward) over 32 rows x 64 tokens, LM head on 32 x 48 positions
    dpo_floor = 3 * matmul_seconds(32 * 64, 32 * 48, rates)
    # PPO: sampling + actor/reference (LM heads) + critic/reward forwards, then 4 epochs x (actor + critic) x 3
    fwd_lm, fwd_scalar = matmul_seconds(32 * 56, 32 * 48, rates), matmul_seconds(32 * 56, 0, rates)
    ppo_floor = 3 * fwd_lm + 2 * fwd_scalar + 4 * 3 * (fwd_lm + fwd_scalar)
    for name, floor, target in [("DPO", dpo_floor, 16 / args.dpo_target), ("PPO", ppo_floor, 32 / args.ppo_target)]:
        verdict = "NOT reachable" if floor > target else "not excluded by this bound"
        print(f"{name}: the step's matmuls alone need >= {floor:.3f} s at the measured rates; the 3x-TRL target "
              f"needs {target:.3f} s/step: {verdict}")


if __name__ == "__main__":
    main()
