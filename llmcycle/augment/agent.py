"""A tool-using agent: the model reasons in ReAct steps, the loop runs the tools it calls.

    from llmcycle.augment import agent
    from llmcycle.evaluation import harness
    from llmcycle.augment.index import Index

    tools = agent.default_tools(index=Index.load("rag-index"))     # calculator, retrieval, python
    result = agent.run_agent("How many days of leave are 3 years' worth?",
                             agent.model_fn(harness.load("run:tune/lora")), tools, max_steps=5)
    print(result.answer, result.stop_reason)     # stop_reason: final_answer | max_steps | context_full

    llmcycle agent "question" [--model M] [--index DIR] [--max-steps 5] [--json]   # a run augment/agent

Each step the model continues a prompt (the tools' names and descriptions, the format, the question,
the steps so far) with a thought and then either an action, `Action: calculator[2 * 21]` (or `Action:
calculator` with `Action Input: 2 * 21` on the next line), or `Final Answer: ...`. Generation stops at
`Observation:` and anything after one is cut, so only the loop writes observations. An unknown tool, a
malformed step and a tool's error each become the observation, so the model can recover. The loop makes
at most `max_steps` model calls and then stops with stop_reason "max_steps": it never loops forever.

Tools: `calculator` (arithmetic parsed with `ast`, exact with fractions, sizes bounded; never eval),
`retrieval` (top-k passages of a llmcycle index, numbered [n] across the run, with their sources),
`python` (a program run in the PAL sandbox, llmcycle.augment.sandbox). A Tool is a name, a one-line description
and a function from the input text to the observation: add your own to the list. Make the tools anew
for each question: the retrieval tool numbers passages across one run.
"""
from __future__ import annotations

import ast
import json
import math
import operator
import re
import time
from collections import Counter
from dataclasses import asdict, dataclass, field
from fractions import Fraction
from pathlib import Path
from typing import Callable

from llmcycle.augment import rag
from llmcycle.augment.rag import Citation
from llmcycle.augment.sandbox import run_program
from llmcycle.core.errors import UserError, suggest
from llmcycle.core.store import atomic_write_text

STOP = ["Observation:", "\nQuestion:"]  # the model must not write the tool's answer itself
MAX_OBSERVATION_CHARS = 1500  # a long observation is cut, so one tool call cannot fill the window
PROMPT = """Answer the question as well as you can. You can use these tools:

{tools}

Use this format:

Question: the question to answer
Thought: what to do next
Action: the tool to use, one of [{names}], with its input in brackets, like calculator[(3 + 4) * 2]
Observation: the tool's result
... (Thought, Action and Observation may repeat)
Thought: I know the answer
Final Answer: the answer to the question

Question: {question}
Thought:"""


@dataclass(frozen=True)
class Tool:
    name: str  # one word, how the model calls it
    description: str  # one line in the prompt: what it does and what input it takes
    fn: Callable[[str], "str | Observation"]


@dataclass
class Observation:
    text: str  # what the model sees
    data: dict = field(default_factory=dict)  # kept in the transcript only (sources, sandbox verdict)


class ToolError(Exception):
    """A tool refusing its input; the message becomes the observation."""


class ContextFull(Exception):
    """The prompt no longer fits the model's context window."""


# -- calculator -------------------------------------------------------------------------------------
MAX_EXPRESSION_CHARS = 300
MAX_BITS = 4096  # about 1,200 digits: more than any answer needs, small enough to stay instant
_OPS = {ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul}


def _check_size(x):
    if isinstance(x, float):
        if not math.isfinite(x):
            raise ToolError("the result is too large")
        return x
    x = Fraction(x)
    if max(abs(x.numerator).bit_length(), x.denominator.bit_length()) > MAX_BITS:
        raise ToolError(f"the result is too large (over {MAX_BITS} bits)")
    return x.numerator if x.denominator == 1 else x


def _power(a, b):
    if isinstance(b, Fraction) and b.denominator == 1:
        b = b.numerator
    if isinstance(b, int) and not isinstance(a, float):
        base = Fraction(a)
        bits = max(abs(base.numerator).bit_length(), base.denominator.bit_length())
        if (bits - 1) * abs(b) > MAX_BITS:  # a lower bound of the result's size: refuse before computing
            raise ToolError(f"the result of {a} ** {b} is too large")
        if base == 0 and b < 0:
            raise ToolError("division by zero (0 to a negative power)")
        return base ** b
    if a < 0:  # a fractional exponent: the result is irrational in general, so a float
        raise ToolError("a negative number to a fractional power is not a real number")
    try:
        return float(a) ** float(b)
    except (OverflowError, ZeroDivisionError):
        raise ToolError("the result is too large") from None


def _divide(op, a, b):
    if b == 0:
        raise ToolError("division by zero")
    if isinstance(a, float) or isinstance(b, float):
        return {ast.Div: operator.truediv, ast.FloorDiv: operator.floordiv, ast.Mod: operator.mod}[op](a, b)
    a, b = Fraction(a), Fraction(b)
    return a / b if op is ast.Div else a // b if op is ast.FloorDiv else a % b


def _evaluate(node):
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        if isinstance(node.value, float):
            if not math.isfinite(node.value):
                raise ToolError("the number is too large")
            return _check_size(Fraction(repr(node.value)))  # 0.1 is exactly one tenth
        return _check_size(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        value = _evaluate(node.operand)
        return -value if isinstance(node.op, ast.USub) else value
    if isinstance(node, ast.BinOp):
        op = type(node.op)
        if op is ast.BitXor:
            raise ToolError("'^' is not a power here: write ** (2 ** 10)")
        a, b = _evaluate(node.left), _evaluate(node.right)
        if op in _OPS:
            return _check_size(_OPS[op](a, b))
        if op in (ast.Div, ast.FloorDiv, ast.Mod):
            return _check_size(_divide(op, a, b))
        if op is ast.Pow:
            return _check_size(_power(a, b))
    what = ast.unparse(node)[:40]
    raise ToolError(f"only numbers, + - * / // % ** and parentheses are allowed, not {what!r}")


def calculate(expression: str):
    """The exact value of an arithmetic expression: an int, a Fraction, or a float for fractional powers.
    Parsed with `ast` and walked by hand; names, calls, attributes and strings are refused."""
    text = expression.strip().rstrip("=").strip().strip("`").strip()  # models write `6*7` =
    if not text:
        raise ToolError("give an arithmetic expression, like (3 + 4) * 2")
    if len(text) > MAX_EXPRESSION_CHARS:
        raise ToolError(f"the expression is longer than {MAX_EXPRESSION_CHARS} characters")
    try:
        tree = ast.parse(text, mode="eval")
    except (SyntaxError, ValueError, RecursionError, MemoryError):
        raise ToolError(f"not an arithmetic expression: {text[:60]!r}") from None
    return _evaluate(tree.body)


def format_number(x) -> str:
    """An int as it is, a terminating fraction as an exact decimal, any other fraction as n/d with
    its approximate value."""
    if isinstance(x, float):
        return repr(x)
    if isinstance(x, int) or x.denominator == 1:
        return str(int(x))
    from decimal import Decimal, localcontext

    d = x.denominator
    for p in (2, 5):
        while d % p == 0:
            d //= p
    with localcontext() as ctx:
        if d != 1:
            ctx.prec = 12
            return f"{x.numerator}/{x.denominator} (≈ {Decimal(x.numerator) / Decimal(x.denominator):g})"
        ctx.prec = len(str(abs(x.numerator))) + 2 * x.denominator.bit_length() + 2  # enough to be exact
        return format((Decimal(x.numerator) / Decimal(x.denominator)).normalize(), "f")


def calculator_tool() -> Tool:
    return Tool("calculator", "exact arithmetic with numbers, + - * / // % ** and parentheses; input: "
                "the expression, like (3 + 4) * 2.5", lambda text: format_number(calculate(text)))


# -- retrieval and python ---------------------------------------------------------------------------
def retrieval_tool(index, k: int = 3, max_chars: int = 400) -> Tool:
    """Top-k passages of `index` (an llmcycle.augment.index.Index). A passage keeps its [n] for the whole
    run, so the final answer's citations mean one thing."""

    if k < 1:
        raise UserError(f"retrieval k must be at least 1, got {k}")
    numbers: dict[int, int] = {}  # chunk id -> citation number

    def search(query: str) -> Observation:
        if not query.strip():
            raise ToolError("give a search query")
        lines, citations = [], []
        for hit in index.search(query.strip(), k):
            c = hit.chunk
            n = numbers.setdefault(c.id, len(numbers) + 1)
            text = " ".join(c.text.split())
            lines.append(f"[{n}] ({Path(c.source).name}) {text[:max_chars]}{'...' if len(text) > max_chars else ''}")
            citations.append(Citation.of(n, hit).to_api())
        return Observation("\n".join(lines) or "no passages found", {"citations": citations})

    return Tool("retrieval", "searches the indexed documents and returns the best passages numbered [n] "
                "with their source files; input: what to look for. Cite passages you use as [n]", search)


_FENCE = re.compile(r"^```[ \t]*(?:python3?|py)?[ \t]*\n(.*?)\n?```\s*$", re.S | re.I)


def python_tool(timeout_s: float = 5.0, **sandbox) -> Tool:
    """A program run by llmcycle.augment.sandbox.run_program (`sandbox`: its other options); the observation is
    what it printed, or the sandbox's one-line error."""
    def run(code: str) -> Observation:
        fenced = _FENCE.match(code.strip())
        program = fenced.group(1) if fenced else code.strip()
        if not program.strip():
            raise ToolError("give a Python program that prints its result")
        res = run_program(program, timeout_s=timeout_s, cpu_s=max(1, math.ceil(timeout_s)), **sandbox)
        data = {"ok": res.ok, "failure": res.failure, "sandbox_seconds": round(res.wall_s, 3)}
        if not res.ok:
            printed = f"\nprinted before the error: {res.stdout.strip()[-300:]}" if res.stdout.strip() else ""
            return Observation(f"error: {res.error}{printed}", data)
        return Observation(res.stdout.strip() or "the program printed nothing: print the result", data)

    return Tool("python", "runs a short Python program in a sandbox (no files, no network, math modules "
                "only) and returns what it prints; input: the program", run)


def default_tools(index=None, *, k: int = 3, python_timeout_s: float = 5.0) -> list[Tool]:
    """calculator, retrieval (when an index is given) and python."""
    tools = [calculator_tool()]
    if index is not None:
        tools.append(retrieval_tool(index, k))
    return tools + [python_tool(python_timeout_s)]


# -- parsing the model's steps ----------------------------------------------------------------------
@dataclass
class Step:
    thought: str
    action: str | None = None
    action_input: str | None = None
    final_answer: str | None = None
    problem: str | None = None  # why the text is not a usable step; told to the model


_OBSERVATION = re.compile(r"observation\s*:", re.I)
_FINAL = re.compile(r"final\s*answer\s*:", re.I)
_ACTION = re.compile(r"^[ \t]*action[ \t]*:", re.I | re.M)
_ACTION_INPUT = re.compile(r"^[ \t]*action[ \t]+input[ \t]*:", re.I | re.M)
_CALL = re.compile(r"^\s*`?([A-Za-z_][\w-]*)`?\s*\[(.*)\]\s*$", re.S)  # tool[input]
_BARE_CALL = re.compile(r"^[ \t]*([A-Za-z_][\w-]*)\[(.*)\][ \t]*$", re.M)
_NEXT_LABEL = re.compile(r"^[ \t]*(?:thought|action|action[ \t]+input|question)[ \t]*:", re.I | re.M)
_FORMAT_HINT = "write `Action: tool[input]` or `Final Answer: the answer`"


def _clean(text: str) -> str:
    text = text.strip()
    if len(text) >= 2 and text[0] == text[-1] and text[0] in "\"'":
        text = text[1:-1].strip()
    return text


def _thought(text: str) -> str:
    return re.sub(r"^\s*thought\s*:", "", text.strip(), flags=re.I).strip()


def visible(output: str) -> str:
    """The model's text up to any observation it started to write itself."""
    return _OBSERVATION.split(output, maxsplit=1)[0].rstrip()


def parse_step(output: str) -> Step:
    """Thought and action (or final answer) of one model output; `problem` says what is wrong with it."""
    text = visible(output)
    final, action = _FINAL.search(text), _ACTION.search(text)
    if final and (action is None or final.start() < action.start()):
        answer = _NEXT_LABEL.split(text[final.end():], maxsplit=1)[0].strip()  # the model ran on: cut it
        return Step(_thought(text[:final.start()]), final_answer=answer or None,
                    problem=None if answer else "the Final Answer is empty: write the answer after it")
    if action is None:
        bare = _BARE_CALL.search(text)  # `calculator[2+2]` on a line of its own is an action too
        if bare:
            return Step(_thought(text[:bare.start()]), bare.group(1), _clean(bare.group(2)))
        return Step(_thought(text), problem=f"no action and no final answer: {_FORMAT_HINT}")
    thought, rest = _thought(text[:action.start()]), text[action.end():]
    given = _ACTION_INPUT.search(rest)
    head = rest[:given.start()] if given else rest
    first = head.strip().split("\n")[0]
    call = _CALL.match(head) or _CALL.match(first)  # the input may span lines; prose may follow one
    if call:
        return Step(thought, call.group(1), _clean(call.group(2)))
    name = first.split("[")[0].strip(" `'\"*.:")
    if not name:
        return Step(thought, problem=f"the Action names no tool: {_FORMAT_HINT}")
    if given is None:
        return Step(thought, name, problem=f"no input for {name}: write `Action: {name}[input]`")
    return Step(thought, name, _clean(rest[given.end():]))


# -- the loop ---------------------------------------------------------------------------------------
@dataclass
class AgentResult:
    question: str
    answer: str | None  # None unless stop_reason is final_answer
    stop_reason: str  # final_answer | max_steps | context_full
    steps: int  # model calls made
    max_steps: int
    transcript: list[dict]  # one record per step: output, thought, action, input, observation, timings
    tools_used: dict[str, int]  # tool -> calls
    citations: list[dict]  # passages the retrieval tool showed, by [n]
    seconds: float

    @property
    def message(self) -> str:
        if self.stop_reason == "final_answer":
            return f"final answer after {self.steps} step(s)"
        if self.stop_reason == "max_steps":
            return f"step limit reached: {self.max_steps} step(s) without a final answer"
        return f"the context window is full after {self.steps} step(s), without a final answer"

    def summary(self) -> dict:
        return {"question": self.question, "answer": self.answer, "steps": self.steps,
                "max_steps": self.max_steps, "stop_reason": self.stop_reason, "message": self.message,
                "tools_used": self.tools_used, "citations": len(self.citations),
                "seconds": round(self.seconds, 3)}

    def to_dict(self) -> dict:
        return {**asdict(self), "message": self.message}


def build_prompt(question: str, tools: dict[str, Tool]) -> str:
    return PROMPT.format(tools="\n".join(f"{t.name}: {t.description}" for t in tools.values()),
                         names=", ".join(tools), question=question.strip())


def _registry(tools) -> dict[str, Tool]:
    registry: dict[str, Tool] = {}
    for tool in tools:
        if not re.fullmatch(r"[A-Za-z_][\w-]*", tool.name):
            raise UserError(f"tool name {tool.name!r} must be one word (letters, digits, _ or -)")
        if tool.name.lower() in registry:
            raise UserError(f"two tools are named '{tool.name}'")
        registry[tool.name.lower()] = tool
    if not registry:
        raise UserError("the agent needs at least one tool")
    return registry


def _act(step: Step, tools: dict[str, Tool]) -> tuple[Tool | None, Observation, float]:
    """(the tool called or None, the observation, seconds in the tool) for one parsed step."""
    if step.problem:
        return None, Observation(f"error: {step.problem}", {"error": "malformed"}), 0.0
    tool = tools.get(step.action.lower())
    if tool is None:
        return None, Observation(f"error: unknown tool '{step.action}'{suggest(step.action, tools)}; the "
                                 f"tools are {', '.join(tools)}", {"error": "unknown_tool"}), 0.0
    start = time.perf_counter()
    try:
        out = tool.fn(step.action_input)
    except (ToolError, UserError) as exc:  # the input was refused: the model may try another
        out = Observation(f"error: {exc}", {"error": "refused"})
    seconds = time.perf_counter() - start
    return tool, out if isinstance(out, Observation) else Observation(str(out)), seconds


def run_agent(question: str, generate: Callable[[str], str], tools, *, max_steps: int = 5,
              max_observation_chars: int = MAX_OBSERVATION_CHARS) -> AgentResult:
    """Answer `question` in at most `max_steps` model calls. `generate(prompt) -> text` is the model (see
    model_fn; it should stop at STOP, and may raise ContextFull); `tools` a list of Tool."""
    if not question.strip():
        raise UserError("the question is empty")
    if max_steps < 1:
        raise UserError(f"max_steps must be at least 1, got {max_steps}")
    registry = _registry(tools)
    prompt, scratch = build_prompt(question, registry), ""
    transcript: list[dict] = []
    used: Counter = Counter()
    citations: dict[int, dict] = {}
    start = time.perf_counter()

    def result(answer, reason):
        return AgentResult(question, answer, reason, len(transcript), max_steps, transcript, dict(used),
                           [citations[n] for n in sorted(citations)], time.perf_counter() - start)

    for number in range(1, max_steps + 1):
        t0 = time.perf_counter()
        try:
            output = generate(prompt + scratch)
        except ContextFull as exc:
            if number == 1:
                raise UserError(f"the agent's first prompt does not fit the model: {exc}; shorten the "
                                "question, lower max_new_tokens or use a model with a larger window") from None
            return result(None, "context_full")
        step = parse_step(output)
        record = {"step": number, "output": output, "thought": step.thought,
                  "model_seconds": round(time.perf_counter() - t0, 3)}
        transcript.append(record)
        if step.final_answer is not None and not step.problem:
            record["final_answer"] = step.final_answer
            return result(step.final_answer, "final_answer")
        tool, seen, tool_s = _act(step, registry)
        observation = seen.text
        if len(observation) > max_observation_chars:
            observation = observation[:max_observation_chars] + " ... (cut)"
        record.update(action=step.action, input=step.action_input, observation=observation,
                      tool_seconds=round(tool_s, 3), **({"data": seen.data} if seen.data else {}))
        if tool is not None:
            used[tool.name] += 1
        for c in seen.data.get("citations", []):
            citations[c["n"]] = c
        said = re.sub(r"^\s*thought\s*:\s*", "", visible(output), flags=re.I)
        scratch += f" {said.strip()}\nObservation: {observation}\nThought:"
    return result(None, "max_steps")


def model_fn(loaded, *, max_new_tokens: int = 128, generation: dict | None = None) -> Callable[[str], str]:
    """`generate(prompt) -> text` for an llmcycle LoadedModel (rag.as_model: its generator, its token
    count and window), stopping at STOP; raises ContextFull once the prompt leaves no room to generate."""

    stops = list(dict.fromkeys(STOP + list((generation or {}).get("stop", []))))
    m = rag.as_model(loaded, max_new_tokens=max_new_tokens, generation={**(generation or {}), "stop": stops})

    def generate(prompt: str) -> str:
        tokens = m.count_tokens(prompt)
        if tokens > m.budget:
            raise ContextFull(f"the prompt has {tokens} tokens, over the budget of {m.budget} "
                              f"(a window of {m.window} minus {max_new_tokens} to generate)")
        return m.generate([prompt])[0]

    return generate


def record(run, result: AgentResult) -> None:
    """Write the transcript (artifacts/transcript.jsonl: one line per step, then the outcome) and the
    summary of a run from the run store."""

    outcome = {"outcome": result.stop_reason, "answer": result.answer, "steps": result.steps,
               "message": result.message, "citations": result.citations}
    lines = [json.dumps(r, ensure_ascii=False, default=str) for r in result.transcript + [outcome]]
    atomic_write_text(run.artifacts / "transcript.jsonl", "\n".join(lines) + "\n")
    run.finish(result.summary())


def format_transcript(result: AgentResult) -> str:
    """The steps for a terminal: thought, action, observation; then the answer or why there is none."""
    lines = []
    for r in result.transcript:
        lines.append(f"step {r['step']}: {r['thought'] or '(no thought)'}")
        if "final_answer" in r:
            continue
        if r.get("action"):
            lines.append(f"  action: {r['action']}[{r['input'] if r['input'] is not None else ''}]"
                         f" ({r['tool_seconds']:.2f} s)")
        lines.append("  observation: " + r["observation"].replace("\n", "\n    "))
    lines.append(f"answer: {result.answer}" if result.answer is not None else f"no answer: {result.message}")
    return "\n".join(lines)
