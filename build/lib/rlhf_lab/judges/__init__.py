"""Pairwise judges (oracle, local HF model, OpenAI-compatible API), verdict cache, win-rate maths, study entry.

    from rlhf_lab.judges.study import judge_study, merge_judgements
    from rlhf_lab.judges.temperatures import win_rates_by_temperature   # `rlhf-lab judge` (judges/command.py)
"""
from rlhf_lab.judges.base import Comparison, Judge, Usage, Verdict
from rlhf_lab.judges.config import parse_judge_config

__all__ = ["Comparison", "Judge", "Usage", "Verdict", "parse_judge_config"]
