"""DPO training throughput and memory on CPU: rlhf_lab vs TRL 1.16 vs a bare PyTorch loop.

What is measured: steady-state pairs/s of full DPO optimizer steps (sigmoid loss, β=0.1, AdamW, lr 1e-5), the
median step time and the peak RSS of the process, for each (contestant, precision). Every contestant runs in its
own subprocess (clean peak RSS, no shared caches or thread pools) within ONE invocation, so ratios are fair.
Warm-up steps are run first and excluded; the timed window covers whole loop iterations (batch collation included).

Shapes: GPT-2, 4 layers, d=256, 4 heads, vocab 8192 (WordLevel tokenizer "w0".."w8187" + <unk> <pad> <eos> <bos>,
whitespace pre-tokenizer, pad != eos); every sequence is exactly 16 prompt + 48 completion tokens (47 words + eos,
checked in each child); 16 pairs per step (= 32 sequences); fp32 and bf16 (autocast) on CPU. The data (seeded
synthetic pairs) and the initial weights (built once with a seed, saved, loaded by every child) are identical.

Contestants:
  rlhf_lab        rlhf_lab.trainers.dpo.DPOTrainer._optimizer_step (the body of its training loop, minus evaluation).
                  The reference log-probs come from a table built ONCE before timing by the real
                  `recipes.stages.reference_logps_stage`: in rlhf_lab that table is cached per (reference, dataset,
                  tokenisation) and shared by every run of a β sweep, so a training step never runs the reference.
                  Its one-off cost (s, and pairs/s over the dataset) is reported separately.
  rlhf_lab_compiled  the same with train.compile=true: torch.compile on the training forward, batches padded to
                  the dataset's widest prompt/completion so it compiles once (compile time lands in the warm-up
                  steps and is reported as warmup_s, not hidden).
  trl_shipped     TRL 1.16 DPOTrainer as shipped: reference forward every step, activation checkpointing on (its default).
  trl             TRL 1.16 DPOTrainer, reference forward every step, activation checkpointing off.
  trl_precompute  TRL with precompute_ref_log_probs=True (precompute time reported, excluded from the step figure).
  torch_bare      hand-written loop: policy + reference forward on the 2B concatenated sequences (full logits,
                  log_softmax, gather), DPO sigmoid loss, backward, AdamW.
`trl` and `trl_precompute` run with activation_checkpointing=False (TRL defaults it to True; no other contestant
recomputes activations), so the comparison is made against TRL at its fastest as well as as-shipped;
and max_grad_norm=10 (as rlhf_lab); everything else is TRL's default (e.g. optim adamw_torch_fused).
A slow configuration (bf16 on a CPU without AVX-512-BF16/AMX) is cut by --timeout and reported over the steps it did.

Run (the lead's full benchmark; `make bench` runs it with the defaults):
    .venv/bin/python benchmarks/dpo_throughput.py [--steps 20] [--warmup 3] [--precisions fp32,bf16]
        [--contestants rlhf_lab,trl,trl_precompute,torch_bare] [--threads 2] [--out benchmarks/results/dpo_throughput.json]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import random
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

CONTESTANTS = ("rlhf_lab", "rlhf_lab_compiled", "trl_shipped", "trl", "trl_precompute", "torch_bare")
PROMPT_LEN, COMPLETION_WORDS, PAIRS_PER_STEP = 16, 47, 16
COMPLETION_LEN = COMPLETION_WORDS + 1  # + eos
NUM_WORDS, SPECIALS = 8188, ["<unk>", "<pad>", "<eos>", "<bos>"]
MODEL = {"n_layer": 4, "n_embd": 256, "n_head": 4, "n_positions": PROMPT_LEN + COMPLETION_LEN}
BETA, LR, SEED = 0.1, 1e-5, 0


# ------------------------------------------------------------------------------------------------ shared assets
def build_assets(root: Path, num_pairs: int) -> None:
    """Tokenizer + seeded GPT-2 + pairs.jsonl in `root`: the identical starting point of every contestant."""
    import torch
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import GPT2Config, GPT2LMHeadModel, PreTrainedTokenizerFast

    vocab = {tok: i for i, tok in enumerate(SPECIALS + [f"w{i}" for i in range(NUM_WORDS)])}
    core = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    core.pre_tokenizer = pre_tokenizers.Whitespace()
    tok = PreTrainedTokenizerFast(tokenizer_object=core, unk_token="<unk>", pad_token="<pad>", eos_token="<eos>",
                                  bos_token="<bos>", padding_side="left")
    tok.save_pretrained(root)
    torch.manual_seed(SEED)
    cfg = GPT2Config(vocab_size=len(vocab), bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                     pad_token_id=tok.pad_token_id, resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, **MODEL)
    GPT2LMHeadModel(cfg).save_pretrained(root)
    rng = random.Random(SEED)
    words = lambda n: " ".join(f"w{rng.randrange(NUM_WORDS)}" for _ in range(n))
    with open(root / "pairs.jsonl", "w") as f:
        for _ in range(num_pairs):  # completions start with a space: TRL tokenises prompt + completion as one text
            row = {"prompt": words(PROMPT_LEN), "chosen": " " + words(COMPLETION_WORDS),
                   "rejected": " " + words(COMPLETION_WORDS)}
            f.write(json.dumps(row) + "\n")


def load_rows(root: Path) -> list[dict]:
    return [json.loads(line) for line in (root / "pairs.jsonl").read_text().splitlines()]


def check_lengths(prompts, chosens, rejecteds, eos_id: int, who: str) -> None:
    """Every contestant must see exactly PROMPT_LEN + COMPLETION_LEN tokens per sequence, eos last."""
    for p, c, r in zip(prompts, chosens, rejecteds):
        if len(p) != PROMPT_LEN or len(c) != COMPLETION_LEN or len(r) != COMPLETION_LEN or c[-1] != eos_id \
                or r[-1] != eos_id:
            raise AssertionError(f"{who}: expected {PROMPT_LEN}+{COMPLETION_LEN} tokens ending in eos, got "
                                 f"{len(p)}+{len(c)}/{len(r)}")


def save_progress(args, step_times: list[float]) -> None:
    """After every step: what a parent reports if this child is killed by the timeout (slow bf16 without AVX-512)."""
    Path(args.child_out + ".partial").write_text(json.dumps(step_times))


PEAK: dict = {}


def rss_peak_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # KiB on Linux


def reset_peak_rss() -> None:
    """Just before the steps: keep the setup's peak, then reset the kernel's RSS high-water mark (Linux >= 4.0) so the
    steps get a peak of their own (rlhf_lab's one-off reference pass, batch 64, would otherwise dominate)."""
    PEAK["setup"] = rss_peak_mib()
    try:
        Path("/proc/self/clear_refs").write_text("5")
        PEAK["reset"] = True
    except OSError:
        pass


def summarise(step_times: list[float], total_s: float, steps: int) -> dict:
    return {"pairs_per_s": steps * PAIRS_PER_STEP / total_s, "step_ms_median": 1e3 * statistics.median(step_times),
            "timed_steps": steps, "timed_seconds": total_s}


# ------------------------------------------------------------------------------------------------ contestants
def run_rlhf_lab(root: Path, args, work: Path) -> dict:
    import torch

    from rlhf_lab.config import AlgoConfig, EvalConfig, LoggerConfig, OptimConfig, TrainConfig
    from rlhf_lab.data.collate import collate_pairs
    from rlhf_lab.data.formats import PreferencePair
    from rlhf_lab.data.tokenize import TruncationConfig, tokenize_pairs
    from rlhf_lab.distributed.strategy import TorchStrategy
    from rlhf_lab.eval.points import PointsWriter, RunIdentity
    from rlhf_lab.models.build import freeze, load_causal_lm, load_tokenizer
    from rlhf_lab.recipes import stages
    from rlhf_lab.recipes.run import seed_everything
    from rlhf_lab.tracking.logger import RunLogger
    from rlhf_lab.trainers.dpo import DPOInputs, DPOTrainer

    seed_everything(SEED)  # exactly as run_alignment seeds a run
    tok = load_tokenizer(root)
    pairs = [PreferencePair(r["prompt"], r["chosen"], r["rejected"], row=i) for i, r in enumerate(load_rows(root))]
    trunc = TruncationConfig(PROMPT_LEN, COMPLETION_LEN, "drop")
    tokenized, report = tokenize_pairs(pairs, tok, trunc)
    assert len(tokenized) == len(pairs), report.summary()
    check_lengths(*zip(*[(t.prompt_ids, t.chosen_ids, t.rejected_ids) for t in tokenized]), tok.eos_token_id,
                  "rlhf_lab")
    ids = collate_pairs(tokenized[:PAIRS_PER_STEP], tok.pad_token_id).sequences
    assert ids.input_ids.shape == (2 * PAIRS_PER_STEP, PROMPT_LEN + COMPLETION_LEN) and ids.completion_mask.all()

    # The reference table: built once per dataset by the real stage (fp32, batch 64), shared by a whole sweep.
    ref_stage, table = stages.reference_logps_stage(work / "cache", "bench", root, "bench", tokenized, len(pairs),
                                                    tok.pad_token_id, trunc, torch.device("cpu"))
    reference = freeze(load_causal_lm(root))
    seed_everything(SEED)
    policy = load_causal_lm(root)
    strategy = TorchStrategy("cpu", args.precision, 1, 10.0)
    identity = RunIdentity(study="bench", run_id="bench", method="dpo", loss_type="sigmoid", seed=SEED, beta=BETA)
    logger = RunLogger(work, LoggerConfig(name="none", mode="disabled"), {}, name="bench", group="bench", tags=[])
    points = PointsWriter(work / "points.csv")
    inputs = DPOInputs(policy, reference, tok, tokenized, table, [], None, identity)
    trainer = DPOTrainer(inputs, AlgoConfig(loss_type="sigmoid", beta=BETA), OptimConfig(name="adamw", lr=LR),
                         TrainConfig(batch_size=PAIRS_PER_STEP, micro_batch_size=PAIRS_PER_STEP,
                                     precision=args.precision, compile=args.child == "rlhf_lab_compiled"),
                         EvalConfig(), strategy, logger, points, SEED)
    times = []
    reset_peak_rss()
    for step in range(1, args.warmup + args.steps + 1):  # DPOTrainer.train()'s loop body, without evaluation
        t = time.perf_counter()
        trainer.policy.train()
        metrics = trainer.train_step()
        trainer.logger.log(metrics, step)
        times.append(time.perf_counter() - t)
        save_progress(args, times)
    points.close()
    logger.close()
    timed = times[args.warmup:]
    return {**summarise(timed, sum(timed), args.steps), "threads": torch.get_num_threads(),
            "warmup_s": sum(times[:args.warmup]),
            "reference_table_s": ref_stage.seconds, "reference_table_pairs_per_s": len(pairs) / ref_stage.seconds,
            "final_loss": metrics["train/loss"]}


def run_trl(root: Path, args, work: Path, precompute: bool, checkpointing: bool = False) -> dict:
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer, TrainerCallback
    from trl import DPOConfig, DPOTrainer

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.begin, self.end, self.threads = [], [], None

        def on_train_begin(self, *a, **k):
            reset_peak_rss()

        def on_step_begin(self, *a, **k):
            self.begin.append(time.perf_counter())
            self.threads = torch.get_num_threads()

        def on_step_end(self, *a, **k):
            self.end.append(time.perf_counter())
            save_progress(args, [b - a for a, b in zip([self.begin[0]] + self.end[:-1], self.end)])

    class TimedDPOTrainer(DPOTrainer):
        precompute_s = 0.0

        def _precompute_ref_logps(self, *a, **k):
            t = time.perf_counter()
            out = super()._precompute_ref_logps(*a, **k)
            TimedDPOTrainer.precompute_s += time.perf_counter() - t
            return out

    rows = load_rows(root)
    tok = AutoTokenizer.from_pretrained(root)
    model = AutoModelForCausalLM.from_pretrained(root)
    cfg = DPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=PAIRS_PER_STEP, gradient_accumulation_steps=1,
        learning_rate=LR, max_length=PROMPT_LEN + COMPLETION_LEN, bf16=args.precision == "bf16", use_cpu=True,
        report_to="none", save_strategy="no", logging_steps=10**6, dataloader_num_workers=0, loss_type=["sigmoid"],
        beta=BETA, max_steps=args.warmup + args.steps, activation_checkpointing=checkpointing, max_grad_norm=10.0,
        precompute_ref_log_probs=precompute, precompute_ref_batch_size=64, seed=SEED, disable_tqdm=True)
    timer = StepTimer()
    trainer = TimedDPOTrainer(model=model, args=cfg, train_dataset=Dataset.from_list(rows), processing_class=tok,
                              callbacks=[timer])
    ds = trainer.train_dataset
    check_lengths(ds["prompt_ids"], ds["chosen_ids"], ds["rejected_ids"], tok.eos_token_id, "trl")
    batch = trainer.data_collator([ds[i] for i in range(PAIRS_PER_STEP)])
    assert batch["input_ids"].shape == (2 * PAIRS_PER_STEP, PROMPT_LEN + COMPLETION_LEN)
    assert (batch["completion_mask"].sum(1) == COMPLETION_LEN).all()
    trainer.train()
    ends = timer.end
    assert len(ends) == args.warmup + args.steps, f"{len(ends)} steps recorded"
    start = ends[args.warmup - 1] if args.warmup else timer.begin[0]
    intervals = [b - a for a, b in zip([start] + ends[args.warmup:-1], ends[args.warmup:])]
    compute = [e - b for b, e in zip(timer.begin[args.warmup:], ends[args.warmup:])]
    out = {**summarise(intervals, ends[-1] - start, args.steps), "threads": timer.threads,
           "step_ms_median_excluding_batch_fetch": 1e3 * statistics.median(compute),
           "optim": str(cfg.optim), "activation_checkpointing": trainer.model.is_activation_checkpointing,
           "ref_model_in_memory": trainer.ref_model is not None}
    if precompute:
        out.update(reference_table_s=TimedDPOTrainer.precompute_s,
                   reference_table_pairs_per_s=len(rows) / TimedDPOTrainer.precompute_s)
    return out


def run_torch_bare(root: Path, args, work: Path) -> dict:
    import torch
    import torch.nn.functional as F
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root)
    rows = load_rows(root)
    enc = lambda key: tok([r[key] for r in rows], add_special_tokens=False)["input_ids"]
    prompts, eos = enc("prompt"), [tok.eos_token_id]
    chosens, rejecteds = [c + eos for c in enc("chosen")], [r + eos for r in enc("rejected")]
    check_lengths(prompts, chosens, rejecteds, tok.eos_token_id, "torch_bare")
    chosen = torch.tensor([p + c for p, c in zip(prompts, chosens)])
    rejected = torch.tensor([p + r for p, r in zip(prompts, rejecteds)])
    policy = AutoModelForCausalLM.from_pretrained(root).train()
    reference = AutoModelForCausalLM.from_pretrained(root).eval().requires_grad_(False)
    optimizer = torch.optim.AdamW(policy.parameters(), lr=LR)
    autocast = torch.autocast("cpu", dtype=torch.bfloat16, enabled=args.precision == "bf16")
    gen = torch.Generator().manual_seed(SEED)

    def logps(model, seqs):
        logits = model(input_ids=seqs, use_cache=False).logits[:, PROMPT_LEN - 1:-1]   # (2B, C, V) full logits
        lp = torch.log_softmax(logits.float(), -1)
        return lp.gather(-1, seqs[:, PROMPT_LEN:, None]).squeeze(-1).sum(-1)

    times = []
    reset_peak_rss()
    for _ in range(args.warmup + args.steps):
        t = time.perf_counter()
        idx = torch.randint(len(rows), (PAIRS_PER_STEP,), generator=gen)
        seqs = torch.cat([chosen[idx], rejected[idx]])
        with autocast:
            pol = logps(policy, seqs)
            with torch.no_grad():
                ref = logps(reference, seqs)
        margin = (pol[:PAIRS_PER_STEP] - ref[:PAIRS_PER_STEP]) - (pol[PAIRS_PER_STEP:] - ref[PAIRS_PER_STEP:])
        loss = -F.logsigmoid(BETA * margin).mean()
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - t)
        save_progress(args, times)
    timed = times[args.warmup:]
    return {**summarise(timed, sum(timed), args.steps), "threads": torch.get_num_threads(),
            "warmup_s": sum(times[:args.warmup]),
            "final_loss": loss.item()}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root, work = Path(args.assets), Path(tempfile.mkdtemp(prefix=f"bench-{args.child}-"))
    if args.child.startswith("trl"):
        result = run_trl(root, args, work, precompute=args.child == "trl_precompute",
                         checkpointing=args.child == "trl_shipped")
    else:
        runner = {"rlhf_lab": run_rlhf_lab, "rlhf_lab_compiled": run_rlhf_lab, "torch_bare": run_torch_bare}
        result = runner[args.child](root, args, work)
    result["peak_rss_mib"] = max(rss_peak_mib(), PEAK.get("setup", 0.0))
    if PEAK.get("reset"):
        result.update(peak_rss_setup_mib=PEAK["setup"], peak_rss_steps_mib=rss_peak_mib())
    import psutil  # the bench extra

    result["rss_end_mib"] = psutil.Process().memory_info().rss / 2**20
    Path(args.child_out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent
def run_child(name: str, precision: str, args, assets: Path, tmp: Path) -> dict:
    out, log = tmp / f"{name}-{precision}.json", tmp / f"{name}-{precision}.log"
    cmd = [sys.executable, __file__, "--child", name, "--precision", precision, "--assets", str(assets),
           "--child-out", str(out), "--steps", str(args.steps), "--warmup", str(args.warmup),
           "--threads", str(args.threads)]
    return launch_child(cmd, {"contestant": name, "precision": precision}, out, log, tmp, args,
                        lambda: partial_result(Path(str(out) + ".partial"), args))


def launch_child(cmd: list[str], base: dict, out: Path, log: Path, tmp: Path, args, on_timeout) -> dict:
    """Run one contestant in its own process (clean peak RSS, fixed thread counts, offline); shared by the
    DPO and PPO benchmarks. Returns its JSON result, a failure with the log's tail, or `on_timeout()`."""
    env = {**os.environ, "OMP_NUM_THREADS": str(args.threads), "MKL_NUM_THREADS": str(args.threads),
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1", "TQDM_DISABLE": "1",
           "HF_DATASETS_CACHE": str(tmp / "hf_datasets"), "WANDB_MODE": "disabled"}
    started = time.perf_counter()
    try:
        with open(log, "w") as f:
            proc = subprocess.run(cmd, stdout=f, stderr=subprocess.STDOUT, env=env, timeout=args.timeout,
                                  check=False)
    except subprocess.TimeoutExpired:
        return {**base, **on_timeout()}
    wall = time.perf_counter() - started
    if proc.returncode != 0 or not out.exists():
        tail = log.read_text().strip().splitlines()[-15:]
        return {**base, "status": f"failed (exit {proc.returncode})", "error": "\n".join(tail)}
    return {**base, "status": "ok", "child_wall_s": wall, **json.loads(out.read_text())}


def partial_result(path: Path, args) -> dict:
    """A timed-out child: its figures over the timed steps it finished, if any."""
    times = json.loads(path.read_text()) if path.exists() else []
    status = f"timeout ({args.timeout}s) after {len(times)}/{args.warmup + args.steps} steps"
    timed = times[args.warmup:]
    return {"status": status, **(summarise(timed, sum(timed), len(timed)) if timed else {})}


def installed_version(package: str) -> str | None:
    try:
        return metadata.version(package)
    except metadata.PackageNotFoundError:   # e.g. trl, which only the TRL contestants' venvs need
        return None


def machine_info() -> dict:
    import torch

    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = next((ln.split(":", 1)[1].strip() for ln in cpuinfo.splitlines() if ln.startswith("model name")), "?")
    flags = set(next((ln.split(":", 1)[1].split() for ln in cpuinfo.splitlines() if ln.startswith("flags")), []))
    versions = {pkg: installed_version(pkg) for pkg in ("torch", "transformers", "trl", "accelerate", "datasets")}
    return {"cpu": model, "logical_cpus": os.cpu_count(), "platform": platform.platform(),
            "python": platform.python_version(), "torch_cpu_capability": torch.backends.cpu.get_cpu_capability(),
            "flags": {f: f in flags for f in ("avx2", "avx512f", "avx512_bf16", "amx_tile", "amx_bf16")},
            "versions": versions}


def ratios(results: list[dict]) -> dict:
    ok = [r for r in results if r["status"] == "ok"]
    best = lambda pred: max((r for r in ok if pred(r)), key=lambda r: r["pairs_per_s"], default=None)
    trl = best(lambda r: r["contestant"].startswith("trl"))
    ours_fp32 = best(lambda r: r["contestant"].startswith("rlhf_lab") and r["precision"] == "fp32")
    ours = best(lambda r: r["contestant"].startswith("rlhf_lab"))
    shipped = best(lambda r: r["contestant"] == "trl_shipped")
    label = lambda r: f"{r['contestant']} {r['precision']}"
    out = {}
    if trl and ours_fp32:
        out["rlhf_lab_fp32_over_best_trl"] = ours_fp32["pairs_per_s"] / trl["pairs_per_s"]
    if trl and ours:
        out["best_rlhf_lab_over_best_trl"] = ours["pairs_per_s"] / trl["pairs_per_s"]
        out["best_rlhf_lab"], out["best_trl"] = label(ours), label(trl)
    if shipped and ours:
        out["best_rlhf_lab_over_trl_as_shipped"] = ours["pairs_per_s"] / shipped["pairs_per_s"]
    return out


def markdown(results: list[dict]) -> str:
    header = ("| contestant | precision | pairs/s | ms/step (median) | peak RSS MiB: process (steps) "
              "| reference table, one-off | status |")
    lines = [header, "|---|---|---:|---:|---:|---|---|"]
    for r in results:
        ref = (f"{r['reference_table_s']:.2f} s ({r['reference_table_pairs_per_s']:.0f} pairs/s)"
               if "reference_table_s" in r else "—")
        cells = [f"{r['pairs_per_s']:.1f}" if "pairs_per_s" in r else "—",
                 f"{r['step_ms_median']:.0f}" if "step_ms_median" in r else "—",
                 f"{r['peak_rss_mib']:.0f} ({r.get('peak_rss_steps_mib', float('nan')):.0f})"
                 if "peak_rss_mib" in r else "—"]
        lines.append(f"| {r['contestant']} | {r['precision']} | " + " | ".join(cells) + f" | {ref} | {r['status']} |")
    return "\n".join(lines)


def parent_main(args) -> None:
    contestants = [c for c in args.contestants.split(",") if c]
    precisions = [p for p in args.precisions.split(",") if p]
    if set(contestants) - set(CONTESTANTS) or set(precisions) - {"fp32", "bf16"}:
        sys.exit(f"unknown contestant or precision in {contestants} / {precisions}")
    num_pairs = args.pairs or max(256, PAIRS_PER_STEP * (args.steps + args.warmup))
    results = []
    with tempfile.TemporaryDirectory(prefix="dpo-bench-") as tmp:
        assets = Path(tmp) / "assets"
        assets.mkdir()
        build_assets(assets, num_pairs)
        for precision in precisions:
            for name in contestants:
                print(f"[bench] {name} {precision} ...", file=sys.stderr, flush=True)
                results.append(run_child(name, precision, args, assets, Path(tmp)))
                r = results[-1]
                print(f"[bench]   {r['status']} {r.get('pairs_per_s', 0):.2f} pairs/s {r.get('error', '')}",
                      file=sys.stderr, flush=True)
    shapes = {"model": {"arch": "gpt2", **MODEL, "vocab_size": NUM_WORDS + len(SPECIALS)},
              "prompt_tokens": PROMPT_LEN, "completion_tokens": COMPLETION_LEN, "pairs_per_step": PAIRS_PER_STEP,
              "dataset_pairs": num_pairs}
    settings = {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "timeout_s": args.timeout,
                "loss": "sigmoid", "beta": BETA, "lr": LR, "optimizer": "AdamW"}
    report = {"machine": machine_info(), "shapes": shapes, "settings": settings, "results": results,
              "ratios": ratios(results)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    m = report["machine"]
    print(f"CPU: {m['cpu']} ({m['logical_cpus']} logical), threads={args.threads}, flags {m['flags']}, "
          f"torch {m['versions']['torch']}, transformers {m['versions']['transformers']}, trl {m['versions']['trl']}")
    print(markdown(results))
    rat = report["ratios"]
    if "rlhf_lab_fp32_over_best_trl" in rat:
        print(f"\nrlhf_lab fp32 / best TRL ({rat['best_trl']}) = {rat['rlhf_lab_fp32_over_best_trl']:.2f}×")
    if "best_rlhf_lab_over_best_trl" in rat:
        print(f"best rlhf_lab ({rat['best_rlhf_lab']}) / best TRL ({rat['best_trl']}) = "
              f"{rat['best_rlhf_lab_over_best_trl']:.2f}×")
    print(f"\nwritten: {out}")


def benchmark_parser(doc: str, contestants: list[str], results_name: str) -> argparse.ArgumentParser:
    """The options every benchmark here shares: contestants, threads, output file, and the hidden child options
    the parent passes to each contestant's subprocess."""
    p = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    p.add_argument("--contestants", default=",".join(contestants))
    p.add_argument("--threads", type=int, default=2, help="torch intra-op threads (all contestants)")
    p.add_argument("--out", default=str(Path(__file__).resolve().parent / "results" / results_name))
    p.add_argument("--child", choices=contestants, help=argparse.SUPPRESS)
    p.add_argument("--assets", help=argparse.SUPPRESS)
    p.add_argument("--child-out", help=argparse.SUPPRESS)
    return p


def parse_checked(p: argparse.ArgumentParser, argv=None) -> argparse.Namespace:
    args = p.parse_args(argv)
    if args.steps < 1 or args.warmup < 0:
        p.error("--steps must be >= 1 and --warmup >= 0")
    return args


def parse_args(argv=None):
    p = benchmark_parser(__doc__, CONTESTANTS, "dpo_throughput.json")
    p.add_argument("--steps", type=int, default=20, help="timed optimizer steps")
    p.add_argument("--warmup", type=int, default=3, help="untimed steps first")
    p.add_argument("--precisions", default="fp32,bf16")
    p.add_argument("--pairs", type=int, default=None, help="dataset size (default max(256, 16·(steps+warmup)))")
    p.add_argument("--timeout", type=int, default=600, help="seconds per (contestant, precision) subprocess")
    p.add_argument("--precision", default="fp32", help=argparse.SUPPRESS)
    return parse_checked(p, argv)


if __name__ == "__main__":
    ARGS = parse_args()
    child_main(ARGS) if ARGS.child else parent_main(ARGS)
