"""Program-aided language models (PAL) on GSM8K: the model writes a program, the sandbox runs it.

Models are weak at arithmetic and good at writing code, so PAL (Gao et al. 2022) asks the model for a
short Python program whose printed result is the answer, and runs it (llmcycle.augment.sandbox). This module
has the pieces to compare that with answering directly, for the same model and questions:

* prompts: `pal_prompt` (few-shot, each shot a short program ending in print(...)) and `direct_prompt`
  (the same questions answered with a number); `extract_program` pulls the program out of a reply;
  `parse_number` reads the number from an answer (`$1,234.50` -> 1234.5, `3/4` -> 0.75);
* data: `load_gsm8k` reads GSM8K jsonl; `gsm8k_gold` is the number after `#### `, commas removed;
* scoring: `evaluate_pal` / `evaluate_direct` take `generate_fn(prompts) -> completions`, so any
  model or API can be plugged in; numbers match within a small relative tolerance;
  `evaluate_model_on_gsm8k` wires in an llmcycle model (llmcycle.evaluation.harness.load and its Generator);
* training data for PAL: `annotation_to_program` turns GSM8K's calculator annotations (`<<48/2=24>>`)
  into a program, one variable per annotation, later steps reusing earlier ones;
  `annotation_program_report` checks how many of them print the gold answer, and `pal_training_rows`
  keeps those as (prompt, target) pairs for fine-tuning.

Example:
    report = evaluate_model_on_gsm8k("google/flan-t5-base", "gsm8k/train.jsonl", limit=20)
    print(report["pal"]["accuracy"], report["direct"]["accuracy"])
"""
from __future__ import annotations

import ast
import json
import math
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

from llmcycle.augment.sandbox import run_program
from llmcycle.core.errors import UserError
from llmcycle.core.progress import bar
from llmcycle.evaluation import harness
from llmcycle.models.generation import GenerationConfig


@dataclass(frozen=True)
class Shot:
    question: str
    program: str  # ends in print(...)
    answer: float


@dataclass(frozen=True)
class GSM8KExample:
    question: str
    answer: str  # the worked solution with calculator annotations, ending in `#### <number>`
    gold: float
    where: str  # file:line, for error messages and per-example rows


# Written for this module in the style of the PAL paper's GSM8K prompt: named quantities, one step per
# line, the answer printed last.
DEFAULT_SHOTS = (
    Shot("Olivia has $23. She bought five bagels for $3 each. How much money does she have left?",
         "money_initial = 23\nbagels = 5\nbagel_cost = 3\nmoney_spent = bagels * bagel_cost\n"
         "money_left = money_initial - money_spent\nprint(money_left)", 8),
    Shot("Michael had 58 golf balls. On Tuesday he lost 23 golf balls. On Wednesday he lost 2 more. "
         "How many golf balls did he have at the end of Wednesday?",
         "golf_balls_initial = 58\nlost_tuesday = 23\nlost_wednesday = 2\n"
         "golf_balls_left = golf_balls_initial - lost_tuesday - lost_wednesday\nprint(golf_balls_left)", 33),
    Shot("There were nine computers in the server room. Five more computers were installed each day, "
         "from Monday to Thursday. How many computers are now in the server room?",
         "computers_initial = 9\ncomputers_per_day = 5\ndays = 4  # Monday to Thursday\n"
         "computers_added = computers_per_day * days\ncomputers_total = computers_initial + computers_added\n"
         "print(computers_total)", 29),
    Shot("A baker makes 3 trays of 12 muffins. She sells 2/3 of the muffins and gives away 4. "
         "How many muffins are left?",
         "from fractions import Fraction\n\nmuffins = 3 * 12\nsold = muffins * Fraction(2, 3)\n"
         "given_away = 4\nmuffins_left = muffins - sold - given_away\nprint(muffins_left)", 8),
)
PAL_INSTRUCTION = "Solve each problem by writing a Python program that prints the answer."
DIRECT_INSTRUCTION = "Answer each question with a number."
PAL_STOP = ["```", "\nQuestion:"]  # the program ends at its closing fence
DIRECT_STOP = ["\n"]


# -- prompts and replies -------------------------------------------------------------------------------
def _number_text(x: float) -> str:
    return str(int(x)) if float(x).is_integer() else str(x)


def pal_prompt(question: str, shots=DEFAULT_SHOTS) -> str:
    """Few-shot PAL prompt ending in an open ```python fence, so the reply is the program itself."""
    parts = [PAL_INSTRUCTION, ""]
    for s in shots:
        parts += [f"Question: {s.question}", "```python", s.program, "```", ""]
    parts += [f"Question: {question.strip()}", "```python", ""]
    return "\n".join(parts)


def direct_prompt(question: str, shots=DEFAULT_SHOTS) -> str:
    """The same shots answered with just the number; the reply is the answer."""
    parts = [DIRECT_INSTRUCTION, ""]
    for s in shots:
        parts += [f"Question: {s.question}", f"Answer: {_number_text(s.answer)}", ""]
    parts.append(f"Question: {question.strip()}\nAnswer:")
    return "\n".join(parts)


_FENCED = re.compile(r"```[ \t]*(?:python3?|py)[ \t]*\n(.*?)(?:```|\Z)", re.S | re.I)


def extract_program(model_output: str) -> str:
    """The program in a reply: the first ```python block; else a block the reply starts with; else the
    text before the first fence or next `Question:` (a reply continuing the prompt's open fence)."""
    m = _FENCED.search(model_output)
    if m:
        return m.group(1).strip("\n")
    text = model_output.strip()
    if text.startswith("```"):
        text = text[3:].partition("\n")[2]
    text = text.split("```")[0]
    return text.split("\nQuestion:")[0].strip("\n")


_NUMBER = re.compile(r"[-+]?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:[eE][-+]?\d+)?|[-+]?\.\d+")
_FRACTION = re.compile(r"^\s*\$?([-+]?\d+)\s*/\s*(\d+)\s*\.?\s*$")


def parse_number(text: str | None) -> float | None:
    """The last number in `text` (thousands commas and $ ignored; a bare `a/b`, as Fraction prints, is
    a/b); None when there is none."""
    if not text:
        return None
    frac = _FRACTION.match(text)
    if frac:
        den = int(frac.group(2))
        return int(frac.group(1)) / den if den else None
    found = _NUMBER.findall(text)
    if not found:
        return None
    value = float(found[-1].replace(",", ""))
    return value if math.isfinite(value) else None


def numbers_match(prediction: float | None, gold: float, tolerance: float = 1e-4) -> bool:
    """Equal within `tolerance`, relative to the gold (absolute below 1): 10.000000000000002 is 10."""
    return prediction is not None and abs(prediction - gold) <= tolerance * max(1.0, abs(gold))


# -- GSM8K ------------------------------------------------------------------------------------------
def gsm8k_gold(answer_text: str) -> float:
    """The gold answer: the number after `#### `, commas removed."""
    m = re.search(r"####\s*(\S+)\s*$", answer_text.strip())
    if m:
        try:
            return float(m.group(1).replace(",", ""))
        except ValueError:
            pass
    raise UserError(f"GSM8K answer has no `#### <number>` line: ...{answer_text[-60:]!r}")


def load_gsm8k(path, limit: int | None = None) -> list[GSM8KExample]:
    """The first `limit` records (all when None) of a GSM8K jsonl file (fields question and answer)."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: GSM8K file not found")
    examples = []
    with path.open(encoding="utf-8") as f:
        for n, line in enumerate(f, 1):
            if limit is not None and len(examples) >= limit:
                break
            if not line.strip():
                continue
            where = f"{path}:{n}"
            try:
                rec = json.loads(line)
                question, answer = rec["question"], rec["answer"]
            except (ValueError, KeyError, TypeError) as exc:
                raise UserError(f"{where}: not a GSM8K record with `question` and `answer` ({exc})") from None
            try:
                gold = gsm8k_gold(answer)
            except UserError as exc:
                raise UserError(f"{where}: {exc}") from None
            examples.append(GSM8KExample(question, answer, gold, where))
    return examples


# -- scoring ---------------------------------------------------------------------------------------
def _check_inputs(questions, golds) -> None:
    if not questions:
        raise UserError("no questions to evaluate")
    if len(questions) != len(golds):
        raise UserError(f"{len(questions)} questions but {len(golds)} gold answers")


def _generate(generate_fn, prompts: list[str]) -> list[str]:
    outputs = list(generate_fn(prompts))
    if len(outputs) != len(prompts):
        raise UserError(f"generate_fn returned {len(outputs)} completions for {len(prompts)} prompts")
    return outputs


def _summary(method: str, rows: list[dict]) -> dict:
    correct = sum(r["correct"] for r in rows)
    return {"method": method, "n": len(rows), "correct": correct, "accuracy": correct / len(rows),
            "answered": sum(r["prediction"] is not None for r in rows), "rows": rows}


def evaluate_pal(generate_fn: Callable[[list[str]], list[str]], questions: list[str], golds: list[float],
                 shots=DEFAULT_SHOTS, *, sandbox: dict | None = None, workers: int = 2,
                 tolerance: float = 1e-4, progress: bool = False) -> dict:
    """PAL accuracy: one program per question, run in the sandbox (`sandbox`: run_program options),
    the number in its last printed line compared with the gold. Programs that fail count as wrong;
    `failures` counts why (forbidden, syntax, timeout, error, ...)."""
    from concurrent.futures import ThreadPoolExecutor

    _check_inputs(questions, golds)
    outputs = _generate(generate_fn, [pal_prompt(q, shots) for q in questions])
    programs = [extract_program(o) for o in outputs]
    options = dict(sandbox or {})
    results = []
    # Each run waits on its own process, so threads overlap the interpreters' start-up.
    with bar(len(programs), "pal: run programs", enabled=progress) as advance, \
            ThreadPoolExecutor(max(1, workers)) as pool:
        for res in pool.map(lambda code: run_program(code, **options), programs):
            results.append(res)
            advance(len(results))
    rows = []
    for i, (q, gold, out, program, res) in enumerate(zip(questions, golds, outputs, programs, results)):
        prediction = parse_number(res.answer) if res.ok else None
        rows.append({"index": i, "question": q, "gold": gold, "output": out, "program": program,
                     "ok": res.ok, "stdout": res.stdout, "error": res.error, "failure": res.failure,
                     "prediction": prediction, "correct": numbers_match(prediction, gold, tolerance)})
    summary = _summary("pal", rows)
    summary["executed"] = sum(r["ok"] for r in rows)
    summary["failures"] = dict(Counter(r["failure"] for r in rows if r["failure"]))
    return summary


def evaluate_direct(generate_fn: Callable[[list[str]], list[str]], questions: list[str], golds: list[float],
                    shots=DEFAULT_SHOTS, *, tolerance: float = 1e-4) -> dict:
    """Direct-answer accuracy: the last number in the reply (before any next `Question:`)."""
    _check_inputs(questions, golds)
    outputs = _generate(generate_fn, [direct_prompt(q, shots) for q in questions])
    rows = []
    for i, (q, gold, out) in enumerate(zip(questions, golds, outputs)):
        prediction = parse_number(out.split("Question:")[0])
        rows.append({"index": i, "question": q, "gold": gold, "output": out, "prediction": prediction,
                     "correct": numbers_match(prediction, gold, tolerance)})
    return _summary("direct", rows)


def evaluate_model_on_gsm8k(model, path, limit: int | None = 20, *, shots=DEFAULT_SHOTS,
                            max_new_tokens: int = 256, direct_max_new_tokens: int = 16,
                            batch_size: int = 8, context_window: int | None = None,
                            sandbox: dict | None = None, workers: int = 2, progress: bool = False) -> dict:
    """PAL vs direct answering for one model on the first `limit` GSM8K records. `model` is a model
    reference for llmcycle.evaluation.harness.load (Hub id, folder, run) or an already loaded LoadedModel."""

    loaded = model if isinstance(model, harness.LoadedModel) else \
        harness.load(str(model), context_window=context_window)
    examples = load_gsm8k(path, limit)
    questions, golds = [e.question for e in examples], [e.gold for e in examples]

    def generate_with(max_tokens: int, stop: list[str]):
        cfg = GenerationConfig(max_new_tokens=max_tokens, stop=stop, batch_size=batch_size)
        return lambda prompts: [r.text for r in loaded.generator.generate(prompts, cfg)]

    pal = evaluate_pal(generate_with(max_new_tokens, PAL_STOP), questions, golds, shots,
                       sandbox=sandbox, workers=workers, progress=progress)
    direct = evaluate_direct(generate_with(direct_max_new_tokens, DIRECT_STOP), questions, golds, shots)
    for row, ex in zip(pal["rows"] + direct["rows"], examples + examples):
        row["where"] = ex.where
    return {"model": loaded.name, "data": str(path), "n": len(examples), "shots": len(shots),
            "pal_accuracy": pal["accuracy"], "direct_accuracy": direct["accuracy"], "pal": pal, "direct": direct}


# -- calculator annotations -> programs ---------------------------------------------------------------
class AnnotationError(ValueError):
    """An answer that cannot become a program; `reason` is a short key for counting."""

    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_OPS = {ast.Add: lambda a, b: a + b, ast.Sub: lambda a, b: a - b, ast.Mult: lambda a, b: a * b,
        ast.Div: lambda a, b: a / b, ast.FloorDiv: lambda a, b: a // b, ast.Mod: lambda a, b: a % b,
        ast.Pow: lambda a, b: a ** b if abs(b) <= 64 else math.inf}


def _arith(node, env: dict[str, float]) -> float:
    """The value of an arithmetic expression tree: numbers, earlier steps, + - * / // % ** and signs."""
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return node.value
    if isinstance(node, ast.Name) and node.id in env:
        return env[node.id]
    if isinstance(node, ast.BinOp) and type(node.op) in _OPS:
        return _OPS[type(node.op)](_arith(node.left, env), _arith(node.right, env))
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        value = _arith(node.operand, env)
        return -value if isinstance(node.op, ast.USub) else value
    raise AnnotationError("bad_expression", f"not plain arithmetic: {ast.unparse(node)!r}")


@dataclass
class _Step:
    name: str
    code: str
    value: float
    stated: float | None  # the result written after `=` in the annotation


class _ReuseSteps(ast.NodeTransformer):
    """A number equal to an earlier step's result (as computed and as written) becomes that step's
    variable, the latest first: the program then shows how the quantities depend on each other."""

    def __init__(self, steps: list[_Step]):
        self.steps = steps

    def visit_Constant(self, node):
        earlier = next((s for s in reversed(self.steps) if s.stated is not None and s.stated == node.value
                        and math.isclose(s.value, s.stated)), None)
        return ast.Name(earlier.name, ast.Load()) if earlier else node


def _annotation_steps(answer_text: str) -> tuple[list[str], list[_Step]]:
    """(program lines, steps) for an answer's annotations, in order; comments carry the prose."""
    lines: list[str] = []
    steps: list[_Step] = []
    for text in answer_text.split("####")[0].splitlines():
        found = _ANNOTATION.findall(text)
        if not found:
            continue
        prose = _ANNOTATION.sub("", text).strip()
        if prose:
            lines.append(f"# {prose}")
        for annotation in found:
            expr, _, stated_text = annotation.rpartition("=")
            try:
                tree = ast.parse(expr.strip(), mode="eval").body
            except SyntaxError:
                raise AnnotationError("bad_expression", f"annotation <<{annotation}>> is not Python") from None
            stated = parse_number(stated_text)
            tree = _ReuseSteps(steps).visit(tree)
            try:
                value = _arith(tree, {s.name: s.value for s in steps})
            except (ZeroDivisionError, OverflowError) as exc:
                raise AnnotationError("bad_expression", f"annotation <<{annotation}>>: {exc}") from None
            step = _Step(f"step{len(steps) + 1}", ast.unparse(tree), value, stated)
            steps.append(step)
            lines.append(f"{step.name} = {step.code}")
    return lines, steps


def annotation_to_program(answer_text: str) -> str:
    """A runnable program from a GSM8K solution: one `stepN = <expression>` per calculator annotation
    (prose kept as comments), printing the last step. Raises AnnotationError without annotations."""
    lines, steps = _annotation_steps(answer_text)
    if not steps:
        raise AnnotationError("no_annotations", "the answer has no calculator annotations <<...>>")
    return "\n".join(lines + [f"print({steps[-1].name})"]) + "\n"


def _printed(program: str) -> str:
    """What an annotation program prints, run in this process: annotation_to_program emits only
    assignments of arithmetic it has parsed and checked, comments and one print, so no sandbox is
    needed (and 7,473 programs run in a second instead of minutes)."""
    out: list[str] = []
    exec(compile(program, "<annotation>", "exec"),  # noqa: S102 (checked arithmetic only, see above)
         {"__builtins__": {"print": lambda *a: out.append(" ".join(map(str, a)))}})
    return "\n".join(out)


def annotation_program_report(examples: list[GSM8KExample], *, use_sandbox: bool = False) -> dict:
    """How many annotation programs print the gold answer, and why the others do not:
    no_annotations; bad_expression; answer_is_earlier_step (the last annotation is not the answer but
    an earlier one is); rounding (the answer is the last result rounded, e.g. 7.5 buses -> 8);
    final_step_not_annotated (the last computation is only in the prose, e.g. `20/4 = $5`)."""

    reasons: Counter = Counter()
    failures: list[dict] = []
    for ex in examples:
        try:
            program = annotation_to_program(ex.answer)
            steps = _annotation_steps(ex.answer)[1]
        except AnnotationError as exc:
            reasons[exc.reason] += 1
            failures.append({"where": ex.where, "reason": exc.reason, "detail": str(exc)})
            continue
        printed = run_program(program).answer if use_sandbox else _printed(program)
        if numbers_match(parse_number(printed), ex.gold):
            reasons["ok"] += 1
            continue
        if any(numbers_match(s.value, ex.gold) for s in steps):
            reason = "answer_is_earlier_step"
        elif any(numbers_match(f(steps[-1].value), ex.gold) for f in (round, math.floor, math.ceil)):
            reason = "rounding"
        else:
            reason = "final_step_not_annotated"
        reasons[reason] += 1
        failures.append({"where": ex.where, "reason": reason, "printed": printed, "gold": ex.gold})
    n = len(examples)
    return {"n": n, "ok": reasons["ok"], "share_ok": reasons["ok"] / n if n else 0.0,
            "reasons": dict(reasons), "failures": failures}


def pal_training_rows(examples: list[GSM8KExample]) -> list[dict]:
    """Fine-tuning pairs for PAL from the rows whose annotation program prints the gold answer: the
    prompt is the zero-shot PAL prompt, the target the program and its closing fence."""
    rows = []
    for ex in examples:
        try:
            program = annotation_to_program(ex.answer)
        except AnnotationError:
            continue
        if numbers_match(parse_number(_printed(program)), ex.gold):
            rows.append({"prompt": pal_prompt(ex.question, shots=()), "target": program + "```",
                         "where": ex.where})
    return rows
