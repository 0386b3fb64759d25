"""Rewards for group-relative alignment (GRPO / RLOO) and the group statistics built on them.

A reward scores every completion of a batch: rewards(prompts, completions, references) -> one float per
completion. Several combine as a weighted sum (`combine`), and each one's mean and std are kept for the
step's log line. The verifiable ones check an answer rather than judge it:

- exact_answer: the completion's final number against the reference's (GSM8K's `#### N`, else the
  reference's last number);
- program: the completion is a Python program, run in the PAL sandbox (augment/sandbox.py: static
  check, separate interpreter, CPU / memory / time limits, no network); its printed answer is compared
  with the reference's. A program that fails or times out scores 0 and is counted;
- format: 1 where a regular expression matches the completion (re.search; anchor it with ^ and $);
- length: 0 up to a target number of words, then minus the excess as a share of the target (-1 at most);
- python: the user's own `module:function`, called with prompts=, completions=, references=;
- reward_model: a trained reward model (run:align/NAME: a classifier with its label, or a pairwise
  model) scores each completion's text, as PPO's reward does.

Group statistics: GRPO's advantage is a completion's reward minus its group's mean (divided by the
group's std when asked); RLOO's is its reward minus the mean of the group's other completions. A group
whose rewards are all equal gives no learning signal; its share is reported. The KL to the reference
is the k3 estimator, exp(ref - logp) - (ref - logp) - 1 per token (Schulman 2020): non-negative and
unbiased for samples from the policy.
"""
from __future__ import annotations

import importlib
import math
import re
from dataclasses import dataclass, field
from typing import Callable

from llmcycle.augment.pal import extract_program, gsm8k_gold, numbers_match, parse_number
from llmcycle.augment.sandbox import run_program
from llmcycle.core.errors import UserError

KINDS = ("exact_answer", "program", "format", "length", "python", "reward_model")


@dataclass
class Scored:
    """One reward's values for a batch, and what it had to count (programs that failed, by why)."""
    values: list[float]
    failures: dict[str, int] = field(default_factory=dict)


# -- the answer a reference holds ---------------------------------------------------------------------
def reference_number(reference: str, where: int) -> float:
    """GSM8K's `#### N`, else the last number of the reference; a one-line error when it has none."""
    if "####" in reference:
        return gsm8k_gold(reference)
    value = parse_number(reference)
    if value is None:
        raise UserError(f"reward exact_answer/program: reference {where + 1} ({reference[:60]!r}) holds no number "
                        "to check against (GSM8K's `#### N`, or a number); these rewards need numeric answers")
    return value


def final_number(completion: str) -> float | None:
    """The number a completion ends on: after its last `####` when it writes one, else its last number."""
    tail = completion.rsplit("####", 1)[-1] if "####" in completion else completion
    return parse_number(tail)


# -- the rewards --------------------------------------------------------------------------------------
def exact_answer(completions: list[str], references: list[str]) -> Scored:
    golds = [reference_number(r, i) for i, r in enumerate(references)]
    return Scored([float(numbers_match(final_number(c), g)) for c, g in zip(completions, golds)])


def program(completions: list[str], references: list[str], timeout_s: float = 5.0) -> Scored:
    """1 where the completion's program prints the reference's answer; failures (forbidden, syntax,
    timeout, memory, error...) score 0 and are counted by kind."""
    golds = [reference_number(r, i) for i, r in enumerate(references)]
    values, failures = [], {}
    for completion, gold in zip(completions, golds):
        # The CPU limit sits a second above the wall-clock one so a busy loop is always counted as a
        # timeout (with equal limits the two raced, and which one fired depended on the machine's load).
        result = run_program(extract_program(completion), timeout_s=timeout_s, cpu_s=math.ceil(timeout_s) + 1)
        if not result.ok:
            failures[result.failure or "error"] = failures.get(result.failure or "error", 0) + 1
            values.append(0.0)
            continue
        values.append(float(numbers_match(parse_number(result.answer), gold)))
    return Scored(values, failures)


def format_match(completions: list[str], pattern: str) -> Scored:
    regex = compile_pattern(pattern)
    return Scored([1.0 if regex.search(c) else 0.0 for c in completions])


def compile_pattern(pattern: str):
    try:
        return re.compile(pattern, re.DOTALL)
    except re.error as exc:
        raise UserError(f"reward format: pattern {pattern!r} is not a regular expression ({exc})") from None


def length_penalty(completions: list[str], target: int) -> Scored:
    if target < 1:
        raise UserError(f"reward length: target must be at least 1 word, got {target}")
    return Scored([-min(1.0, max(0, len(c.split()) - target) / target) for c in completions])


def user_function(spec: str) -> Callable:
    """`module:function`, imported; a one-line error saying what is wrong with it."""
    module, _, name = spec.partition(":")
    if not module or not name:
        raise UserError(f"reward python: {spec!r} should be module:function (e.g. my_rewards:brevity)")
    try:
        fn = getattr(importlib.import_module(module), name)
    except ImportError as exc:
        raise UserError(f"reward python: cannot import {module!r} ({exc}); put it on PYTHONPATH or beside the "
                        "project file") from None
    except AttributeError:
        raise UserError(f"reward python: module {module!r} has no function {name!r}") from None
    if not callable(fn):
        raise UserError(f"reward python: {spec} is not a function")
    return fn


def python_reward(spec: str, prompts: list[str], completions: list[str], references: list[str]) -> Scored:
    values = user_function(spec)(prompts=prompts, completions=completions, references=references)
    ok = isinstance(values, (list, tuple)) and len(values) == len(completions) and all(
        isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)
    if not ok:
        shape = f"{type(values).__name__} of {len(values)}" if hasattr(values, "__len__") else type(values).__name__
        raise UserError(f"reward python: {spec} returned {shape}; it must return a list of {len(completions)} "
                        "finite numbers, one per completion")
    return Scored([float(v) for v in values])


def score(spec: dict, prompts: list[str], completions: list[str], references: list[str], model=None) -> Scored:
    """One reward as the project file gives it: {kind, weight, and the kind's own keys}; `model` is the
    loaded reward model of a reward_model reward."""
    kind = spec.get("kind")
    if kind == "reward_model":
        if model is None:
            raise UserError("reward reward_model: no reward model loaded (set model: run:align/NAME)")
        return Scored([float(v) for v in model.score(completions)])
    if kind == "exact_answer":
        return exact_answer(completions, references)
    if kind == "program":
        return program(completions, references, spec.get("timeout_s", 5.0))
    if kind == "format":
        return format_match(completions, spec["pattern"])
    if kind == "length":
        return length_penalty(completions, spec["target"])
    if kind == "python":
        return python_reward(spec["function"], prompts, completions, references)
    raise UserError(f"reward kind {kind!r} is not one of {', '.join(KINDS)}")


def combine(specs: dict[str, dict], prompts: list[str], completions: list[str], references: list[str],
            models: dict | None = None):
    """(the weighted sum per completion, {name: {mean, std, weight, failures, values}}) of the named rewards;
    `models` holds the loaded model of each reward_model reward by name."""
    if not specs:
        raise UserError("align grpo/rloo: no rewards configured (e.g. rewards: {answer: {kind: exact_answer}})")
    total = [0.0] * len(completions)
    stats = {}
    for name, spec in specs.items():
        scored = score(spec, prompts, completions, references, (models or {}).get(name))
        weight = spec.get("weight", 1.0)
        total = [t + weight * v for t, v in zip(total, scored.values)]
        mean = sum(scored.values) / len(scored.values)
        std = math.sqrt(sum((v - mean) ** 2 for v in scored.values) / len(scored.values))
        stats[name] = {"mean": mean, "std": std, "weight": weight, "failures": scored.failures,
                       "values": scored.values}
    return total, stats


# -- groups -------------------------------------------------------------------------------------------
def check_groups(n: int, group: int) -> None:
    if group < 2:
        raise UserError(f"align: num_generations must be at least 2 (a group of {group} has no relative "
                        "advantage: every completion would be its own baseline)")
    if n % group:
        raise UserError(f"align: {n} completions do not split into groups of {group}; make the batch a "
                        "multiple of num_generations")


def group_advantages(rewards: list[float], group: int, baseline: str = "grpo", scale: bool = True,
                     eps: float = 1e-4) -> list[float]:
    """Each completion's advantage within its group of `group` consecutive completions (one prompt's):
    grpo: reward - the group's mean, divided by its std (population) + eps when `scale`; rloo: reward -
    the mean of the group's other completions."""
    check_groups(len(rewards), group)
    out = []
    for start in range(0, len(rewards), group):
        g = rewards[start:start + group]
        mean = sum(g) / group
        if baseline == "rloo":
            out += [(r - (sum(g) - r) / (group - 1)) for r in g]
            continue
        std = math.sqrt(sum((r - mean) ** 2 for r in g) / group)
        out += [(r - mean) / (std + eps) if scale else r - mean for r in g]
    return out


def flat_group_share(rewards: list[float], group: int) -> float:
    """The share of groups whose completions all scored the same: no signal to learn from."""
    check_groups(len(rewards), group)
    groups = [rewards[s:s + group] for s in range(0, len(rewards), group)]
    return sum(max(g) - min(g) == 0 for g in groups) / len(groups)


def kl_k3(logp, ref_logp):
    """The k3 estimate of KL(policy || reference) per token from the sampled tokens' log-probabilities
    (tensors of the same shape): exp(ref - logp) - (ref - logp) - 1, never negative."""
    diff = ref_logp - logp
    return diff.exp() - diff - 1
