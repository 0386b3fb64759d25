"""Rewards and group statistics for group-relative alignment (llmcycle/stages/align/rewards.py): values
computed by hand, programs run in the PAL sandbox (escapes contained, failures counted), bad input."""
import math
import sys

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.stages.align import rewards as rw

GSM = "Natalia sold 48 clips in April and half as many in May. 48/2 = 24\n48 + 24 = 72\n#### 72"


def test_exact_answer_takes_the_final_number_against_gsm8ks_gold():
    completions = ["48 + 24 = 72\n#### 72", "so the answer is 72.", "#### 72.0 clips", "the answer is 71", "no idea"]
    assert rw.exact_answer(completions, [GSM] * 5).values == [1.0, 1.0, 1.0, 0.0, 0.0]
    assert rw.exact_answer(["It costs $1,250."], ["1250"]).values == [1.0]  # a plain reference: its last number


def test_a_reference_without_a_number_is_a_one_line_error():
    with pytest.raises(UserError, match="reference 2 .* holds no number"):
        rw.exact_answer(["1", "2"], ["#### 1", "a summary"])


@pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX rlimits")
def test_program_rewards_run_in_the_sandbox_and_count_what_failed():
    completions = [
        "```python\nclips = 48 + 48 // 2\nprint(clips)\n```",      # right
        "```python\nprint(70)\n```",                                # runs, wrong answer
        "```python\nimport os\nprint(os.listdir('/'))\n```",        # an escape: refused before running
        "```python\nwhile True:\n    pass\n```",                    # never ends: timed out
        "```python\nprint(1/0)\n```",                               # raises
    ]
    scored = rw.program(completions, [GSM] * 5, timeout_s=1.0)
    assert scored.values == [1.0, 0.0, 0.0, 0.0, 0.0]
    assert scored.failures == {"forbidden": 1, "timeout": 1, "error": 1}


def test_format_length_and_bad_patterns():
    assert rw.format_match(["<answer>4</answer>", "4"], r"^<answer>.*</answer>$").values == [1.0, 0.0]
    with pytest.raises(UserError, match="reward format: pattern '\\(' is not a regular expression"):
        rw.format_match(["x"], "(")
    words = ["one two three", "one two three four five six", " ".join(["w"] * 20)]
    assert rw.length_penalty(words, 3).values == [0.0, -1.0, -1.0]
    assert rw.length_penalty(["a b c d"], 2).values == [-1.0]
    assert rw.length_penalty(["a b c d e"], 4).values == [-0.25]


def test_a_user_function_is_imported_called_and_checked(tmp_path, monkeypatch):
    (tmp_path / "my_rewards.py").write_text(
        "def brevity(prompts, completions, references):\n    return [1.0 / (1 + len(c)) for c in completions]\n"
        "def broken(prompts, completions, references):\n    return [1.0]\n"
        "NOT_A_FUNCTION = 3\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    assert rw.python_reward("my_rewards:brevity", ["p", "p"], ["a", "abc"], ["r", "r"]).values == [0.5, 0.25]
    with pytest.raises(UserError, match="returned list of 1; it must return a list of 2 finite numbers"):
        rw.python_reward("my_rewards:broken", ["p", "p"], ["a", "b"], ["r", "r"])
    with pytest.raises(UserError, match="cannot import 'no_such_module'"):
        rw.user_function("no_such_module:f")
    with pytest.raises(UserError, match="has no function 'missing'"):
        rw.user_function("my_rewards:missing")
    with pytest.raises(UserError, match="is not a function"):
        rw.user_function("my_rewards:NOT_A_FUNCTION")
    with pytest.raises(UserError, match="should be module:function"):
        rw.user_function("my_rewards")


def test_rewards_combine_with_weights_and_report_each_ones_mean_and_std():
    specs = {"answer": {"kind": "exact_answer", "weight": 2.0},
             "short": {"kind": "length", "target": 2, "weight": 0.5}}
    total, stats = rw.combine(specs, ["q"] * 2, ["#### 72", "well well well then 70"], [GSM] * 2)
    assert total == [2.0, 0.5 * -1.0]
    assert stats["answer"] == {"mean": 0.5, "std": 0.5, "weight": 2.0, "failures": {}, "values": [1.0, 0.0]}
    assert stats["short"]["mean"] == -0.5
    with pytest.raises(UserError, match="no rewards configured"):
        rw.combine({}, [], [], [])
    with pytest.raises(UserError, match="reward kind 'exact' is not one of"):
        rw.combine({"x": {"kind": "exact"}}, ["q"], ["1"], ["1"])


def test_group_advantages_by_hand():
    rewards = [1.0, 0.0, 0.0, 1.0, 0.5, 0.5, 0.5, 0.5]  # two prompts, groups of 4
    # group 1: mean 0.5, population std 0.5 -> +-1 (eps 0 to compare exactly); group 2: all equal -> 0
    assert rw.group_advantages(rewards[:4], 4, scale=True, eps=0.0) == [1.0, -1.0, -1.0, 1.0]
    assert rw.group_advantages(rewards, 4, scale=True)[4:] == [0.0] * 4
    assert rw.group_advantages(rewards, 4, scale=False)[:4] == [0.5, -0.5, -0.5, 0.5]
    # rloo: reward minus the mean of the other three: 1 - 1/3, 0 - 2/3
    assert rw.group_advantages(rewards, 4, baseline="rloo")[:4] == pytest.approx([2 / 3, -2 / 3, -2 / 3, 2 / 3])
    assert rw.flat_group_share(rewards, 4) == 0.5


def test_groups_that_cannot_be_formed_are_one_line_errors():
    with pytest.raises(UserError, match="num_generations must be at least 2"):
        rw.group_advantages([1.0, 0.0], 1)
    with pytest.raises(UserError, match="5 completions do not split into groups of 2"):
        rw.group_advantages([1.0] * 5, 2)


def test_the_k3_kl_estimator_by_hand():
    logp = torch.tensor([-1.0, -2.0, -0.5])
    ref = torch.tensor([-1.0, -1.0, -1.5])
    expected = [math.exp(d) - d - 1 for d in (0.0, 1.0, -1.0)]
    assert rw.kl_k3(logp, ref).tolist() == pytest.approx(expected)
    assert (rw.kl_k3(torch.randn(100), torch.randn(100)) >= 0).all()


def test_a_reward_model_scores_each_completion():
    class LengthModel:  # stands in for a loaded RewardModel: one score per text
        def score(self, texts):
            return [float(len(t)) for t in texts]

    total, stats = rw.combine({"rm": {"kind": "reward_model", "weight": 0.5}}, ["p", "p"], ["ab", "abcd"], ["", ""],
                              {"rm": LengthModel()})
    assert total == [1.0, 2.0] and stats["rm"]["values"] == [2.0, 4.0]
    with pytest.raises(UserError, match="no reward model loaded"):
        rw.combine({"rm": {"kind": "reward_model"}}, ["p"], ["a"], [""])
