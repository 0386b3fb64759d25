"""The CLI end to end: help, init, exit codes, one-line errors, --json, `run` skipping unchanged stages."""
import json
import subprocess
import sys

import pytest
from tiny import make_t5

from llmcycle.cli import main

COMMANDS = [[], ["init"], ["scope"], ["pretrain"], ["eval"], ["prompt"], ["run"], ["runs"], ["runs", "list"],
            ["runs", "show"], ["runs", "compare"]]


@pytest.mark.parametrize("cmd", COMMANDS)
def test_help_on_every_command(cmd, capsys):
    assert main(cmd + ["--help"]) == 0
    assert "Usage" in capsys.readouterr().out


def cli(*args, cwd=None):
    """Run the real console entry point in a subprocess: exit code, stdout, stderr."""
    proc = subprocess.run([sys.executable, "-m", "llmcycle", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=300)
    return proc.returncode, proc.stdout, proc.stderr


def project(tmp_path, extra=""):
    model = make_t5(tmp_path / "model")
    rows = [{"text": f"sentence number {i} about cats", "label": f"cats {i}"} for i in range(20)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "llmcycle.yaml").write_text(f"""project: {{name: cli, task: summarization}}
scope: {{use_case: testing the cli}}
data: {{train: train.jsonl, input: text, target: label}}
model: {{name: {model}}}
{extra}""")
    return tmp_path / "llmcycle.yaml"


def test_init_writes_a_project_that_validates_and_refuses_to_overwrite(tmp_path):
    code, out, _ = cli("init", str(tmp_path / "p"), "--task", "qa", "--json")
    assert code == 0 and json.loads(out)["task"] == "qa"
    assert (tmp_path / "p" / "llmcycle.yaml").exists()
    before = (tmp_path / "p" / "llmcycle.yaml").read_text()
    code, _, err = cli("init", str(tmp_path / "p"))
    assert code == 2 and "already exists" in err and len(err.strip().splitlines()) == 1
    assert (tmp_path / "p" / "llmcycle.yaml").read_text() == before
    code, _, err = cli("init", str(tmp_path / "q"), "--task", "sumarization")
    assert code == 2 and "did you mean 'summarization'" in err


def test_user_errors_are_one_line_exit_2(tmp_path):
    path = project(tmp_path)
    cases = [
        (["scope", "-p", str(tmp_path / "missing.yaml")], "project file not found"),
        (["scope", "-p", str(path), "--set", "data.inptu=x"], "unknown key 'data.inptu'"),
        (["scope", "-p", str(path), "--set", "scope.throughput_tflops=fast"], "expected a number"),
        (["scope", "-p", str(path), "--set", "data.train=nope.jsonl"], "nope.jsonl"),
        (["runs", "show", "nope", "-p", str(path)], "not found"),
        (["run", "-p", str(path), "--only", "pretrian"], "did you mean 'pretrain'"),
        (["pretrain", "-p", str(path)], "no pretrain variants"),
        (["serve", "-p", str(path), "--port", "99999"], "'--port'"),
        (["ui", "-p", str(path), "--port", "70000"], "'--port'"),
        (["eval", "-p", str(path), "--limit", "-5"], "'--limit'"),
    ]
    for args, needle in cases:
        code, _, err = cli(*args)
        assert code == 2, (args, err)
        assert needle in err and len(err.strip().splitlines()) == 1, (args, err)
        assert "Traceback" not in err
    assert not (tmp_path / "runs").exists() or not list((tmp_path / "runs").glob("eval-*"))  # refused first


def test_empty_dataset_and_missing_targets(tmp_path):
    path = project(tmp_path)
    (tmp_path / "empty.jsonl").write_text("")
    code, _, err = cli("scope", "-p", str(path), "--set", "data.train=empty.jsonl")
    assert code == 2 and "no records" in err
    (tmp_path / "partial.jsonl").write_text('{"text": "a", "label": "b"}\n{"text": "c"}\n')
    code, _, err = cli("scope", "-p", str(path), "--set", "data.train=partial.jsonl")
    assert code == 2 and "partial.jsonl:2" in err and "label" in err


def test_model_folder_without_tokenizer(tmp_path):
    path = project(tmp_path)
    bare = make_t5(tmp_path / "bare", tokenizer=False)
    code, _, err = cli("scope", "-p", str(path), "--set", f"model.name={bare}")
    assert code == 2 and "no tokenizer" in err and str(bare) in err


def test_internal_error_is_exit_1_with_traceback_only_in_debug(tmp_path, monkeypatch, capsys):
    import llmcycle.project.lifecycle as lifecycle

    path = project(tmp_path)

    def boom(*a, **k):
        raise RuntimeError("unexpected")

    monkeypatch.setattr(lifecycle, "execute", boom)
    assert main(["scope", "-p", str(path)]) == 1
    err = capsys.readouterr().err
    assert "internal error: RuntimeError: unexpected" in err and "Traceback" not in err
    assert main(["--debug", "scope", "-p", str(path)]) == 1
    assert "Traceback" in capsys.readouterr().err


def test_scope_json_and_runs_commands(tmp_path):
    path = project(tmp_path)
    code, out, _ = cli("scope", "-p", str(path), "--json")
    assert code == 0
    plan = json.loads(out)
    assert plan["model"]["kind"] == "seq2seq" and plan["data"]["train"] == 18
    code, out, _ = cli("runs", "list", "-p", str(path), "--json")
    runs = json.loads(out)
    assert [r["stage"] for r in runs] == ["scope"] and runs[0]["status"] == "completed"
    code, out, _ = cli("runs", "show", runs[0]["id"], "-p", str(path), "--json")
    shown = json.loads(out)
    assert shown["summary"]["model"]["parameters"] == plan["model"]["parameters"]
    assert "versions" in shown and "config" in shown
    code, out, _ = cli("runs", "compare", "-p", str(path), "--json")
    assert json.loads(out)["runs"][0]["id"] == runs[0]["id"]
    code, out, _ = cli("runs", "list", "-p", str(path))
    assert code == 0 and runs[0]["id"][:20] in out


def test_run_skips_unchanged_and_reruns_on_change_or_force(tmp_path):
    path = project(tmp_path)
    first = json.loads(cli("run", "-p", str(path), "--json")[1])["runs"]
    assert [(r["stage"], r["status"]) for r in first] == [("scope", "completed")]
    second = json.loads(cli("run", "-p", str(path), "--json")[1])["runs"]
    assert second[0]["status"] == "skipped" and second[0]["run_id"] == first[0]["run_id"]
    forced = json.loads(cli("run", "-p", str(path), "--force", "--json")[1])["runs"]
    assert forced[0]["status"] == "completed" and forced[0]["run_id"] != first[0]["run_id"]
    # changing the data changes the content hash
    with open(tmp_path / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "one more", "label": "more"}) + "\n")
    changed = json.loads(cli("run", "-p", str(path), "--json")[1])["runs"]
    assert changed[0]["status"] == "completed"
    # --from a later stage skips scope entirely
    later = json.loads(cli("run", "-p", str(path), "--from", "pretrain", "--json")[1])["runs"]
    assert later == []


# -- numbers in tables, by magnitude ---------------------------------------------------------------
def test_runs_show_and_compare_format_numbers_by_magnitude(tmp_path, capsys):
    from llmcycle.project.config import load_project

    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: generation}\n")
    store = load_project(tmp_path / "llmcycle.yaml").store()
    for variant, ppl in (("tiny", 1.9e17), ("small", 12.3456)):
        with store.start("pretrain", variant, {"lr": 2.5e-6, "warmup": 0.05}, project_dir=tmp_path) as run:
            run.log({"step": 1, "lr": 3.3e-7, "loss": 2.0})
            run.finish({"lr": 1.41e-5, "perplexity": ppl, "final_loss": 0.995, "steps": 1200})
    path = str(tmp_path / "llmcycle.yaml")
    assert main(["runs", "show", "pretrain/tiny", "-p", path]) == 0
    shown = capsys.readouterr().out
    assert "1.41e-05" in shown and "0.000" not in shown and "1.90e+17" in shown and "0.995" in shown
    assert "2.50e-06" in shown and "0.050" in shown  # the run's config, formatted the same way
    assert "lr 3.30e-07" in shown  # and its last metrics row
    assert " 1200 " in shown  # an integer stays an integer
    assert main(["runs", "compare", "-p", path, "--examples", "0"]) == 0
    table = capsys.readouterr().out
    assert "1.90e+17" in table and "12.3" in table and "190,000" not in table
    assert "1.90e+17" in table.split() and max(len(line) for line in table.splitlines()) <= 100  # ppl stays narrow


# -- several processes: only rank 0 prints ------------------------------------------------------------
@pytest.mark.parametrize("rank,printed", [("0", True), ("1", False)])
def test_align_under_torchrun_prints_on_rank_0_only(tmp_path, monkeypatch, capsys, rank, printed):
    from llmcycle.project import lifecycle

    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: summarization}\n")
    monkeypatch.setenv("RANK", rank)
    monkeypatch.setenv("WORLD_SIZE", "2")
    ran = []
    monkeypatch.setattr(lifecycle, "variants", lambda project, stage: {"detox": {}})
    monkeypatch.setattr(lifecycle, "execute", lambda project, stage, variant, **kw: ran.append(stage) or
                        lifecycle.Outcome(stage, variant, "completed", "align-detox-1", {"preference_accuracy": 0.75}))
    for extra in ([], ["--json"]):
        assert main(["align", "-p", str(tmp_path / "llmcycle.yaml"), *extra]) == 0
        out = capsys.readouterr().out
        assert ("align.detox -> run align-detox-1" in out or '"run_id": "align-detox-1"' in out) is printed
        assert (out == "") is not printed
    assert ran == ["align", "align"]  # every rank does the work; only the printing is rank 0's


def test_optimize_prints_its_source_before_and_its_result_after(tmp_path, monkeypatch, capsys):
    from llmcycle.project import lifecycle

    (tmp_path / "llmcycle.yaml").write_text("project: {name: t, task: summarization}\n")
    summary = {"source_latency_p95_ms": 120.0, "latency_p95_ms": 45.6, "source_size_mb": 1.0, "size_mb": 0.25,
               "wall_s": 3.14159}
    monkeypatch.setattr(lifecycle, "variants", lambda project, stage: {"int8": {}})
    monkeypatch.setattr(lifecycle, "execute", lambda project, stage, variant, **kw:
                        lifecycle.Outcome(stage, variant, "completed", "optimize-int8-1", summary))
    assert main(["optimize", "-p", str(tmp_path / "llmcycle.yaml")]) == 0
    out = capsys.readouterr().out
    assert "p95 latency: 120.0 → 45.6 ms (0.38×)" in out and "size on disk: 1.000 → 0.250 MB (0.25×)" in out
    assert "wall_s: 3.142" in out
    summary.pop("source_latency_p95_ms")  # a figure that was not measured shows as n/a, never as a number
    assert main(["optimize", "-p", str(tmp_path / "llmcycle.yaml")]) == 0
    assert "p95 latency: n/a → 45.6 ms\n" in capsys.readouterr().out


def test_the_grpo_training_line_says_where_reward_kl_and_flat_groups_went():
    from llmcycle.cli import _group_lines

    training = {"steps": 250, "reward_mean_first": 0.125, "reward_mean_last": 0.5, "kl_first": 0.0, "kl_last": 0.0312,
                "flat_group_share_first": 0.75, "flat_group_share_last": 0.25}
    (line,) = _group_lines(training)
    assert line == ("250 steps, first→last fifth: reward 0.125→0.500, KL 0.000→0.031, "
                    "flat groups 0.750→0.250") and len(line) <= 98
    assert _group_lines({"steps": 3, "reward_mean_first": 1.0}) == []  # ppo: no groups
