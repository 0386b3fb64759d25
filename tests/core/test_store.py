"""The run store: records, lookups, atomic writes, killed runs and concurrent writers."""
import json
import multiprocessing as mp
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import time

import pytest

from llmcycle.core.errors import UserError
from llmcycle.core.store import RunStore, atomic_write_json


def test_run_records_config_versions_metrics_and_summary(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.start("pretrain", "tiny", {"lr": 1e-3}, content_hash="abc") as run:
        run.log({"step": 1, "loss": 2.5})
        run.log({"step": 2, "loss": 2.0})
        (run.artifacts / "note.txt").write_text("hi")
        run.finish({"final_loss": 2.0})
    rec = store.get(run.id)
    assert rec.status == "completed" and rec.config == {"lr": 1e-3}
    assert rec.summary() == {"final_loss": 2.0}
    assert [m["loss"] for m in rec.metrics()] == [2.5, 2.0]
    meta = json.loads((rec.dir / "run.json").read_text())
    assert "torch" in meta["versions"] and meta["versions"]["llmcycle"]
    assert "git_revision" in meta and meta["finished"] >= meta["created"]
    assert (rec.artifacts / "note.txt").read_text() == "hi"
    # the SQLite index agrees with the folder
    with sqlite3.connect(store.root / "index.sqlite") as db:
        assert db.execute("SELECT status FROM runs WHERE id=?", (run.id,)).fetchone() == ("completed",)


def test_exception_marks_run_failed_and_keeps_earlier_runs(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.start("scope", "plan", {}) as ok:
        ok.finish({"x": 1})
    with pytest.raises(RuntimeError):
        with store.start("pretrain", "tiny", {}) as bad:
            raise RuntimeError("boom")
    assert store.get(bad.id).status == "failed"
    assert "boom" in store.get(bad.id).error
    assert store.get(ok.id).summary() == {"x": 1}


def test_lookup_by_prefix_latest_and_stage_variant(tmp_path):
    store = RunStore(tmp_path / "runs")
    ids = []
    for _ in range(2):
        with store.start("pretrain", "tiny", {}) as run:
            run.finish({})
        ids.append(run.id)
    assert store.get("latest").id == ids[-1]
    assert store.get("pretrain/tiny").id == ids[-1]
    assert store.get(ids[0]).id == ids[0]
    with pytest.raises(UserError, match="ambiguous"):
        store.get("pretrain-tiny")
    with pytest.raises(UserError, match="not found"):
        store.get("nope")
    with pytest.raises(UserError, match="no completed run"):
        store.get("pretrain/small")


def test_resolve_model_needs_a_model_folder(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.start("pretrain", "tiny", {}) as run:
        run.finish({})
    with pytest.raises(UserError, match="no model folder"):
        store.resolve_model(run.id)
    (run.artifacts / "model").mkdir()
    (run.artifacts / "model" / "config.json").write_text("{}")
    assert store.resolve_model("pretrain/tiny") == run.artifacts / "model"


def test_killed_run_is_reported_incomplete_and_store_stays_readable(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.start("scope", "plan", {}) as ok:
        ok.finish({"kept": True})
    script = textwrap.dedent(f"""
        import time
        from llmcycle.core.store import RunStore
        store = RunStore({str(store.root)!r})
        run = store.create("pretrain", "tiny", {{}})
        print(run.id, flush=True)
        for i in range(10000):
            run.log({{"step": i}})
            time.sleep(0.001)
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    run_id = proc.stdout.readline().strip()
    time.sleep(0.3)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    rec = store.get(run_id)
    assert rec.status == "incomplete"
    assert len(rec.metrics()) > 0  # every complete line is still readable
    assert store.get(ok.id).summary() == {"kept": True}
    # a killed run can be reopened for --resume
    run = store.reopen(run_id)
    run.finish({"resumed": True})
    assert store.get(run_id).status == "completed"


def _writer(root, n):
    store = RunStore(root)
    for i in range(n):
        with store.start("pretrain", f"w{os.getpid()}", {"i": i}) as run:
            run.log({"i": i})
            run.finish({"i": i})


def test_two_processes_writing_at_once(tmp_path):
    root = tmp_path / "runs"
    ctx = mp.get_context("spawn")
    procs = [ctx.Process(target=_writer, args=(root, 15)) for _ in range(2)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(60)
        assert p.exitcode == 0
    store = RunStore(root)
    runs = store.list()
    assert len(runs) == 30 and all(r.status == "completed" for r in runs)
    with sqlite3.connect(root / "index.sqlite") as db:
        assert db.execute("PRAGMA integrity_check").fetchone() == ("ok",)
        assert db.execute("SELECT COUNT(*) FROM runs").fetchone() == (30,)


def test_reindex_rebuilds_a_lost_index(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.start("scope", "plan", {}) as run:
        run.finish({})
    (store.root / "index.sqlite").unlink()
    assert store.reindex() == 1


def test_atomic_write_leaves_old_file_when_interrupted(tmp_path, monkeypatch):
    path = tmp_path / "summary.json"
    atomic_write_json(path, {"v": 1})

    def broken_replace(src, dst):
        raise OSError("disk full")

    monkeypatch.setattr(os, "replace", broken_replace)
    with pytest.raises(OSError):
        atomic_write_json(path, {"v": 2})
    assert json.loads(path.read_text()) == {"v": 1}


def test_find_cached_matches_hash_of_completed_runs_only(tmp_path):
    store = RunStore(tmp_path / "runs")
    with pytest.raises(ValueError):
        with store.start("pretrain", "tiny", {}, content_hash="h1"):
            raise ValueError
    assert store.find_cached("pretrain", "tiny", "h1") is None
    with store.start("pretrain", "tiny", {}, content_hash="h1") as run:
        run.finish({})
    assert store.find_cached("pretrain", "tiny", "h1").id == run.id
    assert store.find_cached("pretrain", "tiny", "h2") is None


def test_a_reused_pid_is_not_taken_for_the_run(tmp_path):
    """After a container restart or PID wraparound another process may hold the recorded PID: the
    recorded start time tells them apart."""
    store = RunStore(tmp_path / "runs")
    run = store.create("tune", "lora", {})
    assert store.get(run.id).status == "running"  # this very process: alive
    path = run.dir / "run.json"
    data = json.loads(path.read_text())
    assert data["pid"] == os.getpid() and data["pid_started"] is not None
    data["pid_started"] -= 3600.0  # the PID is alive, but that process started an hour later
    path.write_text(json.dumps(data))
    assert store.get(run.id).status == "incomplete"
    reopened = store.reopen(run.id)  # --resume takes it, and records the new process
    assert json.loads(path.read_text())["pid_started"] == pytest.approx(data["pid_started"] + 3600.0, abs=1)
    reopened.finish({})


def test_a_refused_resume_leaves_the_killed_run_as_it_was(tmp_path):
    store = RunStore(tmp_path / "runs")
    run = store.create("tune", "full", {})
    run.log({"step": 10, "loss": 2.0})
    run.fail("killed at step 10", status="incomplete")
    with pytest.raises(UserError, match="checkpoint"):
        with store.start("tune", "full", {}, resume_ref=run.id):
            raise UserError("the checkpoint does not match the config")  # refused before any step
    rec = store.get(run.id)
    assert (rec.status, rec.error) == ("incomplete", "killed at step 10")
    assert store.latest_unfinished("tune", "full").id == run.id  # still there to resume
    with pytest.raises(UserError):
        with store.start("tune", "full", {}, resume_ref=run.id) as resumed:
            resumed.log({"step": 20, "loss": 1.5})  # resumed work happened: this failure is the run's
            raise UserError("disk full")
    assert store.get(run.id).status == "failed" and "disk full" in store.get(run.id).error


def test_rewind_drops_the_rows_of_steps_to_be_redone_and_records_the_resume(tmp_path):
    store = RunStore(tmp_path / "runs")
    with store.start("tune", "v", {}) as run:
        for step in (10, 20, 30):
            run.log({"step": step, "loss": 1.0 / step})
        run.log({"phase": "probe"})  # rows without a step stay
        run.log({"step": 20, "val_loss": 0.5})
        run.fail("killed", status="incomplete")
    run = store.reopen(run.id)
    resumed = run.rewind(20)
    rows = store.get(run.id).metrics()
    assert [(r.get("step"), "loss" in r) for r in rows] == [(10, True), (20, True), (None, False), (20, False)]
    assert resumed["step"] == 20 and resumed["dropped_metrics_rows"] == 1
    assert store.get(run.id).meta["resumed_from"] == resumed
    run.log({"step": 30, "loss": 0.03})
    assert [r.get("step") for r in store.get(run.id).metrics()] == [10, 20, None, 20, 30]


def test_paths_inside_the_project_are_recorded_relative_to_it(tmp_path):
    store = RunStore(tmp_path / "proj" / "runs")
    outside = tmp_path / "elsewhere"
    outside.mkdir()
    with store.start("eval", "v", {}) as run:
        inside = run.artifacts / "model"
        inside.mkdir()
        run.finish({"model_dir": str(inside), "nested": [{"p": str(inside)}], "outside": str(outside),
                    "missing": str(tmp_path / "proj" / "gone"), "text": "hello", "n": 3})
    saved = json.loads((run.dir / "summary.json").read_text())
    assert saved["model_dir"] == saved["nested"][0]["p"] == f"runs/{run.id}/artifacts/model"
    assert saved["outside"] == str(outside) and saved["missing"] == str(tmp_path / "proj" / "gone")
    assert saved["text"] == "hello" and saved["n"] == 3
    assert store.model_pointer(inside, "r1") == {"path": f"runs/{run.id}/artifacts/model", "run": "r1"}
    assert store.model_pointer(outside) == {"model": str(outside), "run": None}
    assert store.model_pointer("org/model") == {"model": "org/model", "run": None}


def test_a_model_pointer_inside_the_project_resolves_after_a_move(tmp_path):
    import shutil

    store = RunStore(tmp_path / "a" / "runs")
    with store.start("select", "x", {}) as made:
        (made.artifacts / "model").mkdir()
        (made.artifacts / "model" / "config.json").write_text("{}")
        made.finish({})
    with store.start("select", "best", {}) as best:
        atomic_write_json(best.artifacts / "model_ref.json", store.model_pointer(made.artifacts / "model", made.id))
        best.finish({})
    shutil.move(str(tmp_path / "a"), str(tmp_path / "b"))
    moved = RunStore(tmp_path / "b" / "runs")
    assert moved.resolve_model("select/best") == tmp_path / "b" / "runs" / made.id / "artifacts" / "model"
