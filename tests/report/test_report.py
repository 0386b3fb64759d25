"""`llmcycle report` (llmcycle/report/build.py): built from run records fabricated in code, no model trained."""
import base64
import io
import json
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest
from PIL import Image

from llmcycle.cli import main
from llmcycle.project.config import load_project
from llmcycle.evaluation.harness import write_predictions
from llmcycle.report.build import ci_from_predictions, write_report

SCOPE = "scope: {success_metric: rougeL, success_threshold: 0.3, size_budget_mb: 1.5, latency_budget_ms: 100}\n"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def make(tmp_path, scope: str = SCOPE):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "llmcycle.yaml").write_text("project: {name: rep, task: summarization}\n" + scope)
    return load_project(tmp_path / "llmcycle.yaml")


def predictions(scores, name="rougeL"):
    return [{"index": i, "where": f"eval.jsonl:{i + 1}", "input": f"dialogue {i}", "references": [f"ref {i}"],
             "prediction": f"output {i}", name: s} for i, s in enumerate(scores)]


def record(project, stage, variant, summary, *, parent=None, metrics=(), preds=None, model_mb=None, config=None):
    with project.store().start(stage, variant, config or {}, parent=parent, project_dir=project.dir) as run:
        for row in metrics:
            run.log(row)
        if preds is not None:
            write_predictions(run, preds)
        if model_mb is not None:
            model = run.artifacts / "model"
            model.mkdir(parents=True)
            (model / "config.json").write_text("{}")
            (model / "model.safetensors").write_bytes(b"\0" * int(model_mb * 2**20))
            summary = {**summary, "model_dir": str(model)}
        run.finish(summary)
    return run.id


def evaluated(value, low=None, high=None, **extra):
    return {"rougeL": value, "headline": "rougeL", "headline_value": value, "headline_ci_low": low,
            "headline_ci_high": high, **extra}


def lifecycle_store(tmp_path):
    """pretrain -> prompt variant, pretrain -> tune/lora -> optimize/int8, with loss logs and no PPO."""
    project = make(tmp_path)
    base = record(project, "pretrain", "tiny", {"final_loss": 3.1},
                  metrics=[{"step": s, "loss": 6.0 - s / 10} for s in (10, 20, 30)], model_mb=1.0)
    record(project, "prompt", "course.0shot", evaluated(0.123, 0.100, 0.150), parent=base,
           preds=predictions([0.1, 0.2, 0.07]))
    tuned = record(project, "tune", "lora",
                   evaluated(0.456, 0.400, 0.500, trainable_pct=12.5, peak_memory_mb=321.0), parent=base,
                   preds=predictions([0.5, 0.4, 0.468]), model_mb=2.0,
                   metrics=[{"step": 5, "loss": 2.0}, {"step": 10, "loss": 1.5}, {"step": 10, "val_loss": 1.7}])
    record(project, "optimize", "int8", evaluated(0.350, 0.300, 0.410, latency_p50_ms=12.3, latency_p95_ms=45.6),
           parent=tuned, preds=predictions([0.3, 0.4, 0.35]), model_mb=0.5)
    return project


def images(page: str) -> list[bytes]:
    return [base64.b64decode(m) for m in re.findall(r'src="data:image/png;base64,([A-Za-z0-9+/=]+)"', page)]


def test_html_has_every_variant_its_numbers_and_is_self_contained(tmp_path):
    project = lifecycle_store(tmp_path)
    result = write_report(project, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert result["runs"] == 4 and result["missing"] == []
    for label in ("pretrain/tiny", "prompt/course.0shot", "tune/lora", "optimize/int8"):
        assert label in page
    # the summaries' numbers, as recorded
    assert "rougeL 0.123 [0.100, 0.150]" in page and "rougeL 0.456 [0.400, 0.500]" in page
    assert "12.3 / 45.6" in page and ">321<" in page and ">12.50<" in page
    # scope: lora is over the 1.5 MB budget, int8 fits and reaches the 0.3 threshold, so it is deployed
    assert "✗ size 2.0 MB &gt; budget 1.5 MB" in page
    rows = [r for r in page.split("<tr>") if r.startswith("<td")]
    int8_row = next(r for r in rows if "optimize/int8" in r)
    assert "★ deployed" in int8_row and "✓ met" in int8_row and "✓ fits" in int8_row
    assert "✗ not met" in next(r for r in rows if "prompt/course.0shot" in r)
    # self-contained: nothing fetched at view time, and every embedded image is a real PNG
    assert not re.search(r"""(src|href)\s*=\s*["']?\s*(https?:)?//""", page)
    assert "<script" not in page
    pngs = images(page)
    assert len(pngs) == len(result["plots"]) >= 3
    for png in pngs:
        assert png.startswith(PNG_MAGIC)
        Image.open(io.BytesIO(png)).verify()
    assert {"loss", "quality", "quality_vs_size", "quality_vs_latency"} <= set(result["plots"])
    assert "Policy reward and KL (PPO, GRPO, RLOO): omitted — no align run logged PPO / GRPO steps" in page
    assert "output 0" in page and "ref 0" in page  # sample outputs side by side
    assert not list(tmp_path.glob(".*.tmp"))  # written atomically: no temporary file left


def test_lineage_nests_runs_under_their_parents_down_to_the_deployed_one(tmp_path):
    project = lifecycle_store(tmp_path)
    write_report(project, tmp_path / "r.md")
    lines = [x for x in (tmp_path / "r.md").read_text().splitlines() if x.lstrip().startswith("- ")]
    depth = {name: next(len(x) - len(x.lstrip()) for x in lines if x.lstrip().startswith(f"- {name} "))
             for name in ("pretrain/tiny", "prompt/course.0shot", "tune/lora", "optimize/int8")}
    assert depth == {"pretrain/tiny": 0, "prompt/course.0shot": 2, "tune/lora": 2, "optimize/int8": 4}
    deployed = next(i for i, x in enumerate(lines) if "→ deployed" in x)
    assert "optimize/int8" in lines[deployed - 1] and lines[deployed].startswith(" " * 6 + "- ")


def test_parent_falls_back_to_a_run_reference_in_the_config(tmp_path):
    project = make(tmp_path)
    source = record(project, "tune", "full", evaluated(0.5), model_mb=0.1)
    record(project, "optimize", "int8", evaluated(0.4), config={"source": "run:tune/full"})  # no parent recorded
    write_report(project, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert re.search(rf"- tune/full `{source}`.*\n  - optimize/int8", text)


def test_loss_plot_only_when_metrics_have_a_loss(tmp_path):
    project = make(tmp_path)
    record(project, "prompt", "a", evaluated(0.2, 0.1, 0.3), preds=predictions([0.2]))
    record(project, "tune", "full", evaluated(0.4, 0.3, 0.5), metrics=[{"step": 1, "lr": 1e-3}])  # no loss
    result = write_report(project, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert "loss" not in result["plots"] and "quality" in result["plots"]
    assert "Training and validation loss: omitted — no run logged a training loss" in page
    assert len(images(page)) == len(result["plots"])


def test_ci_recomputed_from_predictions_matches_hand_computation(tmp_path):
    # Two examples scoring 0 and 1: a resample's mean is 0 with probability 1/4, 0.5 with 1/2, 1 with 1/4,
    # so ~250 of 1000 resamples sit at each end and the 2.5% / 97.5% quantiles are exactly 0 and 1.
    assert ci_from_predictions("rougeL", predictions([0.0, 1.0])) == (0.0, 1.0)
    assert ci_from_predictions("rougeL", predictions([0.4] * 5)) == pytest.approx((0.4, 0.4))
    # the seeded percentile bootstrap, written out: resample indices with seed 0, quantiles of the means
    scores = [0.12, 0.93, 0.31, 0.55, 0.27, 0.71, 0.05, 0.64, 0.48, 0.89, 0.36, 0.18]  # distinct: seed-sensitive
    idx = np.random.default_rng(0).integers(0, len(scores), size=(1000, len(scores)))
    expected = tuple(np.quantile(np.asarray(scores)[idx].mean(axis=1), [0.025, 0.975]))
    assert ci_from_predictions("rougeL", predictions(scores)) == pytest.approx(expected)
    assert ci_from_predictions("rougeL", None) is None
    assert ci_from_predictions("rougeL", [{"prediction": "x"}]) is None  # no per-example score: no interval

    project = make(tmp_path)
    record(project, "prompt", "scored", evaluated(0.458), preds=predictions(scores))  # summary without a CI
    record(project, "prompt", "bare", evaluated(0.7))  # neither a CI nor predictions: never invented
    write_report(project, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    assert f"rougeL 0.458 [{expected[0]:.3f}, {expected[1]:.3f}]†" in page
    assert "rougeL 0.700 [CI n/a]" in page


def test_macro_f1_interval_from_labels(tmp_path):
    from llmcycle.evaluation.metrics import macro_f1_ci

    rows = [{"index": i, "where": "", "input": "", "references": [gold], "prediction": pred}
            for i, (gold, pred) in enumerate([("a", "a"), ("b", "a"), ("b", "b"), ("a", "a"), ("b", "b")])]
    assert ci_from_predictions("macro_f1", rows) == macro_f1_ci(["a", "b", "b", "a", "b"],
                                                                ["a", "a", "b", "a", "b"], seed=0)


def test_runs_with_deleted_files_show_as_missing_and_the_rest_renders(tmp_path):
    project = make(tmp_path)
    keep = record(project, "prompt", "keep", evaluated(0.321, 0.3, 0.35), preds=predictions([0.3]))
    no_summary = record(project, "prompt", "nosummary", evaluated(0.2), preds=predictions([0.2]))
    no_preds = record(project, "prompt", "nopreds", evaluated(0.25), preds=predictions([0.25]))
    gone = record(project, "tune", "gone", evaluated(0.9), model_mb=0.1)
    garbled = record(project, "prompt", "garbled", evaluated(0.3), preds=predictions([0.3]))
    store = project.store()
    (store.root / garbled / "summary.json").write_text("{half a summ")
    (store.root / no_summary / "summary.json").unlink()
    (store.root / no_preds / "artifacts" / "predictions.jsonl").unlink()
    shutil.rmtree(store.root / gone)  # still named by index.sqlite

    result = write_report(project, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    missing = {m["run"]: m["missing"] for m in result["missing"]}
    assert missing == {no_summary: ["summary.json"], no_preds: ["predictions.jsonl"], gone: ["run folder"],
                       garbled: ["summary.json (unreadable)"]}
    assert result["runs"] == 5
    for what in ("missing: summary.json", "missing: predictions.jsonl", "missing: run folder"):
        assert what in page
    assert "rougeL 0.321 [0.300, 0.350]" in page and keep[-4:] in page
    assert "tune/gone" in page and "Missing files" in page


def test_empty_store_says_so(tmp_path):
    project = make(tmp_path)
    result = write_report(project)
    page = (tmp_path / "report.html").read_text()
    assert result == {"report": str((tmp_path / "report.html").resolve()), "runs": 0, "plots": [], "missing": [],
                      "deployed": {"run": None, "why": None}}
    assert "No runs yet — run <code>llmcycle run</code>" in page
    assert not (tmp_path / "runs").exists()  # reading never creates a store


def test_markdown_writes_the_pngs_it_links(tmp_path):
    project = lifecycle_store(tmp_path)
    out = tmp_path / "out"
    out.mkdir()
    (out / "report_files").mkdir()
    (out / "report_files" / "ppo.png").write_bytes(b"stale")  # an old plot that has no data now
    result = write_report(project, out / "report.md")
    text = (out / "report.md").read_text()
    links = re.findall(r"!\[[^\]]*\]\(([^)]+)\)", text)
    assert links and sorted(links) == sorted(f"report_files/{name}.png" for name in result["plots"])
    for link in links:
        assert (out / link).read_bytes().startswith(PNG_MAGIC)
    assert not (out / "report_files" / "ppo.png").exists()
    assert "| tune/lora |" in text and "rougeL 0.456 [0.400, 0.500]" in text and "data:image" not in text


def test_cli_json_and_bad_output_paths(tmp_path, capsys):
    lifecycle_store(tmp_path)
    assert main(["report", "-p", str(tmp_path), "-o", str(tmp_path / "r.html"), "--json"]) == 0
    data = json.loads(capsys.readouterr().out)
    assert data["report"] == str((tmp_path / "r.html").resolve()) and data["runs"] == 4 and "loss" in data["plots"]
    (tmp_path / "a-file").write_text("")
    for output, message in ((tmp_path / "a-file" / "r.html", f"cannot create folder {tmp_path / 'a-file'}"),
                            (tmp_path, "it is a folder")):
        assert main(["report", "-p", str(tmp_path), "-o", str(output)]) == 2
        err = capsys.readouterr().err
        assert len(err.strip().splitlines()) == 1 and str(output) in err and message in err
    assert main(["report", "-p", str(tmp_path), "--format", "pdf"]) == 2
    assert "--format must be one of html, md" in capsys.readouterr().err
    assert main(["report", "-p", str(tmp_path / "missing")]) == 2
    assert "project file not found" in capsys.readouterr().err


def test_matplotlib_is_imported_only_when_a_report_is_made():
    code = ("import sys, llmcycle.cli, llmcycle.report.build, llmcycle.report.plots, llmcycle.report.render; "
            "assert 'matplotlib' not in sys.modules, 'imported at module load'")
    subprocess.run([sys.executable, "-c", code], check=True, timeout=120)


def test_ppo_reward_and_kl_plotted_from_align_metrics_and_kept_out_of_the_loss_plot(tmp_path):
    project = make(tmp_path)
    ppo = [{"step": s, "reward_mean": 0.1 * s, "score_mean": 0.12 * s, "kl": 0.01 * s, "policy_loss": 0.5}
           for s in range(1, 6)]
    record(project, "align", "detox", evaluated(0.3, 0.2, 0.4), metrics=ppo, preds=predictions([0.3]))
    result = write_report(project, tmp_path / "report.html")
    assert "ppo" in result["plots"] and "loss" not in result["plots"]


def test_runs_on_a_model_that_is_no_run_hang_under_that_model(tmp_path):
    project = make(tmp_path, scope="")  # no scope section: no threshold, no budgets
    record(project, "prompt", "zero", evaluated(0.1, model="google/flan-t5-small"))
    record(project, "tune", "lora", evaluated(0.2, base="google/flan-t5-small"))
    write_report(project, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert re.search(r"\n- model google/flan-t5-small\n  - prompt/zero .*\n  - tune/lora ", text)
    assert "success metric: rougeL (no threshold set) · budgets: none set" in text and "no budgets set" in text


def test_help(capsys):
    assert main(["report", "--help"]) == 0
    assert "--format" in capsys.readouterr().out


def test_success_threshold_follows_the_metric_direction():
    from llmcycle.evaluation.success import meets_threshold
    from llmcycle.stages.scope import ScopeConfig

    assert meets_threshold(ScopeConfig(success_threshold=0.5), "rougeL", 0.5) is True
    assert meets_threshold(ScopeConfig(success_threshold=0.5), "rougeL", 0.49) is False
    assert meets_threshold(ScopeConfig(success_threshold=10), "perplexity", 8.0) is True  # lower is better
    assert meets_threshold(ScopeConfig(success_threshold=10), "perplexity", 12.0) is False
    assert meets_threshold(ScopeConfig(), "rougeL", 0.9) is None and meets_threshold(None, "rougeL", 0.9) is None


def test_quality_plots_show_only_the_success_metric(tmp_path, monkeypatch):
    from llmcycle.report import plots as report_plots

    project = lifecycle_store(tmp_path)
    record(project, "align", "toxicity", {"accuracy": 0.95, "headline": "accuracy", "headline_value": 0.95})
    seen = {}
    real = report_plots.quality_bars
    monkeypatch.setattr(report_plots, "quality_bars", lambda rows, threshold: seen.setdefault("rows", rows)
                        and real(rows, threshold))
    write_report(project, tmp_path / "report.html")
    labels = [r["label"] for r in seen["rows"]]
    assert {r["headline"] for r in seen["rows"]} == {"rougeL"} and len(labels) == 3  # prompt, tune, int8
    assert "align/toxicity" in (tmp_path / "report.html").read_text()  # still in the table


def test_text_from_data_and_models_stays_text_in_both_formats(tmp_path):
    project = make(tmp_path)
    nasty = "[/INST] <script>alert(1)</script> <img src=x onerror=alert(2)> [x](javascript:y) a|b \x1b[31m"
    preds = [{"index": 0, "where": "eval.jsonl:1", "input": "Ben: " + nasty, "references": ["<b>ref</b>"],
              "prediction": "Ben paid 40 " + nasty, "rougeL": 0.5, "invented_entities": ["40"]}]
    record(project, "tune", "full", evaluated(0.5), preds=preds)
    write_report(project, tmp_path / "r.md")
    write_report(project, tmp_path / "r.html")
    for name in ("r.md", "r.html"):
        text = (tmp_path / name).read_text()
        assert "<script>" not in text and "<img src=x" not in text and "<b>ref" not in text, name
        assert "\x1b" not in text and "\u241b" in text and "&lt;script&gt;" in text, name
    md = (tmp_path / "r.md").read_text()
    assert "\\[/INST\\]" in md and "](javascript:" not in md  # shown literally by a Markdown viewer


# -- budgets are honest: unmeasured is unknown --------------------------------------------------------
def test_an_unmeasured_figure_is_unknown_in_the_budget_column_and_the_deployment(tmp_path, capsys):
    project = lifecycle_store(tmp_path)  # budgets: 1.5 MB and 100 ms
    untimed = record(project, "tune", "full", evaluated(0.9, 0.8, 0.95), model_mb=1.0,  # better, never timed
                     preds=predictions([0.9]))
    write_report(project, tmp_path / "report.html")
    page = (tmp_path / "report.html").read_text()
    rows = [r for r in page.split("<tr>") if r.startswith("<td")]
    full = next(r for r in rows if "tune/full" in r)
    assert '<td class="unknown">? unknown: p95 latency not measured</td>' in full and "fits" not in full
    assert "★ deployed" in next(r for r in rows if "optimize/int8" in r)  # the measured run, not the better one
    assert f"Passed over tune/full (<code>{untimed}</code>): unknown: p95 latency not measured" in page
    # a run over one budget breaks it, and the figure it lacks is still named
    assert "✗ size 2.0 MB &gt; budget 1.5 MB (p95 latency not measured)" in page

    assert main(["report", "-p", str(tmp_path), "-o", str(tmp_path / "r.md"), "--allow-unmeasured", "--json"]) == 0
    deployed = json.loads(capsys.readouterr().out)["deployed"]
    assert deployed["run"] == untimed
    assert deployed["budget"] == {"state": "unknown", "reasons": [], "missing": ["p95 latency"]}
    text = (tmp_path / "r.md").read_text()
    assert "budgets unknown: p95 latency not measured (chosen with --allow-unmeasured)" in text


def test_optimize_section_shows_source_before_and_result_after(tmp_path):
    project = make(tmp_path)
    tuned = record(project, "tune", "full", evaluated(0.456), model_mb=1.0)
    record(project, "optimize", "int8", evaluated(0.35, latency_p95_ms=45.6, size_mb=0.25, source="run:tune/full",
                                                  source_size_mb=1.0, source_latency_p95_ms=120.0),
           parent=tuned, model_mb=0.25)
    record(project, "optimize", "old", evaluated(0.3, latency_p95_ms=50.0, size_mb=0.3), parent=tuned, model_mb=0.3)
    write_report(project, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "## Optimization: before → after" in text
    assert ("| optimize/int8 | run:tune/full | 120.0 → 45.6 ms (0.38×) | 1.000 → 0.250 MB (0.25×) "
            "| 0.456 → 0.350 |") in text
    # a run from before sources were measured: its source figures are n/a, never invented
    assert "| optimize/old | n/a | n/a → 50.0 ms | n/a → 0.300 MB | 0.456 → 0.300 |" in text


def test_huge_and_tiny_figures_stay_narrow_in_the_report(tmp_path):
    project = make(tmp_path, scope="scope: {success_metric: perplexity}\n")
    record(project, "pretrain", "tiny", {"perplexity": 1.9e17, "headline": "perplexity", "headline_value": 1.9e17,
                                         "headline_ci_low": 1.2e17, "headline_ci_high": 2.5e17})
    write_report(project, tmp_path / "r.md")
    text = (tmp_path / "r.md").read_text()
    assert "perplexity 1.90e+17 [1.20e+17, 2.50e+17]" in text and "190,000,000" not in text


def test_report_output_folder_is_created_through_the_cli(tmp_path):
    from typer.testing import CliRunner

    from llmcycle.cli import app

    lifecycle_store(tmp_path)
    target = tmp_path / "out" / "deeper" / "report.md"
    result = CliRunner().invoke(app, ["report", "-p", str(tmp_path), "-o", str(target)])
    assert result.exit_code == 0, result.output
    assert target.is_file() and (target.parent / "report_files" / "loss.png").is_file()
    assert "| tune/lora |" in target.read_text()


def test_grpo_steps_plot_each_reward_and_a_missing_kl_is_left_out():
    from llmcycle.report import plots

    rows = [{"step": s, "reward_mean": 0.1 * s, "reward_answer_mean": 0.05 * s, "reward_fmt_mean": 0.5,
             "reward_mean_x": 1, "kl": None if s == 1 else 0.01 * s, "flat_group_share": 0.5} for s in range(1, 4)]
    assert plots._reward_keys(rows) == ["reward_answer_mean", "reward_fmt_mean"]
    assert plots._series(rows, "kl") == ([2, 3], [0.02, 0.03])
    plot = plots.ppo_curves([("align/g", "align", rows)])
    assert plot.name == "ppo" and plot.png and plot.png.startswith(b"\x89PNG")
