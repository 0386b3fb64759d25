"""Choosing the run to deploy (llmcycle/evaluation/success.py): the best success metric within the scope's budgets."""
import pytest

from llmcycle.project.config import load_project
from llmcycle.evaluation.success import best_run
from llmcycle.core.errors import UserError


def make(tmp_path, scope: str = ""):
    tmp_path.mkdir(parents=True, exist_ok=True)
    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: summarization}\n" + scope)
    return load_project(tmp_path / "llmcycle.yaml")


def record(project, stage, variant, summary, model_bytes=1000):
    with project.store().start(stage, variant, {}, project_dir=project.dir) as run:
        model = run.artifacts / "model"
        model.mkdir(parents=True)
        (model / "config.json").write_text("{}")
        (model / "model.safetensors").write_bytes(b"\0" * model_bytes)
        run.finish(summary)
    return run.id


def test_best_is_the_highest_headline(tmp_path):
    project = make(tmp_path)
    record(project, "tune", "full", {"rougeL": 0.50})
    best = record(project, "tune", "lora", {"rougeL": 0.61})
    with project.store().start("eval", "x", {}, project_dir=project.dir) as run:  # no model folder
        run.finish({"rougeL": 0.9})
    choice = best_run(project)
    assert choice["run"] == best and choice["value"] == 0.61 and choice["excluded"] == []


def test_budgets_rule_out_too_big_or_too_slow_runs(tmp_path):
    project = make(tmp_path, "scope: {success_metric: rougeL, size_budget_mb: 1, latency_budget_ms: 100}\n")
    record(project, "tune", "big", {"rougeL": 0.9}, model_bytes=2 * 2**20)
    record(project, "optimize", "slow", {"rougeL": 0.8, "latency_p95_ms": 250.0})
    fits = record(project, "optimize", "int8", {"rougeL": 0.7, "latency_p95_ms": 40.0})
    choice = best_run(project)
    assert choice["run"] == fits and choice["latency_measured"]
    assert [e["variant"] for e in choice["excluded"]] == ["big", "slow"]
    assert "> budget 1 MB" in choice["excluded"][0]["why"] and "250 ms > budget 100 ms" in choice["excluded"][1]["why"]


def test_lower_is_better_metric_and_errors(tmp_path):
    project = make(tmp_path, "scope: {success_metric: perplexity, size_budget_mb: 0.0001}\n")
    with pytest.raises(UserError, match="nothing to choose 'best' from"):
        best_run(project)
    record(project, "tune", "a", {"perplexity": 12.0})
    with pytest.raises(UserError, match="no run fits the scope's budgets: tune/a"):
        best_run(project)
    project = make(tmp_path / "p2", "scope: {success_metric: perplexity}\n")
    record(project, "tune", "a", {"perplexity": 12.0})
    low = record(project, "tune", "b", {"perplexity": 8.0})
    assert best_run(project)["run"] == low
    with pytest.raises(UserError, match="unknown metric 'rogueL'"):
        best_run(make(tmp_path / "p3", "scope: {success_metric: rogueL}\n"))


def test_serve_best_without_runs_is_one_line_error(tmp_path, capsys):
    from llmcycle.cli import main

    make(tmp_path)
    assert main(["serve", "--run", "best", "-p", str(tmp_path / "llmcycle.yaml")]) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: no completed run with a model") and "\n" not in err


def test_vllm_backend_hands_the_model_folder_to_vllms_own_server():
    from llmcycle.serve.app import vllm_command

    cmd = vllm_command("/m/model", host="0.0.0.0", port=9000, api_key="k", model_name="tune/lora")
    assert cmd[1:] == ["-m", "vllm.entrypoints.openai.api_server", "--model", "/m/model", "--host", "0.0.0.0",
                       "--port", "9000", "--served-model-name", "tune/lora", "--api-key", "k"]


def test_vllm_backend_without_vllm_or_gpu_is_refused(capsys):
    import importlib.util

    import torch

    from llmcycle.cli import main

    if importlib.util.find_spec("vllm") and torch.cuda.is_available():
        pytest.skip("vLLM and a GPU are present: the refusal cannot be shown here")
    assert main(["serve", "--backend", "vllm", "--run", "x"]) == 2
    assert "backend 'vllm' needs" in capsys.readouterr().err


# -- unmeasured figures are unknown, never "fits" ------------------------------------------------------
def test_budget_check_has_three_states_and_an_unset_budget_asks_for_nothing():
    from llmcycle.evaluation.success import budget_check
    from llmcycle.stages.scope import ScopeConfig

    both = ScopeConfig(size_budget_mb=10, latency_budget_ms=100)
    assert budget_check(both, 5.0, 80.0) == {"state": "fits", "reasons": [], "missing": []}
    assert budget_check(both, 5.0, None) == {"state": "unknown", "reasons": [], "missing": ["p95 latency"]}
    assert budget_check(both, None, None)["missing"] == ["size", "p95 latency"]
    broken = budget_check(both, 12.0, None)  # one broken budget is enough, whatever is unknown
    assert broken["state"] == "breaks" and broken["reasons"] == ["size 12.0 MB > budget 10 MB"]
    assert broken["missing"] == ["p95 latency"]
    size_only = ScopeConfig(size_budget_mb=10)  # no latency budget: an untimed run fits
    assert budget_check(size_only, 5.0, None)["state"] == "fits"
    assert budget_check(None, None, None)["state"] == "fits"


def test_an_untimed_run_is_passed_over_unless_allow_unmeasured(tmp_path):
    project = make(tmp_path, "scope: {success_metric: rougeL, latency_budget_ms: 100}\n")
    untimed = record(project, "tune", "full", {"rougeL": 0.9})  # better, but never timed
    timed = record(project, "optimize", "int8", {"rougeL": 0.7, "latency_p95_ms": 40.0})
    choice = best_run(project)
    assert choice["run"] == timed and choice["budget"]["state"] == "fits"
    [skipped] = choice["excluded"]
    assert skipped["run"] == untimed and skipped["budget"] == {"state": "unknown", "reasons": [],
                                                              "missing": ["p95 latency"]}
    assert "unknown: p95 latency not measured (scope.latency_budget_ms set; --allow-unmeasured" in skipped["why"]
    allowed = best_run(project, allow_unmeasured=True)
    assert allowed["run"] == untimed and allowed["budget"]["state"] == "unknown" and not allowed["latency_measured"]
    # without a latency budget the latency is irrelevant: the untimed run fits and is chosen
    assert best_run(make(tmp_path, "scope: {success_metric: rougeL}\n"))["budget"]["state"] == "fits"


def test_when_only_unmeasured_runs_could_fit_the_error_says_so_and_names_the_flag(tmp_path):
    project = make(tmp_path, "scope: {success_metric: rougeL, latency_budget_ms: 100}\n")
    record(project, "tune", "full", {"rougeL": 0.9})
    record(project, "optimize", "slow", {"rougeL": 0.8, "latency_p95_ms": 250.0})
    with pytest.raises(UserError) as err:
        best_run(project)
    message = str(err.value)
    assert message.startswith("no measured run fits the scope's budgets; only runs that were not measured might: "
                              "tune/full")
    assert "optimize/slow" not in message and "--allow-unmeasured" in message
    assert "unset scope.latency_budget_ms" in message and "\n" not in message


def test_an_adapter_whose_base_is_on_no_local_disk_has_an_unknown_size(tmp_path):
    import json

    project = make(tmp_path, "scope: {success_metric: rougeL, size_budget_mb: 100}\n")
    with project.store().start("tune", "lora", {}, project_dir=project.dir) as run:
        model = run.artifacts / "model"
        model.mkdir(parents=True)
        (model / "adapter_config.json").write_text(json.dumps({"base_model_name_or_path": "nobody/not-cached"}))
        (model / "llmcycle_base.json").write_text(json.dumps({"base_path": "nobody/not-cached"}))
        (model / "adapter_model.safetensors").write_bytes(b"\0" * 1000)
        run.finish({"rougeL": 0.9})
    with pytest.raises(UserError, match=r"tune/lora \(.*\): unknown: size not measured.*scope.size_budget_mb"):
        best_run(project)
    choice = best_run(project, allow_unmeasured=True)
    assert choice["size_mb"] is None and choice["budget"]["missing"] == ["size"]


def test_serve_best_cli_passes_over_untimed_runs_and_says_why(tmp_path, capsys, monkeypatch):
    import json

    import llmcycle.serve.app as serve_app
    from llmcycle.cli import main

    served = []
    monkeypatch.setattr(serve_app, "serve", lambda ref, *a, **k: served.append(ref))
    project = make(tmp_path, "scope: {success_metric: rougeL, latency_budget_ms: 100}\n")
    untimed = record(project, "tune", "full", {"rougeL": 0.9})
    path = str(tmp_path / "llmcycle.yaml")
    assert main(["serve", "--run", "best", "-p", path]) == 2
    err = capsys.readouterr().err.strip()
    assert "only runs that were not measured might" in err and "--allow-unmeasured" in err and "\n" not in err
    assert main(["serve", "--run", "best", "--allow-unmeasured", "-p", path]) == 0
    printed = capsys.readouterr().out
    assert f"best: tune/full ({untimed})" in printed and "latency not measured" in printed
    assert "budgets unknown: p95 latency not measured, chosen because of --allow-unmeasured" in printed
    timed = record(project, "optimize", "int8", {"rougeL": 0.7, "latency_p95_ms": 40.0})
    assert main(["serve", "--run", "best", "--json", "-p", path]) == 0
    best = json.loads(capsys.readouterr().out)["best"]
    assert best["run"] == timed and best["budget"]["state"] == "fits"
    assert best["excluded"][0]["budget"] == {"state": "unknown", "reasons": [], "missing": ["p95 latency"]}
    assert served == [untimed, timed]


def predictions(project, run_id, scores):
    """predictions.jsonl for a recorded run: one row per example with its rougeL."""
    import json

    from llmcycle.evaluation.harness import PREDICTIONS

    rows = [{"index": i, "where": f"eval.jsonl:{i + 1}", "input": f"d {i}", "references": [f"r {i}"],
             "prediction": f"o {i}", "rougeL": s} for i, s in enumerate(scores)]
    path = project.store().get(run_id).artifacts / PREDICTIONS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))


def gated(tmp_path, extra: str = ""):
    project = make(tmp_path, "scope: {success_metric: rougeL, require_significant_gain: true" + extra + "}\n")
    with project.store().start("prompt", "zero", {}, project_dir=project.dir) as run:  # the prompt baseline
        run.finish({"rougeL": 0.3, "headline": "rougeL"})
    predictions(project, run.id, [0.3] * 20)
    return project


def test_require_significant_gain_passes_over_a_run_within_noise_of_the_prompt_baseline(tmp_path):
    from llmcycle.report.build import build
    from llmcycle.report.render import render_md

    project = gated(tmp_path)
    noise = record(project, "tune", "noise", {"rougeL": 0.31, "headline": "rougeL"})  # +0.01 on 2 of 20 examples
    predictions(project, noise, [0.3] * 18 + [0.4, 0.4])
    real = record(project, "tune", "real", {"rougeL": 0.305, "headline": "rougeL"})
    predictions(project, real, [0.305] * 20)  # +0.005 on every example: small but certain
    choice = best_run(project)
    assert choice["run"] == real and choice["gate"]["state"] == "passes"
    assert "significantly better than the best prompt-only run prompt/zero" in choice["gate"]["why"]
    (skipped,) = choice["excluded"]
    assert skipped["run"] == noise and "not significantly better than the best prompt-only run" in skipped["why"]
    assert "(scope.require_significant_gain)" in skipped["why"]
    view = build(project)
    success = {r["variant"]: r["success"] for r in view["rows"]}
    assert success["noise"] is False and success["real"] is True
    text = render_md(view, "files")
    assert "not significantly better than the best prompt-only run" in text
    assert "beating the best prompt-only run significantly" in text


def test_require_significant_gain_without_a_prompt_run_is_unknown_never_a_pass(tmp_path):
    project = make(tmp_path, "scope: {success_metric: rougeL, require_significant_gain: true}\n")
    tuned = record(project, "tune", "full", {"rougeL": 0.9, "headline": "rougeL"})
    predictions(project, tuned, [0.9] * 5)
    with pytest.raises(UserError, match="beats the best prompt-only run significantly .*no prompt-only baseline run"):
        best_run(project, allow_unmeasured=True)  # --allow-unmeasured is about budgets, not a gain
