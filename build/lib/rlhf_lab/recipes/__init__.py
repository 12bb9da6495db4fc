"""One small recipe per algorithm: a validated `RunConfig` in, models + data + trainer wired, a finished run out.

    run.py      the run driver every recipe shares: run directory, lock, resume, logger, points, summary
    stages.py   the cached shared stages (task, SFT, preferences, reward model, reference log-probs)
    dpo.py      the DPO family (paired and unpaired losses)
    ppo.py      PPO / PPO-GT with four roles

Only recipes see the whole config; each trainer and stage receives its own groups. `study/` drives recipes
(sweeps, stage caching, reports) and is never imported from here.
"""
