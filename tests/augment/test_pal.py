"""PAL: prompts, program extraction, number parsing, GSM8K loading, annotation programs, and PAL vs
direct accuracy computed by hand on a fake model; the real-data checks are marked `data`."""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmcycle.augment import pal
from llmcycle.core.errors import UserError
from llmcycle.augment.sandbox import run_program

GSM8K = Path(__file__).resolve().parents[3] / "shared" / "data" / "gsm8k" / "train.jsonl"
posix_only = pytest.mark.skipif(sys.platform == "win32", reason="the sandbox needs POSIX rlimits")

NATALIA = ("Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n"
           "Natalia sold 48+24 = <<48+24=72>>72 clips altogether in April and May.\n#### 72")


def test_prompts_hold_the_shots_and_end_where_the_model_continues():
    p = pal.pal_prompt("  How many?  ")
    assert p.startswith(pal.PAL_INSTRUCTION)
    assert all(f"Question: {s.question}\n```python\n{s.program}\n```\n" in p for s in pal.DEFAULT_SHOTS)
    assert p.endswith("Question: How many?\n```python\n")
    d = pal.direct_prompt("How many?", pal.DEFAULT_SHOTS[:1])
    assert d == (f"{pal.DIRECT_INSTRUCTION}\n\nQuestion: {pal.DEFAULT_SHOTS[0].question}\nAnswer: 8\n\n"
                 "Question: How many?\nAnswer:")
    assert pal.pal_prompt("Q?", shots=()) == f"{pal.PAL_INSTRUCTION}\n\nQuestion: Q?\n```python\n"


@posix_only
def test_every_shot_program_prints_its_answer():
    for shot in pal.DEFAULT_SHOTS:
        res = run_program(shot.program)
        assert res.ok, res
        assert pal.parse_number(res.answer) == shot.answer


@pytest.mark.parametrize("output,program", [
    ("x = 1\nprint(x)\n```\n\nQuestion: next", "x = 1\nprint(x)"),  # continues the prompt's open fence
    ("Here it is:\n```python\nprint(2)\n```\nDone.", "print(2)"),
    ("```py\nprint(3)", "print(3)"),  # unterminated
    ("```\nprint(4)\n```", "print(4)"),
    ("print(5)\nQuestion: what next?", "print(5)"),
    ("print(6)", "print(6)"),
])
def test_extract_program(output, program):
    assert pal.extract_program(output) == program


@pytest.mark.parametrize("text,number", [
    ("72", 72.0), ("The answer is 1,234.", 1234.0), ("$5.50", 5.5), ("-3", -3.0), ("10.000000000000002", 10.0),
    ("1/2", 0.5), ("-3/4", -0.75), ("costs 12 then 15", 15.0), ("1e+20", 1e20), ("0.25", 0.25), (".5", 0.5),
    ("three", None), ("", None), (None, None), ("1/0", None),
])
def test_parse_number(text, number):
    if number is None:
        assert pal.parse_number(text) is None
    else:
        assert pal.parse_number(text) == pytest.approx(number)


def test_numbers_match_with_small_tolerance():
    assert pal.numbers_match(10.000000000000002, 10) and pal.numbers_match(72.0, 72)
    assert not pal.numbers_match(72.01, 72) and not pal.numbers_match(None, 72)


def test_gsm8k_gold_and_loading(tmp_path):
    assert pal.gsm8k_gold("so\n#### 1,234") == 1234.0
    assert pal.gsm8k_gold(NATALIA) == 72.0
    with pytest.raises(UserError, match="no `#### <number>`"):
        pal.gsm8k_gold("no answer line")
    path = tmp_path / "g.jsonl"
    rows = [{"question": f"q{i}", "answer": f"a\n#### {i}"} for i in range(3)]
    path.write_text("\n".join(json.dumps(r) for r in rows) + "\n")
    loaded = pal.load_gsm8k(path, limit=2)
    assert [(e.question, e.gold, e.where) for e in loaded] == [("q0", 0.0, f"{path}:1"), ("q1", 1.0, f"{path}:2")]
    assert len(pal.load_gsm8k(path)) == 3
    path.write_text(json.dumps(rows[0]) + "\n" + json.dumps({"question": "q"}) + "\n")
    with pytest.raises(UserError, match=r"g\.jsonl:2: not a GSM8K record"):
        pal.load_gsm8k(path)
    with pytest.raises(UserError, match="not found"):
        pal.load_gsm8k(tmp_path / "missing.jsonl")


@posix_only
def test_annotation_to_program_chains_steps_and_runs_in_the_sandbox():
    program = pal.annotation_to_program(NATALIA)
    assert program == ("# Natalia sold 48/2 = 24 clips in May.\nstep1 = 48 / 2\n"
                       "# Natalia sold 48+24 = 72 clips altogether in April and May.\nstep2 = 48 + step1\n"
                       "print(step2)\n")
    res = run_program(program)
    assert res.ok and pal.parse_number(res.answer) == 72
    # two annotations on one line; a stated result that disagrees with its expression is not reused
    text = "Cost: <<12/60=0.2>>0.2 and <<0.2*50=10>>10.\nBad <<10/3=3.3>>3.3 so <<3.3*3=9.9>>9.9\n#### 9.9"
    program = pal.annotation_to_program(text)
    assert "step2 = step1 * 50" in program and "step4 = 3.3 * 3" in program
    assert pal.parse_number(run_program(program).answer) == pytest.approx(9.9)


def test_annotation_to_program_refuses_what_it_cannot_convert():
    with pytest.raises(pal.AnnotationError) as err:
        pal.annotation_to_program("She has 5 apples.\n#### 5")
    assert err.value.reason == "no_annotations"
    with pytest.raises(pal.AnnotationError) as err:
        pal.annotation_to_program("x <<2^^3=8>>8\n#### 8")
    assert err.value.reason == "bad_expression"
    with pytest.raises(pal.AnnotationError) as err:
        pal.annotation_to_program("x <<len('abc')=3>>3\n#### 3")  # only arithmetic is ever emitted
    assert err.value.reason == "bad_expression"


def _example(answer: str) -> pal.GSM8KExample:
    return pal.GSM8KExample("q", answer, pal.gsm8k_gold(answer), "hand")


def test_annotation_report_counts_each_reason():
    examples = [_example(a) for a in (
        NATALIA,                                                     # ok
        "5 apples\n#### 5",                                          # no_annotations
        "<<35+20=55>>55 spent, so 75-55 = <<75-55=20>>20; 20/4 = 5\n#### 5",  # final_step_not_annotated
        "<<120/16=7.5>>7.5 buses, so 8\n#### 8",                     # rounding
        "<<12*4=48>>48 then <<48/12=4>>4\n#### 48",                  # answer_is_earlier_step
    )]
    report = pal.annotation_program_report(examples)
    assert (report["n"], report["ok"], report["share_ok"]) == (5, 1, 0.2)
    assert report["reasons"] == {"ok": 1, "no_annotations": 1, "final_step_not_annotated": 1, "rounding": 1,
                                 "answer_is_earlier_step": 1}
    rows = pal.pal_training_rows(examples)
    assert len(rows) == 1 and rows[0]["target"] == pal.annotation_to_program(NATALIA) + "```"
    assert rows[0]["prompt"] == pal.pal_prompt("q", shots=())


QUESTIONS = [f"question {i}?" for i in range(6)]
GOLDS = [72, 10, 5, 8, 3, 4]
PAL_OUTPUTS = [
    "```python\nclips_may = 48 / 2\nprint(48 + clips_may)\n```",     # 72.0: right
    "earned = 12 / 60 * 50\nprint(earned)\n```\n\nQuestion: more",  # 10.0: right (continuation style)
    "print(100 - 50 - 30 - 10)",                                     # 10: wrong (gold 5)
    "import os\nos.system('echo pwned')\nprint(8)",                  # would be right, but forbidden
    "print(1 / 0)",                                                  # error
    "print(",                                                        # syntax
]
DIRECT_OUTPUTS = [" 72", " The answer is 10.", " 6", " 8 muffins", " three", " 4.0\nQuestion: what is 7?"]


def fake_model(outputs_by_question: dict[str, str], seen: list):
    def generate(prompts):
        seen.extend(prompts)
        return [next(o for q, o in outputs_by_question.items() if p.endswith(f"Question: {q}\n```python\n")
                     or p.endswith(f"Question: {q}\nAnswer:")) for p in prompts]
    return generate


@posix_only
def test_pal_and_direct_accuracy_by_hand():
    seen: list[str] = []
    result = pal.evaluate_pal(fake_model(dict(zip(QUESTIONS, PAL_OUTPUTS)), seen), QUESTIONS, GOLDS)
    assert seen == [pal.pal_prompt(q) for q in QUESTIONS]
    assert (result["n"], result["correct"], result["accuracy"]) == (6, 2, 2 / 6)
    assert result["executed"] == 3 and result["answered"] == 3
    assert result["failures"] == {"forbidden": 1, "error": 1, "syntax": 1}
    rows = result["rows"]
    assert [r["correct"] for r in rows] == [True, True, False, False, False, False]
    assert [r["prediction"] for r in rows] == [72.0, 10.0, 10.0, None, None, None]
    assert rows[1]["program"] == "earned = 12 / 60 * 50\nprint(earned)"
    assert rows[3]["error"] == "forbidden import 'os' (line 1)"
    assert rows[4]["error"] == "ZeroDivisionError: division by zero (line 1)"

    seen.clear()
    direct = pal.evaluate_direct(fake_model(dict(zip(QUESTIONS, DIRECT_OUTPUTS)), seen), QUESTIONS, GOLDS)
    assert seen == [pal.direct_prompt(q) for q in QUESTIONS]
    assert [r["prediction"] for r in direct["rows"]] == [72.0, 10.0, 6.0, 8.0, None, 4.0]
    assert (direct["correct"], direct["accuracy"], direct["answered"]) == (4, 4 / 6, 5)


def test_evaluation_input_errors():
    with pytest.raises(UserError, match="no questions"):
        pal.evaluate_direct(lambda p: [], [], [])
    with pytest.raises(UserError, match="2 questions but 1 gold"):
        pal.evaluate_direct(lambda p: ["1"] * len(p), ["a", "b"], [1])
    with pytest.raises(UserError, match="returned 1 completions for 2 prompts"):
        pal.evaluate_direct(lambda p: ["1"], ["a", "b"], [1, 2])


@posix_only
@pytest.mark.slow
def test_evaluate_model_on_gsm8k_wires_a_real_generator(tmp_path):
    from tiny import make_gpt2

    from llmcycle.evaluation import harness

    data = tmp_path / "gsm8k.jsonl"
    data.write_text("".join(json.dumps({"question": q, "answer": f"x\n#### {g}"}) + "\n"
                            for q, g in zip(QUESTIONS[:3], GOLDS)))
    loaded = harness.load(str(make_gpt2(tmp_path / "m", n_positions=1024)), device="cpu")
    report = pal.evaluate_model_on_gsm8k(loaded, data, limit=2, shots=pal.DEFAULT_SHOTS[:1], max_new_tokens=12,
                                         direct_max_new_tokens=4, sandbox={"timeout_s": 10, "cpu_s": 2})
    assert (report["n"], report["shots"], report["pal"]["n"], report["direct"]["n"]) == (2, 1, 2, 2)
    for method in ("pal", "direct"):
        rows = report[method]["rows"]
        assert report[f"{method}_accuracy"] == sum(r["correct"] for r in rows) / 2
        assert [r["where"] for r in rows] == [f"{data}:1", f"{data}:2"]
    for row in report["pal"]["rows"]:
        assert "```" not in row["output"]  # the stop string ended generation at the closing fence
        assert row["program"] == pal.extract_program(row["output"])
    assert all("\n" not in r["output"] for r in report["direct"]["rows"])


@pytest.mark.data
def test_annotation_programs_on_real_gsm8k_rows():
    if not GSM8K.exists():
        pytest.skip(f"{GSM8K} is absent (the shared data folder is not next to this checkout)")
    examples = pal.load_gsm8k(GSM8K)
    report = pal.annotation_program_report(examples)
    # Measured once on the full train split (7,473 rows); the reasons are explained in the module.
    assert (report["n"], report["ok"]) == (7473, 7001)
    assert report["reasons"] == {"ok": 7001, "final_step_not_annotated": 360, "no_annotations": 95,
                                 "answer_is_earlier_step": 13, "rounding": 4}
    # the in-process check agrees with the sandbox on real rows
    sample = examples[:8]
    assert pal.annotation_program_report(sample, use_sandbox=True)["reasons"] == \
        pal.annotation_program_report(sample)["reasons"]


def test_pal_command_records_pal_and_direct_accuracy(tmp_path, capsys):
    """`llmcycle pal` end to end on a tiny model: a run with both accuracies and every row."""
    import json as _json

    from llmcycle.cli import main
    from tiny import make_gpt2

    make_gpt2(tmp_path / "m", n_positions=1024)
    rows = [{"question": "What is 2 plus 3?", "answer": "2+3=<<2+3=5>>5\n#### 5"},
            {"question": "What is 4 times 6?", "answer": "4*6=<<4*6=24>>24\n#### 24"}]
    (tmp_path / "g.jsonl").write_text("".join(_json.dumps(r) + "\n" for r in rows))
    (tmp_path / "llmcycle.yaml").write_text("project: {name: p, task: qa}\nmodel: {name: m}\n")
    assert main(["pal", "--data", str(tmp_path / "g.jsonl"), "--shots", "0", "--max-new-tokens", "8",
                 "-p", str(tmp_path / "llmcycle.yaml"), "--json"]) == 0
    out = _json.loads(capsys.readouterr().out)
    assert out["n"] == 2 and out["pal_n"] == 2 and out["direct_n"] == 2
    assert 0 <= out["pal_accuracy"] <= 1 and 0 <= out["direct_accuracy"] <= 1
    run_dir = next((tmp_path / "runs").glob("augment-pal-*"))
    assert len((run_dir / "artifacts" / "gsm8k_rows.jsonl").read_text().splitlines()) == 4
    assert main(["pal", "--data", str(tmp_path / "nope.jsonl"), "--model", "m"]) == 2
