"""The ReAct agent: the calculator, step parsing, the loop (tool calls, observations fed back, the step
bound, recovery from unknown tools), the python tool through the sandbox, retrieval over a tiny index
(real all-MiniLM-L6-v2), the transcript in the run store, and `llmcycle agent` on a real tiny model.

The loop is driven by a scripted model: a callable returning canned ReAct text per step, so each test
knows exactly what the model "said" and can check what the loop did with it."""
from __future__ import annotations

import json
import sys
from fractions import Fraction
from pathlib import Path

import pytest

from llmcycle.augment import agent
from llmcycle.augment.agent import Tool, ToolError, calculate, format_number, parse_step, run_agent
from llmcycle.core.errors import UserError
from tiny import DOCS, make_doc_index

posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX")


class Scripted:
    """A model that answers step i with outputs[i] and remembers every prompt it was given."""

    def __init__(self, *outputs: str):
        self.outputs, self.prompts = list(outputs), []

    def __call__(self, prompt: str) -> str:
        self.prompts.append(prompt)
        return self.outputs[min(len(self.prompts), len(self.outputs)) - 1]


def recording_tool(name: str, reply: str = "ok"):
    calls = []
    return Tool(name, f"the {name} tool", lambda text: calls.append(text) or reply), calls


# -- calculator -------------------------------------------------------------------------------------
@pytest.mark.parametrize("expression, shown", [
    ("17 * 23", "391"), ("(3 + 4) * 2.5", "17.5"), ("0.1 + 0.2", "0.3"), ("7 / 2", "3.5"),
    ("1 / 3", "1/3 (≈ 0.333333333333)"), ("-2 ** 2", "-4"), ("(-2) ** 2", "4"), ("17 // 5", "3"),
    ("17 % 5", "2"), ("2 ** -2", "0.25"), ("2 ** 100", str(2 ** 100)), ("1e3 / 8", "125"),
    ("2 ** 0.5", repr(2 ** 0.5)), (" `6*7` = ", "42"),
])
def test_calculator_is_exact(expression, shown):
    assert format_number(calculate(expression)) == shown


def test_calculator_keeps_fractions_exact():
    assert calculate("1/3 + 1/6") == Fraction(1, 2) and calculate("(1/3) * 3") == 1
    assert isinstance(calculate("6/3"), int)  # a whole result is an int, not 2.0


@pytest.mark.parametrize("expression, reason", [
    ("__import__('os').system('echo hi')", "not \"__import__"), ("x + 1", "not 'x'"), ("abs(-3)", "not 'abs"),
    ("(1).__class__", "__class__"), ("'a' * 3", "not \"'a'\""), ("[1] * 3", "not '\\[1\\]'"),
    ("True + 1", "not 'True'"), ("2 ** 100000", "too large"), ("9 ** 9 ** 9", "too large"),
    ("10 ** 1000 * 10 ** 1000", "too large"), ("1e400", "too large"), ("1 / 0", "division by zero"),
    ("0 ** -1", "division by zero"), ("(-8) ** (1/3)", "not a real number"), ("2 ^ 10", "write \\*\\*"),
    ("lambda: 1", "not"), ("", "give an arithmetic expression"), ("1 +", "not an arithmetic expression"),
    ("1" * 400, "longer than 300"),
])
def test_calculator_refuses_anything_but_bounded_arithmetic(expression, reason):
    with pytest.raises(ToolError, match=reason):
        calculate(expression)


# -- parsing ----------------------------------------------------------------------------------------
def test_steps_parse_in_both_action_forms_and_invented_observations_are_cut():
    step = parse_step(" I need the product.\nAction: calculator\nAction Input: \"17 * 23\"")
    assert (step.thought, step.action, step.action_input, step.problem) == ("I need the product.", "calculator",
                                                                            "17 * 23", None)
    step = parse_step("Thought: add them\nAction: calculator[2 + 2]\nObservation: 5\nFinal Answer: 5")
    assert (step.action, step.action_input, step.final_answer) == ("calculator", "2 + 2", None)
    step = parse_step("Action: python[x = 3\nprint(x * 2)]")
    assert step.action_input == "x = 3\nprint(x * 2)"
    assert parse_step("calculator[9 * 9]").action == "calculator"  # a bare call on its own line
    assert parse_step("So it is 4.\nFinal Answer: 4").final_answer == "4"
    assert parse_step("Final Answer: 4\nAction: calculator[1]").final_answer == "4"  # the first one wins
    assert "no action and no final answer" in parse_step("hmm, let me think").problem
    assert "no input for calculator" in parse_step("Action: calculator").problem
    assert "Final Answer is empty" in parse_step("Final Answer:  ").problem


# -- the loop ---------------------------------------------------------------------------------------
def test_the_loop_calls_the_right_tool_and_feeds_back_the_observation():
    model = Scripted("I need the product.\nAction: calculator\nAction Input: 17 * 23",
                     "Thought: 17 * 23 is 391.\nFinal Answer: 391")
    echo, calls = recording_tool("echo")
    result = run_agent("What is 17 times 23?", model, [agent.calculator_tool(), echo], max_steps=5)
    assert (result.answer, result.stop_reason, result.steps) == ("391", "final_answer", 2)
    assert result.tools_used == {"calculator": 1} and calls == []
    first, second = result.transcript
    assert (first["action"], first["input"], first["observation"]) == ("calculator", "17 * 23", "391")
    assert second["final_answer"] == "391" and second["thought"] == "17 * 23 is 391."
    assert first["tool_seconds"] >= 0 and first["model_seconds"] >= 0
    # the prompt lists every tool, and the second prompt holds the first step and its real observation
    assert "calculator: exact arithmetic" in model.prompts[0] and "echo: the echo tool" in model.prompts[0]
    assert "one of [calculator, echo]" in model.prompts[0] and model.prompts[0].endswith("Thought:")
    assert model.prompts[1] == (model.prompts[0] + " I need the product.\nAction: calculator\nAction Input: "
                                "17 * 23\nObservation: 391\nThought:")


def test_an_invented_observation_is_replaced_by_the_real_one():
    model = Scripted("Action: calculator[2 + 2]\nObservation: 5\nFinal Answer: 5", "Final Answer: 4")
    result = run_agent("2 + 2?", model, [agent.calculator_tool()])
    assert result.transcript[0]["observation"] == "4" and result.answer == "4"
    assert "Observation: 5" not in model.prompts[1] and model.prompts[1].endswith("Observation: 4\nThought:")


def test_the_step_bound_stops_a_model_that_never_answers():
    model = Scripted("Action: calculator[1 + 1]")
    result = run_agent("loop forever", model, [agent.calculator_tool()], max_steps=3)
    assert (result.stop_reason, result.answer, result.steps, len(model.prompts)) == ("max_steps", None, 3, 3)
    assert result.message == "step limit reached: 3 step(s) without a final answer"
    assert result.tools_used == {"calculator": 3}
    with pytest.raises(UserError, match="max_steps must be at least 1"):
        run_agent("q", model, [agent.calculator_tool()], max_steps=0)


def test_unknown_tools_and_malformed_steps_become_observations_the_model_recovers_from():
    model = Scripted("Action: calculater[6 * 7]", "I am not sure what to do.",
                     "Action: calculator[6 * 7]", "Final Answer: 42")
    result = run_agent("6 times 7?", model, [agent.calculator_tool()], max_steps=5)
    unknown, malformed, ok, final = result.transcript
    assert unknown["observation"].startswith("error: unknown tool 'calculater' (did you mean 'calculator'?)")
    assert unknown["data"] == {"error": "unknown_tool"}
    assert "no action and no final answer" in malformed["observation"] and malformed["action"] is None
    assert ok["observation"] == "42" and final["final_answer"] == "42"
    assert "Observation: error: unknown tool 'calculater'" in model.prompts[1]
    assert result.tools_used == {"calculator": 1} and result.stop_reason == "final_answer"


def test_a_tool_refusal_is_an_observation_and_counts_as_a_call():
    model = Scripted("Action: calculator[__import__('os')]", "Final Answer: no")
    result = run_agent("hack?", model, [agent.calculator_tool()])
    assert result.transcript[0]["observation"].startswith("error: only numbers")
    assert result.transcript[0]["data"] == {"error": "refused"} and result.tools_used == {"calculator": 1}


def test_context_full_stops_the_loop_and_a_first_prompt_that_cannot_fit_is_an_error():
    def small_window(prompt: str) -> str:
        if len(prompt) > 900:
            raise agent.ContextFull("over")
        return "Action: calculator[1]"

    result = run_agent("q", small_window, [agent.calculator_tool()], max_steps=50)
    assert result.stop_reason == "context_full" and 1 <= result.steps < 50
    with pytest.raises(UserError, match="first prompt does not fit"):
        run_agent("q" * 1000, small_window, [agent.calculator_tool()])


def test_tool_registry_checks():
    with pytest.raises(UserError, match="two tools are named"):
        run_agent("q", Scripted("x"), [agent.calculator_tool(), agent.calculator_tool()])
    with pytest.raises(UserError, match="one word"):
        run_agent("q", Scripted("x"), [Tool("web search", "d", str)])
    with pytest.raises(UserError, match="question is empty"):
        run_agent(" ", Scripted("x"), [agent.calculator_tool()])


# -- python tool (the PAL sandbox) ------------------------------------------------------------------
@posix_only
def test_python_tool_runs_programs_in_the_sandbox():
    tool = agent.python_tool(timeout_s=10)
    assert tool.fn("```python\nprint(6 * 7)\n```").text == "42"
    refused = tool.fn("import os\nprint(os.listdir('/'))")
    assert refused.text == "error: forbidden import 'os' (line 1)" and refused.data["failure"] == "forbidden"
    failed = tool.fn("print('half')\n1 / 0")
    assert failed.text.startswith("error: ") and "ZeroDivisionError" in failed.text and "half" in failed.text
    assert tool.fn("x = 1").text.startswith("the program printed nothing")
    model = Scripted("Action: python\nAction Input: ```python\nprint(sum(range(10)))\n```", "Final Answer: 45")
    result = run_agent("sum of 0..9?", model, [tool])
    assert result.transcript[0]["observation"] == "45" and result.transcript[0]["data"]["ok"] is True


# -- retrieval tool ---------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def index(tmp_path_factory):
    from llmcycle.augment.index import Index

    return Index.load(make_doc_index(tmp_path_factory.mktemp("agent-rag")))


def test_retrieval_tool_returns_numbered_passages_with_sources(index):
    tool = agent.retrieval_tool(index, k=2)
    out = tool.fn("How tall is the Eiffel Tower?")
    assert out.text.splitlines()[0] == f"[1] (tower.txt) {DOCS['tower.txt']}"
    assert [c["n"] for c in out.data["citations"]] == [1, 2]
    best = out.data["citations"][0]
    assert Path(best["source"]).name == "tower.txt"
    assert Path(best["source"]).read_text()[best["start"]:best["end"]] == best["text"]
    again = tool.fn("What is the capital of Norway?")  # a passage seen before keeps its number
    numbers = {Path(c["source"]).name: c["n"] for c in out.data["citations"] + again.data["citations"]}
    assert numbers["tower.txt"] == 1 and len(set(numbers.values())) == len(numbers)
    model = Scripted("Action: retrieval[capital of Norway]", "Final Answer: Oslo [%d]" % numbers["oslo.md"])
    result = run_agent("What is the capital of Norway?", model, agent.default_tools(index, k=1))
    assert result.citations[0]["source"].endswith("oslo.md") and result.citations[0]["n"] == 1
    assert result.transcript[0]["observation"].startswith("[1] (oslo.md) # Oslo")
    with pytest.raises(ToolError, match="give a search query"):
        tool.fn("  ")


# -- the run store and the command ------------------------------------------------------------------
def test_transcript_is_recorded_in_the_run_store(tmp_path):
    from llmcycle.core.store import RunStore

    model = Scripted("Action: calculator[2 ** 10]", "Final Answer: 1024")
    result = run_agent("2 to the 10th?", model, [agent.calculator_tool()])
    store = RunStore(tmp_path / "runs")
    with store.start("augment", "agent", {"question": result.question}) as run:
        agent.record(run, result)
    rec = store.get(run.id)
    assert rec.status == "completed" and (rec.stage, rec.variant) == ("augment", "agent")
    summary = rec.summary()
    assert (summary["answer"], summary["steps"], summary["stop_reason"]) == ("1024", 2, "final_answer")
    assert summary["tools_used"] == {"calculator": 1}
    lines = [json.loads(line) for line in (rec.artifacts / "transcript.jsonl").read_text().splitlines()]
    assert [line.get("step") for line in lines] == [1, 2, None]
    assert lines[0]["action"] == "calculator" and lines[0]["input"] == "2 ** 10" and lines[0]["observation"] == "1024"
    assert lines[-1]["outcome"] == "final_answer" and lines[-1]["answer"] == "1024"
    assert "answer: 1024" in agent.format_transcript(result)


def test_agent_command_on_a_real_tiny_model_terminates_and_records(tmp_path, capsys, index):
    """A tiny random GPT-2 writes gibberish: the loop must still stop within max_steps and record it."""
    from tiny import make_gpt2

    from llmcycle.cli import main

    make_gpt2(tmp_path / "m", n_positions=1024)
    (tmp_path / "llmcycle.yaml").write_text("project: {name: p, task: qa}\nmodel: {name: m}\n")
    project = str(tmp_path / "llmcycle.yaml")
    assert main(["agent", "What is 6 times 7?", "-p", project, "--index", str(index.dir), "--max-steps", "2",
                 "--max-new-tokens", "12", "--json"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["stop_reason"] in ("max_steps", "context_full", "final_answer") and 1 <= out["steps"] <= 2
    assert len(out["transcript"]) == out["steps"]
    run_dir = next((tmp_path / "runs").glob("augment-agent-*"))
    recorded = (run_dir / "artifacts" / "transcript.jsonl").read_text().splitlines()
    assert len(recorded) == out["steps"] + 1 and json.loads(recorded[-1])["outcome"] == out["stop_reason"]
    config = json.loads((run_dir / "run.json").read_text())["config"]
    assert config["tools"] == ["calculator", "retrieval", "python"] and config["max_steps"] == 2
    assert main(["agent", "q", "-p", project, "--index", str(tmp_path / "none")]) == 2
    assert "no retrieval index" in capsys.readouterr().err
    assert main(["agent", "q", "-p", project, "--max-steps", "0"]) == 2
