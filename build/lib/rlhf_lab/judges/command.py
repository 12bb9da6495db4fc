"""`rlhf-lab judge`: win rates of one run's policy against a baseline at chosen sampling temperatures.

    rlhf-lab judge run_dir=DIR [temperatures=[0,0.25,0.5,0.75,1.0]] [baseline=sft|chosen|DIR]
                   [judges=[oracle,smollm2]] [num_prompts=64] [pairs=FILE] [sft=DIR] [cache=FILE]
                   [max_new_tokens=N] [batch_size=N] [seed=N] [n_boot=N]

The policy is `<run_dir>/model`. Prompts are the run's held-out evaluation prompts (`samples/step_000000.jsonl`),
or, with `pairs=` (a TRL preference file), that file's first distinct prompts — `baseline=chosen` needs it, and
compares with its chosen responses. `baseline=sft` finds the run's SFT checkpoint from its config.yaml (the stage
cache, or model.name_or_path when the run had no SFT stage); `sft=DIR` overrides. Judges are presets of the `judge`
config group (conf/judge/*.yaml). Writes `<run_dir>/judge_temperatures.csv` atomically, samples under
`<run_dir>/judge_samples/`, verdicts in `<cache_dir>/judge_verdicts.sqlite`; prints the table.
"""
from __future__ import annotations

import json
import logging
from dataclasses import asdict, dataclass, field
from pathlib import Path

import yaml

from rlhf_lab.config import RunConfig
from rlhf_lab.utils.errors import ConfigError, DataError

log = logging.getLogger(__name__)

OPTIONS = ("run_dir", "temperatures", "baseline", "judges", "num_prompts", "pairs", "split", "sft", "cache",
           "max_new_tokens", "batch_size", "seed", "n_boot")
INT_OPTIONS = ("num_prompts", "max_new_tokens", "batch_size", "seed", "n_boot")
OUTPUT_CSV = "judge_temperatures.csv"


@dataclass
class JudgeArgs:
    run_dir: Path
    temperatures: list[float] = field(default_factory=lambda: [0.0, 0.25, 0.5, 0.75, 1.0])
    baseline: str = "sft"                 # sft | chosen | a run or checkpoint directory
    judges: list[str] = field(default_factory=lambda: ["oracle"])  # conf/judge preset names
    num_prompts: int | None = 64          # None: every prompt
    pairs: str | None = None              # TRL preference file: prompts (and chosen responses) from it
    split: str = "train"                  # its split (hub datasets)
    sft: str | None = None                # SFT checkpoint (default: located from the run's config.yaml)
    cache: str | None = None              # verdict cache (default: <cache_dir>/judge_verdicts.sqlite)
    max_new_tokens: int | None = None     # default: the run's eval.max_new_tokens
    batch_size: int = 32
    seed: int = 0
    n_boot: int = 2000


def _yaml_value(key: str, text: str):
    try:
        return yaml.safe_load(text)
    except yaml.YAMLError:
        raise ConfigError(f"{key}={text!r}: not a valid value") from None


def parse_judge_args(args: list[str]) -> JudgeArgs:
    """`key=value` options (OPTIONS); an unknown key or a malformed value is an error naming the key."""
    from rlhf_lab.judges.temperatures import check_temperatures

    opts: dict[str, str] = {}
    for arg in args:
        key, eq, value = arg.partition("=")
        if not eq or key not in OPTIONS:
            raise ConfigError(f"rlhf-lab judge: unknown option {arg!r}; expected key=value with key one of "
                              f"{', '.join(OPTIONS)}")
        opts[key] = value
    if not opts.get("run_dir"):
        raise ConfigError("rlhf-lab judge: run_dir=DIR is required (a run directory holding model/)")
    parsed = JudgeArgs(run_dir=Path(opts["run_dir"]))
    for key in INT_OPTIONS:
        if key in opts:
            value = _yaml_value(key, opts[key])
            if not isinstance(value, int) or isinstance(value, bool) or value < (0 if key == "seed" else 1):
                raise ConfigError(f"{key}={opts[key]!r}: expected a positive integer")
            setattr(parsed, key, value)
    if "temperatures" in opts:
        parsed.temperatures = check_temperatures(_yaml_value("temperatures", opts["temperatures"]))
    if "judges" in opts:
        names = _yaml_value("judges", opts["judges"])
        names = names if isinstance(names, list) else [names]
        if not names or not all(isinstance(n, str) and n for n in names):
            raise ConfigError(f"judges={opts['judges']!r}: expected a list of judge presets, e.g. [oracle,smollm2]")
        parsed.judges = names
    for key in ("baseline", "pairs", "split", "sft", "cache"):
        if opts.get(key):
            setattr(parsed, key, opts[key])
    return parsed


def load_run_config(run_dir: Path) -> RunConfig | None:
    """The run's resolved config (config.yaml), or None for a bare checkpoint directory."""
    from rlhf_lab.config import validate_run_config

    path = run_dir / "config.yaml"
    return validate_run_config(yaml.safe_load(path.read_text())) if path.is_file() else None


def locate_sft(run_dir: Path, cfg: RunConfig | None) -> Path:
    """The run's SFT (reference) checkpoint: model.name_or_path without an SFT stage, else the stage directory in
    `<cache_dir>/sft/` whose key.json matches the run's model, sft and task-seed settings (pipeline.prepare_data)."""
    if cfg is None:
        raise ConfigError(f"baseline=sft: {run_dir / 'config.yaml'} not found; pass sft=DIR (the SFT checkpoint)")
    if not cfg.model.sft or cfg.task.name == "none":
        return Path(cfg.model.name_or_path)
    want = json.loads(json.dumps({"model": asdict(cfg.model), "sft": asdict(cfg.sft), "seed": cfg.task.seed},
                                 default=str))
    stage_root = Path(cfg.cache_dir) / "sft"
    matches = [f.parent for f in sorted(stage_root.glob("*/key.json"))
               if {k: json.loads(f.read_text()).get(k) for k in want} == want and (f.parent / "_COMPLETE").exists()]
    if len(matches) != 1:
        found = "none" if not matches else ", ".join(map(str, matches))
        raise ConfigError(f"baseline=sft: cannot tell the SFT checkpoint of {run_dir} from {stage_root} (matching: "
                          f"{found}); pass sft=DIR")
    return matches[0]


def run_eval_prompts(run_dir: Path, num_prompts: int | None) -> list[str]:
    """The run's held-out evaluation prompts, distinct, in evaluation order (its step-0 samples file)."""
    from rlhf_lab.eval.samples import read_samples, samples_path

    path = samples_path(run_dir, 0)
    if not path.is_file():
        raise DataError(f"no prompts: {path} not found (the run was not evaluated); pass pairs=FILE (a TRL "
                        f"preference file) to take prompts from it")
    records = sorted(read_samples(path), key=lambda r: r["index"])
    return list(dict.fromkeys(r["prompt"] for r in records))[:num_prompts]


def gold_scorer_of(cfg: RunConfig | None, run_dir: Path):
    """(scorer, scorer id) for oracle judges: the run's gold reward (the task's, or VADER)."""
    from rlhf_lab.judges.oracle import gold_scorer
    from rlhf_lab.utils.cache import stable_hash

    if cfg is None:
        raise ConfigError(f"judge oracle: needs the run's gold reward, but {run_dir / 'config.yaml'} is missing")
    if cfg.task.name == "imdb":
        from rlhf_lab.recipes.stages import build_task

        gold = build_task(cfg.task, cfg.reward.gold, Path(cfg.cache_dir)).gold
        return gold_scorer(gold), f"{cfg.reward.gold}:{stable_hash(asdict(cfg.task))}"
    if cfg.reward.gold == "vader":
        from rlhf_lab.rewards.gold import VaderReward

        return gold_scorer(VaderReward()), "vader"
    raise ConfigError("judge oracle: reward.gold=classifier needs task=imdb (it is trained on the task's reviews)")


def resolve_prompts_and_baseline(opts: JudgeArgs, cfg: RunConfig | None, policy_dir: Path):
    """(prompts, temperatures.Baseline) for the options; errors name the option."""
    from rlhf_lab.judges.temperatures import Baseline, chosen_baseline, model_dir_of

    chosen = None
    if opts.pairs:
        from rlhf_lab.data.formats import load_preference_pairs
        from rlhf_lab.models.build import load_tokenizer

        tokenizer = load_tokenizer(policy_dir)
        pairs, _ = load_preference_pairs(opts.pairs, opts.split, tokenizer)
        prompts, chosen = chosen_baseline(pairs, opts.num_prompts, tokenizer)
    elif opts.baseline == "chosen":
        raise ConfigError("baseline=chosen needs pairs=FILE (a TRL preference file holding the chosen responses)")
    else:
        prompts = run_eval_prompts(opts.run_dir, opts.num_prompts)
    if opts.baseline == "chosen":
        return prompts, chosen
    if opts.baseline == "sft":
        sft = opts.sft or locate_sft(opts.run_dir, cfg)
        return prompts, Baseline("sft", model_dir=model_dir_of(sft, "sft"))
    if not Path(opts.baseline).exists():
        raise ConfigError(f"baseline={opts.baseline!r}: expected sft, chosen, or the directory of another run or "
                          f"checkpoint (no such path)")
    return prompts, Baseline(opts.baseline, model_dir=model_dir_of(opts.baseline, "baseline"))


def judge_main(args: list[str]) -> int:
    """The command (module doc): returns the exit code."""
    from rlhf_lab.judges.config import OracleJudgeConfig, load_judge_preset
    from rlhf_lab.judges.temperatures import (
        SamplingConfig,
        format_table,
        model_dir_of,
        win_rates_by_temperature,
    )
    from rlhf_lab.utils.cache import atomic_write_text

    logging.basicConfig(level=logging.INFO, format="[%(asctime)s %(name)s] %(message)s", datefmt="%H:%M:%S")
    opts = parse_judge_args(args)
    if not opts.run_dir.is_dir():
        raise ConfigError(f"run_dir={opts.run_dir}: no such directory")
    policy_dir = model_dir_of(opts.run_dir, "run_dir")
    judge_cfgs = [load_judge_preset(name) for name in opts.judges]   # an unknown preset fails before any work
    cfg = load_run_config(opts.run_dir)
    prompts, baseline = resolve_prompts_and_baseline(opts, cfg, policy_dir)
    needs_gold = any(isinstance(c, OracleJudgeConfig) for c in judge_cfgs)
    scorer, scorer_id = gold_scorer_of(cfg, opts.run_dir) if needs_gold else (None, "none")
    max_new = opts.max_new_tokens or (cfg.eval.max_new_tokens if cfg else 48)
    cache = Path(opts.cache) if opts.cache else Path(cfg.cache_dir if cfg else opts.run_dir) / "judge_verdicts.sqlite"
    table = win_rates_by_temperature(
        policy_dir, prompts, opts.temperatures, baseline, judge_cfgs, cache, opts.run_dir / "judge_samples",
        scorer=scorer, scorer_id=scorer_id, sampling=SamplingConfig(max_new, opts.batch_size, opts.seed),
        n_boot=opts.n_boot)
    atomic_write_text(opts.run_dir / OUTPUT_CSV, table.to_csv(index=False))
    print(format_table(table))
    print(f"wrote {opts.run_dir / OUTPUT_CSV} ({len(prompts)} prompts; verdict cache {cache})")
    return 0
