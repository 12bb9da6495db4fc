"""`rlhf-lab`: the command line.

    rlhf-lab [hydra overrides]            one alignment run (Hydra app; -m for sweeps, any Hydra launcher)
    rlhf-lab study [study=NAME] [phase=…] [jobs=N] [launcher=slurm] [overrides applied to every run]
                                          run a whole study (default: the embedded imdb study): stages, sweep
                                          points, points table, frontier, report (see rlhf_lab/study/runner.py)
    rlhf-lab status [study=NAME]          which stages and runs of a study are done, running, failed or missing
    rlhf-lab judge run_dir=DIR [temperatures=[…]] [baseline=sft|chosen|DIR] [judges=[…]]
                                          win rates of a run's policy vs a baseline per sampling temperature
    rlhf-lab plan model=NAME|DIR algo=ppo|dpo gpus=N gpu_gib=M [...]
                                          does it fit? bytes per GPU per role for each ZeRO stage / offload choice

One run on N processes (data parallel; DDP or DeepSpeed ZeRO by the `strategy` group):
    torchrun --nproc_per_node N -m rlhf_lab.cli strategy=zero3 [overrides]

User errors (bad config, bad data, missing paths) end with one clear message and exit code 2, never a traceback;
a diverged run (NaN/inf loss) ends with exit code 3 and leaves its run directory incomplete.
"""
from __future__ import annotations

import logging
import os
import signal
import sys
from pathlib import Path

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from rlhf_lab import paths
from rlhf_lab.trainers.errors import NonFiniteLossError, PreemptedError
from rlhf_lab.utils.errors import UserError

CONF_DIR = str(paths.CONF_DIR)
log = logging.getLogger("rlhf_lab")
_TASK_STARTED = False   # set when Hydra has composed the config and entered train_app


@hydra.main(version_base="1.3", config_path=CONF_DIR, config_name="config")
def train_app(raw: DictConfig) -> dict | None:
    from rlhf_lab.config import validate_run_config
    from rlhf_lab.config_keys import check_keys_are_read, override_keys

    hc = HydraConfig.get()
    global _TASK_STARTED
    _TASK_STARTED = True
    try:
        cfg = validate_run_config(raw)
        check_keys_are_read(cfg, override_keys(list(hc.overrides.task)))
        # the heavy imports (transformers, torch.distributed) only once the config is valid: a typo costs seconds
        from rlhf_lab.distributed.comm import adopt_submitit_env
        from rlhf_lab.recipes.run import run_alignment

        quiet_libraries()  # joblib/submitit workers never run main()
        adopt_submitit_env()
        if int(os.environ.get("RANK", "0")) != 0:  # one log per run: the other ranks report warnings and errors only
            logging.getLogger().setLevel(logging.WARNING)

        summary = run_alignment(cfg, Path(hc.runtime.output_dir))
        log.info("run complete: %s (points: %s)", hc.runtime.output_dir, Path(hc.runtime.output_dir) / "points.csv")
        return summary
    except PreemptedError as e:  # SIGTERM/SIGUSR1: checkpoint written, clean exit; rerunning resumes
        log.warning("%s", e)
        if e.requeue_signal is not None:   # under submitit: its handler checkpoints the job, requeues it and exits
            signal.raise_signal(e.requeue_signal)
        sys.exit(0)
    except (UserError, NonFiniteLossError) as e:
        diverged = isinstance(e, NonFiniteLossError)
        log.error("%s: %s", "training diverged (lower optim.lr or raise algo.beta)" if diverged else "error", e)
        print(f"rlhf-lab: {'training diverged' if diverged else 'error'}: {e}", file=sys.stderr)
        if hc.mode is not None and hc.mode.name == "MULTIRUN":
            return None  # one bad sweep point must not stop the others; its directory stays incomplete
        sys.exit(3 if diverged else 2)


def quiet_libraries() -> None:
    """Progress bars from transformers/datasets drown the training log; errors still show. Said through the
    environment, which transformers and huggingface_hub read when first imported, so a command that never needs
    transformers (a config error, `status`) does not pay a second for importing it; set directly as well when it
    is already imported (joblib/submitit workers). A user's own TRANSFORMERS_VERBOSITY wins."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    if "transformers" in sys.modules:   # imported before the environment said so
        from transformers.utils import logging as hf_logging

        hf_logging.disable_progress_bar()
        hf_logging.set_verbosity(hf_logging.log_levels.get(os.environ["TRANSFORMERS_VERBOSITY"], hf_logging.ERROR))


def follower_overrides(args: list[str]) -> list[str]:
    """Under torchrun / srun every rank runs this app; rank 0's run directory is the run's (broadcast in
    recipes.run), so the other ranks write no Hydra output directory of their own."""
    if int(os.environ.get("RANK", "0")) == 0 or any(a.startswith("hydra.run.dir=") for a in args):
        return args
    return [*args, "hydra.output_subdir=null", "hydra/job_logging=stdout", "hydra.run.dir=."]


def main() -> None:
    quiet_libraries()
    args = sys.argv[1:]
    try:
        if args and args[0] == "study":
            from rlhf_lab.study.runner import study_main

            sys.exit(study_main(args[1:]))
        if args and args[0] == "status":
            from rlhf_lab.study.status import status_main

            sys.exit(status_main(args[1:]))
        if args and args[0] == "plan":
            from rlhf_lab.distributed.plan_command import plan_main

            sys.exit(plan_main(args[1:]))
        if args and args[0] == "judge":
            from rlhf_lab.judges.command import judge_main

            sys.exit(judge_main(args[1:]))
        sys.argv = [sys.argv[0], *follower_overrides(args)]
        try:
            train_app()
            from rlhf_lab.distributed import comm

            comm.shutdown()
        except SystemExit as e:
            # Hydra reports a composition error (a typo'd key, an unknown group option, a malformed override)
            # with its own one-line message and exit code 1, before the task starts: a user error here (2)
            if e.code == 1 and not _TASK_STARTED:
                sys.exit(2)
            raise
    except UserError as e:
        print(f"rlhf-lab: error: {e}", file=sys.stderr)
        sys.exit(2)
    except NonFiniteLossError as e:
        print(f"rlhf-lab: training diverged: {e}. The run directory is left incomplete; lower optim.lr or "
              f"raise algo.beta and rerun.", file=sys.stderr)
        sys.exit(3)
    except PreemptedError as e:
        print(f"rlhf-lab: {e}", file=sys.stderr)
        sys.exit(0)


if __name__ == "__main__":
    main()
