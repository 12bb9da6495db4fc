"""User reward callables for the PPO tests (loaded through algo.reward_callable=tests.ppo_rewards:<name>)."""
import math


def length_reward(prompts, completions):
    return [len(c) / 100.0 for c in completions]


def some_nan_reward(prompts, completions):
    return [math.nan if i % 4 == 0 else 1.0 for i in range(len(completions))]


def all_nan_reward(prompts, completions):
    return [math.inf] * len(completions)

