"""PPO training throughput and memory on CPU: rlhf_lab vs TRL 1.12's `trl.experimental.ppo.PPOTrainer`.

What is measured: steady-state episodes/s, where an episode is one prompt rolled out (sampling, log-probs of actor
and reference, values, reward) AND trained on (4 PPO epochs of one minibatch of 32, actor and critic updated), the
median seconds per PPO step, the mean response length and the peak RSS of the process, at one precision per
invocation (`--precision fp32`, or `bf16`: CPU autocast in every pass of both contestants). Every contestant
runs in its own subprocess (clean peak RSS, no shared caches or thread pools) within ONE invocation, so ratios are
fair. `--warmup` PPO steps are run first and excluded; the timed window covers whole loop iterations.

Shapes (the issue's): GPT-2, 4 layers, d=256, 4 heads, vocab 8192 (the tokenizer and seeded model of
`dpo_throughput.build_assets`: WordLevel "w0".."w8187" + <unk> <pad> <eos> <bos>, pad != eos); 8-token prompts
(seeded random words, identical for both), responses of up to 48 tokens at temperature 0.7, rollout batch 32, 4 PPO
epochs, 1 minibatch (= 1 micro-batch of 32), kl_coef 0.05, vf_coef 0.1, lr 3e-6. Reward model and critic: the same
backbone with a scalar head (AutoModelForSequenceClassification, num_labels=1, head seeded by
`rlhf_lab.models.heads.build_scalar_model`), saved once; the critic starts from the reward model. Policy, reference,
reward and critic weights are built once with a seed, saved, and loaded by every child.

Response length: both stop a response after its first <eos> (TRL: stop_token="eos"; rlhf_lab: tokenizer.eos),
and both end it at a sampled <pad>. So that every response is exactly 48 tokens in both, the saved initial weights
give <eos> and <pad> a logit of ≈ −30 (`never_sample_specials`; the random-init model would otherwise end ~0.2
responses per rollout early, at random). The mean response length is measured and reported per contestant
(rlhf_lab: its own `val/response_length`; TRL: tokens before the first pad after its `truncate_response`).

Contestants:
  rlhf_lab  rlhf_lab.trainers.ppo.PPOTrainer.train() itself (the real loop: next prompts → roll_out → KL-shaped
            rewards + GAE → optimise → KL controller → rollout metrics), with its evaluation and checkpointing
            replaced by no-ops on the instance. The four roles come from the real builder
            `recipes.ppo.build_ppo_models` (critic_init=reward_model, learned reward without normalisation) and
            the optimisers from `recipes.ppo.place_ppo_models` (two AdamW from the `optim` group, one per trained role; strategies
            TorchStrategy("cpu", <precision>, 1, 1.0): grad-norm clipping at 1.0, rlhf_lab's default; its
            autocast covers sampling, scoring and training alike).
  trl112    TRL 1.12 PPOTrainer.train() as shipped (its own loop; one AdamW over policy + value head, TRL's default
            `optim`; no grad clipping in its loop), with per_device_train_batch_size=32, num_mini_batches=1,
            num_ppo_epochs=4, response_length=48, temperature=0.7, local_rollout_forward_batch_size=32,
            kl_coef=0.05, stop_token="eos", missing_eos_penalty=None, num_sample_generations=0 (no debug sampling),
            bf16=(precision == bf16) and ACCELERATE_MIXED_PRECISION=bf16 (its PPOTrainer builds its own
            Accelerator, which reads only the variable: accelerate's CPU autocast), use_cpu, report_to none, save_strategy no,
            lr_scheduler constant (as rlhf_lab).
            TRL's PPO loop is custom: it fires `on_train_begin` before the first update and `on_step_end` after each
            update (lr step), but no `on_step_begin`; a step is timed as the interval between consecutive
            `on_step_end`s (the first from `on_train_begin`), i.e. whole iterations including its per-step
            gc.collect(). Its mean response length is read by wrapping the module's `truncate_response`.
rlhf_lab's steps are timed the same way (interval between consecutive end-of-step `logger.log` calls).

TRL 1.12 is the last TRL with PPO and must not go into the main venv (trl 1.16). One-off setup of its venv:
    python3 -m venv .venv-trl112 && .venv-trl112/bin/pip install -c constraints-cpu.txt \\
        torch==2.13.0 transformers==5.23.0 trl==1.12.0 accelerate datasets psutil
(`.venv-trl112/bin/pip list | grep torch` must show 2.13.0+cpu). With transformers 5 its tokenizer must pad left
(ours does). The rlhf_lab child runs with this script's interpreter (the main venv), the TRL child with
--trl-python.

Run (the lead's full benchmark):
    .venv/bin/python benchmarks/ppo_throughput.py [--steps 5] [--warmup 1] [--contestants rlhf_lab,trl112]
        [--threads 2] [--timeout 900] [--trl-python .venv-trl112/bin/python]
        [--out benchmarks/results/ppo_throughput.json]
"""
from __future__ import annotations

import json
import os
import random
import statistics
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

# shared with the DPO benchmark (stdlib-only at import: the TRL child imports it from its own venv too)
from dpo_throughput import (
    MODEL,
    NUM_WORDS,
    PEAK,
    SEED,
    SPECIALS,
    benchmark_parser,
    build_assets,
    launch_child,
    machine_info,
    parse_checked,
    reset_peak_rss,
    rss_peak_mib,
    save_progress,
)

REPO = Path(__file__).resolve().parent.parent
CONTESTANTS = ("rlhf_lab", "trl112")
PROMPT_LEN, RESPONSE_LEN, ROLLOUT_BATCH, PPO_EPOCHS, MINI_BATCHES = 8, 48, 32, 4, 1
TEMPERATURE, KL_COEF, LR = 0.7, 0.05, 3e-6
VERSIONED = ("torch", "transformers", "trl", "accelerate", "datasets")


# ------------------------------------------------------------------------------------------------ shared assets
def build_ppo_assets(root: Path, num_prompts: int) -> None:
    """DPO's tokenizer + seeded GPT-2 (policy/reference), a seeded scalar model in root/rm (reward model and critic
    init) and prompts.json: the identical starting point of both contestants."""
    from rlhf_lab.models.build import load_tokenizer
    from rlhf_lab.models.heads import build_scalar_model, save_scalar_model

    build_assets(root, 0)  # no DPO pairs
    assert MODEL["n_positions"] >= PROMPT_LEN + RESPONSE_LEN
    never_sample_specials(root)
    rm = build_scalar_model(root, init_head=True, seed=SEED)
    save_scalar_model(rm, load_tokenizer(root), root / "rm", None)
    rng = random.Random(SEED)
    prompts = [" ".join(f"w{rng.randrange(NUM_WORDS)}" for _ in range(PROMPT_LEN)) for _ in range(num_prompts)]
    (root / "prompts.json").write_text(json.dumps(prompts))


def never_sample_specials(root: Path) -> None:
    """Make every response exactly RESPONSE_LEN tokens in both trainers: the random-init model would sample <eos>
    (ends a response) or <pad> (rlhf_lab's sampler and TRL's masks both end a response at a sampled pad) with
    p ≈ 1.2e-4 per token, i.e. ~0.2 early ends per rollout, at random. One hidden unit of the final LayerNorm is
    made a constant 1 (weight 0, bias 1) and the tied output embedding of <eos> and <pad> gets −30 on that unit:
    their logits become ≈ −30 (p ≈ e^−43 at T=0.7); every other logit moves by one N(0, 0.02²) term. Neither
    token is ever an input (pad positions are masked out), and 3e-6 × a few steps cannot undo a −30."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(root)
    model = AutoModelForCausalLM.from_pretrained(root)
    assert model.get_output_embeddings().weight is model.transformer.wte.weight, "expected tied embeddings"
    unit = 0
    with torch.no_grad():
        model.transformer.ln_f.weight[unit] = 0.0
        model.transformer.ln_f.bias[unit] = 1.0
        for token in (tok.eos_token_id, tok.pad_token_id):
            model.transformer.wte.weight[token, unit] = -30.0
    model.save_pretrained(root)


def load_prompts(root: Path) -> list[str]:
    return json.loads((root / "prompts.json").read_text())


def check_prompt_ids(ids: list[list[int]], who: str) -> None:
    bad = [len(p) for p in ids if len(p) != PROMPT_LEN]
    if bad:
        raise AssertionError(f"{who}: expected {PROMPT_LEN}-token prompts, got lengths {sorted(set(bad))}")


def summarise(step_times: list[float]) -> dict:
    total = sum(step_times)
    return {"episodes_per_s": len(step_times) * ROLLOUT_BATCH / total, "step_s_median": statistics.median(step_times),
            "timed_steps": len(step_times), "timed_seconds": total}


def versions() -> dict:
    out = {}
    for pkg in VERSIONED:
        try:
            out[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            out[pkg] = None
    return out


# ------------------------------------------------------------------------------------------------ contestants
def run_rlhf_lab(root: Path, args, work: Path) -> dict:
    import torch

    from rlhf_lab.config import EvalConfig, PPOConfig, RunConfig
    from rlhf_lab.data.tokenize import encode_prompt
    from rlhf_lab.distributed.strategy import TorchStrategy
    from rlhf_lab.eval.points import RunIdentity
    from rlhf_lab.models.build import load_tokenizer
    from rlhf_lab.recipes.ppo import build_ppo_models, place_ppo_models
    from rlhf_lab.recipes.run import seed_everything
    from rlhf_lab.trainers.on_policy import OnPolicyRun, PromptSet
    from rlhf_lab.trainers.ppo import PPOTrainer

    class StepClock:
        """Stands in for RunLogger: PPOTrainer.train() logs once at the end of every step."""

        def __init__(self):
            self.start, self.ends, self.metrics = None, [], []

        def log(self, metrics, step):
            self.ends.append(time.perf_counter())
            self.metrics.append(metrics)
            save_progress(args, [b - a for a, b in zip([self.start] + self.ends[:-1], self.ends)])

    seed_everything(SEED)
    algo = PPOConfig(rollout_batch_size=ROLLOUT_BATCH, micro_batch_size=ROLLOUT_BATCH, num_mini_batches=MINI_BATCHES,
                     ppo_epochs=PPO_EPOCHS, response_length=RESPONSE_LEN, temperature=TEMPERATURE, kl_coef=KL_COEF,
                     actor_lr=LR, critic_lr=LR, critic_init="reward_model", reward="learned",
                     normalize_reward=False, missing_eos_penalty=None)
    cfg = RunConfig(algo=algo, seed=SEED)
    tok = load_tokenizer(root)
    texts = load_prompts(root)
    prompts = PromptSet([encode_prompt(tok, t) for t in texts], texts)
    check_prompt_ids(prompts.ids, "rlhf_lab")
    actor_s, critic_s = (TorchStrategy("cpu", args.precision, 1, algo.max_grad_norm) for _ in range(2))
    models, eval_reference = build_ppo_models(cfg, root, root / "rm", tok, None, actor_s)
    models, eval_reference = place_ppo_models(cfg, models, eval_reference, actor_s, critic_s)
    clock = StepClock()
    total = args.warmup + args.steps
    identity = RunIdentity("benchmark", "ppo_throughput", "ppo", "ppo", SEED, kl_coef=KL_COEF)
    run = OnPolicyRun(tok, prompts, PromptSet([], []), eval_reference, None, EvalConfig(), total, clock, None,
                      identity, work, SEED, checkpoint_every=10**9)
    trainer = PPOTrainer(models, run, algo, actor_s, critic_s)
    trainer.evaluate = lambda: None          # evaluation and checkpointing are not part of the measured loop
    trainer.checkpoints.save = lambda *a, **k: None
    phases = profile_phases(trainer)
    reset_peak_rss()
    clock.start = time.perf_counter()
    trainer.train()
    assert len(clock.ends) == total, f"{len(clock.ends)} steps recorded"
    times = [b - a for a, b in zip([clock.start] + clock.ends[:-1], clock.ends)][args.warmup:]
    timed = clock.metrics[args.warmup:]
    spent = {name: sum(t[args.warmup:]) for name, t in phases.items()}
    return {**summarise(times), "threads": torch.get_num_threads(),
            "profile_s_per_step": {name: s / args.steps for name, s in spent.items()}
            | {"other": (sum(times) - sum(spent.values())) / args.steps},
            "mean_response_length": statistics.mean(m["val/response_length"] for m in timed),
            "eos_per_step": statistics.mean(m["val/num_eos_tokens"] for m in timed),
            "own_episodes_per_s_median": statistics.median(m["train/episodes_per_s"] for m in timed),
            "final_metrics": {k: clock.metrics[-1][k] for k in ("loss/policy_avg", "loss/value_avg", "objective/kl",
                                                                 "objective/scores")}}


def profile_phases(trainer) -> dict[str, list[float]]:
    """Where rlhf_lab's PPO step spends its time: seconds per step in sampling (KV-cached generation, with the
    old log-probs), scoring (reference, critic and reward passes) and optimisation (epochs of actor and critic
    updates); the rest of the step is 'other' (advantages, metrics, the KL controller)."""
    import rlhf_lab.trainers.on_policy as on_policy_module
    import rlhf_lab.trainers.ppo as ppo_module
    import rlhf_lab.trainers.ppo_rollout as rollout_module

    phases: dict[str, list[float]] = {"sampling": [], "scoring": [], "optimisation": []}

    def timed(name, fn):
        def wrapper(*a, **k):
            started = time.perf_counter()
            try:
                return fn(*a, **k)
            finally:
                phases[name].append(time.perf_counter() - started)   # each phase runs once per PPO step
        return wrapper

    on_policy_module.sample_with_logprobs = timed("sampling", on_policy_module.sample_with_logprobs)
    ppo_module.score_rollout = timed("scoring", rollout_module.score_rollout)
    trainer.optimise = timed("optimisation", trainer.optimise)
    return phases


def run_trl112(root: Path, args, work: Path) -> dict:
    import torch
    from datasets import Dataset
    from transformers import (
        AutoModelForCausalLM,
        AutoModelForSequenceClassification,
        AutoTokenizer,
        TrainerCallback,
    )
    from trl.experimental.ppo import PPOConfig, PPOTrainer
    from trl.experimental.ppo import ppo_trainer as trl_ppo

    class StepTimer(TrainerCallback):
        def __init__(self):
            self.start, self.ends, self.threads, self.logs = None, [], None, []

        def on_train_begin(self, *a, **k):
            reset_peak_rss()
            self.start = time.perf_counter()

        def on_step_end(self, *a, **k):
            self.ends.append(time.perf_counter())
            self.threads = torch.get_num_threads()
            save_progress(args, [b - a for a, b in zip([self.start] + self.ends[:-1], self.ends)])

        def on_log(self, _args, _state, _control, logs=None, **k):
            self.logs.append(dict(logs or {}))

    lengths: list[float] = []   # mean response length of each rollout (tokens up to and including the first eos)
    truncate = trl_ppo.truncate_response

    def truncate_and_measure(stop_token_id, pad_token_id, responses):
        out = truncate(stop_token_id, pad_token_id, responses)
        lengths.append(float(trl_ppo.first_true_indices(out == pad_token_id).float().mean()))
        return out

    trl_ppo.truncate_response = truncate_and_measure

    tok = AutoTokenizer.from_pretrained(root)
    tok.padding_side = "left"
    texts = load_prompts(root)
    ids = tok(texts, add_special_tokens=False)["input_ids"]
    check_prompt_ids(ids, "trl112")
    policy = AutoModelForCausalLM.from_pretrained(root)
    ref = AutoModelForCausalLM.from_pretrained(root)
    reward = AutoModelForSequenceClassification.from_pretrained(root / "rm")
    value = AutoModelForSequenceClassification.from_pretrained(root / "rm")
    total = args.warmup + args.steps
    cfg = PPOConfig(
        output_dir=str(work / "trl"), per_device_train_batch_size=ROLLOUT_BATCH, gradient_accumulation_steps=1,
        num_mini_batches=MINI_BATCHES, num_ppo_epochs=PPO_EPOCHS, response_length=RESPONSE_LEN,
        temperature=TEMPERATURE, total_episodes=ROLLOUT_BATCH * total, local_rollout_forward_batch_size=ROLLOUT_BATCH,
        kl_coef=KL_COEF, learning_rate=LR, lr_scheduler_type="constant", stop_token="eos", missing_eos_penalty=None,
        num_sample_generations=0, report_to="none", use_cpu=True, bf16=args.precision == "bf16", save_strategy="no",
        seed=SEED,
        logging_steps=1, disable_tqdm=True, dataloader_num_workers=0)
    timer = StepTimer()
    # TRL 1.12's PPOTrainer builds its own Accelerator without passing `bf16` on: accelerate reads the precision
    # from this variable instead (checked below: the result records the accelerator's mixed_precision)
    os.environ["ACCELERATE_MIXED_PRECISION"] = "bf16" if args.precision == "bf16" else "no"
    trainer = PPOTrainer(args=cfg, processing_class=tok, model=policy, ref_model=ref, reward_model=reward,
                         value_model=value, train_dataset=Dataset.from_list([{"input_ids": p} for p in ids]),
                         eval_dataset=Dataset.from_list([{"input_ids": p} for p in ids[:ROLLOUT_BATCH]]),
                         callbacks=[timer])
    want = "bf16" if args.precision == "bf16" else "no"
    assert str(trainer.accelerator.mixed_precision) == want, f"TRL runs {trainer.accelerator.mixed_precision}, not {want}"
    trainer.train()
    assert len(timer.ends) == total, f"{len(timer.ends)} steps recorded"
    times = [b - a for a, b in zip([timer.start] + timer.ends[:-1], timer.ends)][args.warmup:]
    assert len(lengths) == total, f"{len(lengths)} rollouts measured"
    logs = [entry for entry in timer.logs if "objective/kl" in entry][args.warmup:]
    return {**summarise(times), "threads": timer.threads,
            "mean_response_length": statistics.mean(lengths[args.warmup:]),
            "eos_per_step": statistics.mean(entry["val/num_eos_tokens"] for entry in logs) if logs else None,
            "optim": str(cfg.optim), "mixed_precision": str(trainer.accelerator.mixed_precision),
            "gradient_checkpointing": bool(policy.is_gradient_checkpointing),
            "final_metrics": {k: timer.logs[-1].get(k) for k in ("loss/policy_avg", "loss/value_avg", "objective/kl",
                                                                "objective/scores")} if timer.logs else {}}


def child_main(args) -> None:
    import torch

    torch.set_num_threads(args.threads)
    root = Path(args.assets)  # inside the parent's temporary directory, removed with it
    work = Path(tempfile.mkdtemp(prefix=f"work-{args.child}-", dir=root.parent))
    result = {"rlhf_lab": run_rlhf_lab, "trl112": run_trl112}[args.child](root, args, work)
    result["peak_rss_mib"] = max(rss_peak_mib(), PEAK.get("setup", 0.0))
    if PEAK.get("reset"):
        result.update(peak_rss_setup_mib=PEAK["setup"], peak_rss_steps_mib=rss_peak_mib())
    import psutil

    result["rss_end_mib"] = psutil.Process().memory_info().rss / 2**20
    result["versions"], result["python"] = versions(), sys.executable
    Path(args.child_out).write_text(json.dumps(result))


# ------------------------------------------------------------------------------------------------ parent
def interpreter(name: str, args) -> str:
    if name == "trl112":
        path = Path(args.trl_python)
        return str(path if path.is_absolute() else REPO / path)
    return sys.executable


def run_child(name: str, args, assets: Path, tmp: Path) -> dict:
    out, log = tmp / f"{name}.json", tmp / f"{name}.log"
    python = interpreter(name, args)
    if not Path(python).exists():
        return {"contestant": name, "status": f"failed (no interpreter {python}; see the module docstring for the "
                                              "setup command)"}
    cmd = [python, str(Path(__file__).resolve()), "--child", name, "--assets", str(assets), "--child-out", str(out),
           "--steps", str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads),
           "--precision", args.precision]
    return launch_child(cmd, {"contestant": name}, out, log, tmp, args,
                        lambda: partial_result(Path(str(out) + ".partial"), args))


def partial_result(path: Path, args) -> dict:
    """A timed-out child: its figures over the timed steps it finished, if any."""
    times = json.loads(path.read_text()) if path.exists() else []
    status = f"timeout ({args.timeout}s) after {len(times)}/{args.warmup + args.steps} steps"
    timed = times[args.warmup:]
    return {"status": status, **(summarise(timed) if timed else {})}


def ratios(results: list[dict]) -> dict:
    ok = {r["contestant"]: r for r in results if r["status"] == "ok"}
    if "rlhf_lab" in ok and "trl112" in ok:
        return {"rlhf_lab_over_trl112": ok["rlhf_lab"]["episodes_per_s"] / ok["trl112"]["episodes_per_s"]}
    return {}


def markdown(results: list[dict]) -> str:
    header = ("| contestant | episodes/s | s/step (median) | mean response length | peak RSS MiB: process (steps) "
              "| status |")
    lines = [header, "|---|---:|---:|---:|---:|---|"]
    for r in results:
        cells = [f"{r['episodes_per_s']:.2f}" if "episodes_per_s" in r else "—",
                 f"{r['step_s_median']:.2f}" if "step_s_median" in r else "—",
                 f"{r['mean_response_length']:.2f}" if "mean_response_length" in r else "—",
                 f"{r['peak_rss_mib']:.0f} ({r.get('peak_rss_steps_mib', float('nan')):.0f})"
                 if "peak_rss_mib" in r else "—"]
        lines.append(f"| {r['contestant']} | " + " | ".join(cells) + f" | {r['status']} |")
    return "\n".join(lines)


def parent_main(args) -> None:
    contestants = [c for c in args.contestants.split(",") if c]
    if set(contestants) - set(CONTESTANTS):
        sys.exit(f"unknown contestant in {contestants}; known: {CONTESTANTS}")
    num_prompts = max(256, ROLLOUT_BATCH * (args.steps + args.warmup))
    results = []
    with tempfile.TemporaryDirectory(prefix="ppo-bench-") as tmp:
        assets = Path(tmp) / "assets"
        assets.mkdir()
        build_ppo_assets(assets, num_prompts)
        for name in contestants:
            print(f"[bench] {name} ...", file=sys.stderr, flush=True)
            results.append(run_child(name, args, assets, Path(tmp)))
            r = results[-1]
            print(f"[bench]   {r['status']} {r.get('episodes_per_s', 0):.2f} episodes/s {r.get('error', '')}",
                  file=sys.stderr, flush=True)
    shapes = {"model": {"arch": "gpt2", **MODEL, "vocab_size": NUM_WORDS + len(SPECIALS)},
              "reward_and_critic": "same backbone, scalar head (num_labels=1)", "prompt_tokens": PROMPT_LEN,
              "max_response_tokens": RESPONSE_LEN, "rollout_batch": ROLLOUT_BATCH, "ppo_epochs": PPO_EPOCHS,
              "mini_batches": MINI_BATCHES, "dataset_prompts": num_prompts}
    settings = {"steps": args.steps, "warmup": args.warmup, "threads": args.threads, "timeout_s": args.timeout,
                "precision": args.precision, "temperature": TEMPERATURE, "kl_coef": KL_COEF, "lr": LR,
                "trl_python": interpreter("trl112", args)}
    machine = machine_info()
    machine["versions"] = {"parent": machine["versions"],
                           **{r["contestant"]: r["versions"] for r in results if "versions" in r}}
    report = {"machine": machine, "shapes": shapes, "settings": settings, "results": results,
              "ratios": ratios(results)}
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(report, indent=2))
    vers = ", ".join(f"{k}: torch {v['torch']}, transformers {v['transformers']}, trl {v['trl']}"
                     for k, v in machine["versions"].items() if k != "parent")
    print(f"CPU: {machine['cpu']} ({machine['logical_cpus']} logical), threads={args.threads}, "
          f"flags {machine['flags']}; {vers}")
    print(markdown(results))
    for r in results:
        if "profile_s_per_step" in r:
            print(f"{r['contestant']} seconds per step: " + ", ".join(f"{k} {v:.2f}"
                                                                   for k, v in r["profile_s_per_step"].items()))
    if report["ratios"]:
        print(f"\nrlhf_lab / TRL 1.12 = {report['ratios']['rlhf_lab_over_trl112']:.2f}×")
    print(f"\nwritten: {out}")


def parse_args(argv=None):
    p = benchmark_parser(__doc__, CONTESTANTS, "ppo_throughput.json")
    p.add_argument("--steps", type=int, default=5, help="timed PPO steps (rollout + 4 epochs each)")
    p.add_argument("--warmup", type=int, default=1, help="untimed PPO steps first")
    p.add_argument("--timeout", type=int, default=900, help="seconds per contestant subprocess")
    p.add_argument("--precision", choices=("fp32", "bf16"), default="fp32",
                   help="fp32, or bf16 autocast for both contestants (results go to ppo_throughput_bf16.json)")
    p.add_argument("--trl-python", default=".venv-trl112/bin/python",
                   help="interpreter of the TRL 1.12 venv (relative to the repo root unless absolute)")
    args = parse_checked(p, argv)
    if args.precision == "bf16" and args.out == p.get_default("out"):
        args.out = args.out.replace(".json", "_bf16.json")
    return args


if __name__ == "__main__":
    ARGS = parse_args()
    child_main(ARGS) if ARGS.child else parent_main(ARGS)
