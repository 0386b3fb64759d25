"""The side-by-side table fits the terminal: no header or figure is cut at 80, 100 or 200 columns."""
import pytest
from rich.console import Console

from llmcycle.evaluation.compare import compare_table
from llmcycle.evaluation.runs_table import shorten, wrap_name


def row(variant, stage, value, **extra):
    return {"id": f"{stage}-{variant}-20261205-000000-{abs(hash(variant)) % 9999:04d}", "stage": stage,
            "variant": variant, "status": "completed", "headline": "rougeL", "headline_value": value,
            "headline_ci_low": value - 0.01, "headline_ci_high": value + 0.01, "n_examples": 100,
            "rouge1": value + 0.01, "rouge2": value - 0.2, "bleu": 80.5, "chrf": 91.25, "perplexity": 1.9e17,
            "len_words_mean": 12.5, "examples_per_s": 33.3, "hallucinated_entity_rate": 0.06, **extra}


ROWS = [row("course.1shot.similar.sampled-temperature-0.7", "prompt", 0.212, eval_skipped=4, too_few_examples=True),
        row("full", "tune", 0.995, delta_parent=0.783, delta_parent_sig=True, delta_baseline=0.783,
            delta_baseline_sig=True, trainable_pct=100.0, peak_memory_mb=1540.2),
        row("lora", "tune", 0.833, delta_parent=0.621, delta_parent_sig=True, delta_baseline=-0.0042),
        row("int8", "optimize", 0.996, delta_parent=0.001, size_mb=68.238, latency_p95_ms=54.1)]


def render(width, wide=False):
    table, needed = compare_table(ROWS, width, wide)
    console = Console(width=max(width, needed) if wide else width, record=True, color_system=None)
    console.print(table)
    return console.export_text(), table


@pytest.mark.parametrize("width", [80, 100, 200])
def test_no_header_or_figure_is_cut(width):
    text, table = render(width)
    assert max(len(line) for line in text.splitlines()) <= width
    assert "…" not in text or width < 200  # at 200 no name is cut
    shown = [c.header for c in table.columns]
    for title in shown:  # every header whole (it may wrap at its spaces)
        assert all(word in text for word in title.split())
    for figure in ("0.996 *", "0.995", "0.986–1.006", "100 -4 !", "+0.783*", "-0.004"):
        assert figure in text, (figure, width)
    if "halluc." in shown:
        assert "0.060" in text
    if "MB" in shown:
        assert "68.2" in text
    if "p95 ms" in shown:
        assert "54" in text
    hidden = [t for t in ("Δ parent", "Δ prompt", "halluc.", "MB", "p95 ms") if t not in shown]
    if hidden:  # whatever did not fit is named, never silently dropped
        assert "hidden at this width: " + ", ".join(hidden) in " ".join(text.split())
    else:
        assert "hidden" not in text
    assert ("hidden" in text) == (width == 80)  # at 100 every chosen column fits, names shortened


def test_wide_shows_every_figure_and_long_names_are_shortened_from_the_middle():
    text, table = render(100, wide=True)
    assert {"rouge1", "bleu", "ppl", "trainable %", "peak MB"} <= {c.header for c in table.columns}
    assert "1.90e+17" in text and "1,540.2" in text
    assert "course.1shot.similar.sampled-temperature-0.7" in text  # wide: whole names
    narrow, _ = render(80)
    lines = narrow.splitlines()
    at = next(i for i, line in enumerate(lines) if line.strip().startswith("prompt/"))
    name = lines[at].split()[0] + lines[at + 1].split()[0]  # wrapped after a separator onto a second line
    assert name.startswith("prompt/course.1shot.") and name.endswith("0.7")  # both ends kept
    assert "…" not in name or name.index("…") > len("prompt/course.1shot.")  # cut, if at all, in the middle
    assert "optimize/int8" in narrow  # a name that fits is never cut
    assert shorten("abcdefghij", 5) == "ab…ij" and shorten("abc", 5) == "abc"
    assert wrap_name("prompt/course.1shot.first.greedy", 20) == "prompt/course.1shot.\nfirst.greedy"


@pytest.mark.parametrize("width", [80, 100, 200])
def test_the_select_table_fits_and_names_what_it_leaves_out(width):
    from llmcycle.evaluation.compare import select_table

    candidates = [{"candidate": "scratch", "status": "completed", "parameters": 969_700, "size_mb": 3.7,
                   "latency_p95_ms": 56.0, "overflow_share": 0.0, "lowercases": False, "zero_shot": 0.085,
                   "probe": 0.110, "probe_ci": [0.10, 0.12]},
                  {"candidate": "minilm-warm-start-3-plus-3-layers", "status": "completed", "chosen": True,
                   "parameters": 22_800_000, "size_mb": 87.7, "latency_p95_ms": 386.0, "overflow_share": 0.02,
                   "lowercases": True, "zero_shot": 0.0, "probe": 0.556, "probe_ci": [0.50, 0.60],
                   "probe_hallucinated_entity_rate": 0.69},
                  {"candidate": "flan", "status": "failed"}]
    console = Console(width=width, record=True, color_system=None)
    console.print(select_table({"metric": "rougeL", "after_probe": True, "candidates": candidates}, width))
    text = console.export_text()
    assert max(len(line) for line in text.splitlines()) <= width
    for figure in ("0.556", "0.50–0.60", "0.110", "0.69"):
        assert figure in text
    assert "failed" in text or width < 100  # a candidate that could not be measured says so
    hidden = "hidden at this width" in " ".join(text.split())
    assert hidden if width == 80 else (not hidden if width == 200 else True)
    assert "case" in text or hidden  # a column left out is named under the table


@pytest.mark.parametrize("columns", [80, 100, 200])
def test_runs_compare_fits_the_terminal_it_prints_on(tmp_path, monkeypatch, capsys, columns):
    from llmcycle.cli import main
    from llmcycle.project.config import load_project

    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: summarization}\n")
    store = load_project(tmp_path / "llmcycle.yaml").store()
    for r in ROWS:
        with store.start(r["stage"], r["variant"], {}, project_dir=tmp_path) as run:
            run.finish({k: v for k, v in r.items() if k not in ("id", "stage", "variant", "status")})
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["runs", "compare", "-p", str(tmp_path), "--examples", "0"]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= columns
    assert "0.996 *" in text and "+0.783" in text
    assert main(["runs", "compare", "-p", str(tmp_path), "--examples", "0", "--wide"]) == 0
    wide = capsys.readouterr().out
    assert "1.90e+17" in wide and "rouge1" in wide and "hidden" not in wide


@pytest.mark.parametrize("columns", [80, 100])
def test_runs_list_keeps_ids_whole_and_fits(tmp_path, monkeypatch, capsys, columns):
    from llmcycle.cli import main
    from llmcycle.project.config import load_project

    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: summarization}\n")
    store = load_project(tmp_path / "llmcycle.yaml").store()
    ids = []
    for variant in ("course.1shot.first.greedy", "full"):
        with store.start("prompt" if "shot" in variant else "tune", variant, {}, project_dir=tmp_path) as run:
            run.finish({})
            ids.append(run.id)
    monkeypatch.setenv("COLUMNS", str(columns))
    assert main(["runs", "list", "-p", str(tmp_path)]) == 0
    text = capsys.readouterr().out
    assert max(len(line) for line in text.splitlines()) <= columns
    assert all(i in text for i in ids) and "completed" in text  # ids whole, to be copied
    flat = " ".join(text.split())
    assert "parent" not in flat  # no run has one: no column, nothing hidden
    assert "hidden at this width: " in flat and "stage, variant" in flat  # what did not fit is named
