"""The dashboard (`llmcycle ui`): its JSON API with FastAPI's TestClient, the playground proxy against a tiny
served model, the port-in-use error through the real CLI, and the page itself in headless Chromium
(Playwright). The run store is fabricated in code (records, summaries, metrics, predictions; no training).

Browser tests skip with the reason when Playwright or Chromium is missing (`make test` installs both where
it can). Screenshots go to $LLMCYCLE_TEST_ARTIFACTS, else tests/_artifacts/.
"""
from __future__ import annotations

import json
import math
import os
import shutil
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcycle.core.errors import UserError
from llmcycle.evaluation.harness import PREDICTIONS
from llmcycle.core.store import RunStore, atomic_write_text

uvicorn = pytest.importorskip("uvicorn")
httpx = pytest.importorskip("httpx")
from fastapi.testclient import TestClient  # noqa: E402  (fastapi comes with uvicorn in the serve extra)

from llmcycle.ui.app import MAX_POINTS, STATIC, check_model_url, create_ui_app, curves  # noqa: E402

LOCAL = "http://127.0.0.1:8765"


def local_client(app):
    """A client as the dashboard's own page is one: addressed to 127.0.0.1, POSTs with its Origin."""
    return TestClient(app, base_url=LOCAL, headers={"Origin": LOCAL})
from servers import running  # noqa: E402

ARTIFACTS = Path(os.environ.get("LLMCYCLE_TEST_ARTIFACTS") or Path(__file__).parents[1] / "_artifacts")
EXAMPLES = [("Anna books a table for two.", "Anna reserves a table."),
            ("Ben buys a red phone case.", "Ben buys a case."),
            ("Cleo takes the train to Lisbon.", "Cleo travels to Lisbon.")]


# ------------------------------------------------------------------------------------------ the store
def _run(store, stage, variant, summary=None, metrics=(), outputs=None, fail=None, scores=None):
    """One recorded run: its metric lines, predictions (one output per example, with its rougeL when
    `scores` are given) and summary."""
    run = store.create(stage, variant, {"lr": 1e-3})
    for row in metrics:
        run.log(row)
    if outputs is not None:
        rows = [{"index": i, "where": f"eval.jsonl:{i + 1}", "input": text, "prompt": text, "references": [ref],
                 "prediction": out, **({"rougeL": scores[i]} if scores else {})}
                for i, ((text, ref), out) in enumerate(zip(EXAMPLES, outputs))]
        atomic_write_text(run.artifacts / PREDICTIONS, "".join(json.dumps(r) + "\n" for r in rows))
    if fail:
        run.fail(fail)
    else:
        run.finish(summary or {})
    time.sleep(0.01)  # distinct creation times: the store lists runs in that order
    return run.id


def _scores(rouge, ci=0.05):
    return {"n_examples": 3, "eval_skipped": 1, "too_few_examples": True,
            "headline": "rougeL", "headline_value": rouge, "headline_ci_low": rouge - ci,
            "headline_ci_high": rouge + ci, "rougeL": rouge, "rouge1": rouge + 0.02, "bleu": rouge * 60}


@pytest.fixture(scope="module")
def project(tmp_path_factory):
    """A project folder whose store holds: two tuned runs (loss curves, one with a NaN loss), a PPO run
    (reward and KL curves), a prompt run, a failed run, a completed run whose summary.json was deleted,
    and a run whose folder was deleted (the index still lists it)."""
    folder = tmp_path_factory.mktemp("project")
    store = RunStore.for_project(folder)
    ids = {
        "lora": _run(store, "tune", "lora", _scores(0.42),
                     [{"step": s, "epoch": s / 100, "loss": 3.0 - s / 50} for s in range(10, 101, 10)]
                     + [{"step": 100, "val_loss": 1.4, "headline": "rougeL", "rougeL": 0.42}],
                     ["Anna reserves a table.", "Ben buys a red case.", "Cleo goes to Lisbon."]),
        "full": _run(store, "tune", "full", {**_scores(0.55), "trainable_pct": 100.0},
                     [{"step": 10, "loss": 2.5}, {"step": 20, "loss": float("nan")}, {"step": 30, "loss": 1.2}],
                     ["Anna books a table.", "Ben buys a case.", ""], scores=[0.6, 0.55, 0.5]),
        "ppo": _run(store, "align", "ppo", {"toxicity_mean": 0.1, "toxicity_change_pct": -40.0},
                    [{"step": s, "reward_mean": 0.1 * s, "kl": 0.01 * s, "score_mean": 0.2} for s in range(1, 9)]),
        "prompt": _run(store, "prompt", "flan.0shot.greedy", _scores(0.05),
                       outputs=["table", "phone", "train"], scores=[0.05, 0.05, 0.05]),
        "failed": _run(store, "pretrain", "tiny", fail="RuntimeError: out of memory"),
        "nosummary": _run(store, "tune", "qlora", _scores(0.3)),
        "gone": _run(store, "tune", "prompt_tuning", _scores(0.2)),
    }
    (store.root / ids["nosummary"] / "summary.json").unlink()
    shutil.rmtree(store.root / ids["gone"])
    return folder, store, ids


@pytest.fixture()
def api(project):
    folder, store, ids = project
    with local_client(create_ui_app(store, model_url=f"http://127.0.0.1:{_free_port()}")) as client:
        yield client, ids


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]




# ------------------------------------------------------------------------------------------ the API
def test_runs_are_listed_filtered_and_sorted(api):
    client, ids = api
    data = client.get("/api/runs").json()
    assert data["total"] == 7
    order = ("lora", "full", "ppo", "prompt", "failed", "nosummary")
    assert [r["id"] for r in data["runs"]][:6] == [ids[k] for k in order]
    assert data["stages"] == ["pretrain", "prompt", "tune", "align"]  # lifecycle order
    assert set(data["statuses"]) == {"completed", "failed", "missing"}
    assert data["metrics"][:4] == ["headline_value", "rouge1", "rougeL", "bleu"]  # runs_view's order first
    by_id = {r["id"]: r for r in data["runs"]}
    assert by_id[ids["failed"]]["error"] == "RuntimeError: out of memory"
    assert by_id[ids["nosummary"]]["note"] == "summary.json is missing"
    tune = client.get("/api/runs", params={"stage": "tune"}).json()["runs"]
    assert {r["variant"] for r in tune} == {"lora", "full", "qlora", "prompt_tuning"}
    lora = client.get("/api/runs", params={"variant": "LoR"}).json()["runs"]
    assert [r["variant"] for r in lora] == ["lora", "qlora"]
    assert [r["id"] for r in client.get("/api/runs", params={"status": "failed"}).json()["runs"]] == [ids["failed"]]
    ranked = client.get("/api/runs", params={"sort": "rougeL"}).json()["runs"]
    assert [r.get("rougeL") for r in ranked][:3] == [0.55, 0.42, 0.05]
    assert all("rougeL" not in r for r in ranked[3:])  # runs without the figure come last
    rising = client.get("/api/runs", params={"sort": "rougeL", "order": "asc"}).json()["runs"]
    assert [r.get("rougeL") for r in rising][:3] == [0.05, 0.42, 0.55]
    assert client.get("/api/runs", params={"order": "up"}).status_code == 400


def test_a_deleted_run_is_shown_as_missing(api):
    client, ids = api
    gone = [r for r in client.get("/api/runs").json()["runs"] if r["id"] == ids["gone"]]
    assert len(gone) == 1 and gone[0]["status"] == "missing" and gone[0]["last_status"] == "completed"
    assert "was deleted" in gone[0]["note"]
    assert client.get("/api/runs", params={"status": "missing"}).json()["runs"][0]["id"] == ids["gone"]
    r = client.get(f"/api/runs/{ids['gone']}/metrics")
    assert r.status_code == 404 and "not found" in r.json()["error"]
    data = client.get("/api/compare", params={"ids": f"{ids['lora']},{ids['gone']}"}).json()
    assert [m["id"] for m in data["missing"]] == [ids["gone"]]
    assert [r["id"] for r in data["runs"]] == [ids["lora"]]


def test_compare_gives_figures_best_values_and_outputs(api):
    client, ids = api
    data = client.get("/api/compare", params={"ids": f"{ids['lora']},{ids['full']}"}).json()
    assert [r["label"] for r in data["runs"]] == [f"lora ({ids['lora'][-4:]})", f"full ({ids['full'][-4:]})"]
    assert data["best"]["rougeL"] == 0.55 and data["best"]["headline_value"] == 0.55
    assert data["main_metrics"][0] == "headline_value" and "n_examples" not in data["main_metrics"]
    assert "n_examples" in data["metrics"]
    assert len(data["examples"]) == 3
    first = data["examples"][0]
    assert first["input"] == EXAMPLES[0][0] and first["references"] == [EXAMPLES[0][1]]
    assert first["outputs"] == {f"lora ({ids['lora'][-4:]})": "Anna reserves a table.",
                                f"full ({ids['full'][-4:]})": "Anna books a table."}
    assert client.get("/api/compare", params={"ids": " , "}).status_code == 400


def test_metrics_become_curves(api):
    client, ids = api
    lora = client.get(f"/api/runs/{ids['lora']}/metrics").json()
    assert lora["rows"] == 11
    assert lora["curves"]["loss"]["x"] == list(range(10, 101, 10))
    assert lora["curves"]["loss"]["y"][0] == pytest.approx(2.8)
    assert lora["curves"]["val_loss"] == {"x": [100], "y": [1.4]}
    assert not {"time", "step", "epoch", "headline"} & set(lora["curves"])
    full = client.get(f"/api/runs/{ids['full']}/metrics").json()
    assert full["curves"]["loss"]["y"] == [2.5, None, 1.2]  # NaN is a gap, and valid JSON
    ppo = client.get(f"/api/runs/{ids['ppo']}/metrics").json()
    assert {"reward_mean", "kl", "score_mean"} <= set(ppo["curves"])


def test_long_curves_are_thinned_keeping_the_last_point():
    rows = [{"step": s, "loss": 1 / s} for s in range(1, 10_001)] + [{"step": 10_001, "loss": math.inf}]
    loss = curves(rows)["loss"]
    assert len(loss["x"]) <= MAX_POINTS + 1
    assert loss["x"][0] == 1 and loss["x"][-1] == 10_001 and loss["y"][-1] is None


def test_empty_project_and_static_files(tmp_path):
    with local_client(create_ui_app(RunStore.for_project(tmp_path))) as client:
        data = client.get("/api/runs").json()
        assert data["total"] == 0 and data["runs"] == []
        assert not (tmp_path / "runs").exists()  # looking must not create a store
        page = client.get("/")
        assert page.status_code == 200 and "/static/app.js" in page.text
        assert client.get("/static/app.js").headers["content-type"].startswith("text/javascript")
        assert client.get("/static/nothing.js").status_code == 404
        assert client.get("/static/..%2Fui.py").status_code == 404
    # the page must work offline: nothing is loaded from another site
    for f in STATIC.iterdir():
        assert "http://" not in f.read_text().replace("http://www.w3.org/2000/svg", ""), f
        assert "https://" not in f.read_text(), f


def test_model_url_is_checked():
    assert check_model_url("http://127.0.0.1:8000/v1/") == "http://127.0.0.1:8000"
    for bad in ("127.0.0.1:8000", "ftp://host", "http://"):
        with pytest.raises(UserError, match="--model-url"):
            check_model_url(bad)


def test_playground_reports_an_unreachable_model_server(api):
    client, _ = api
    r = client.post("/api/playground", json={"prompt": "hello"})
    assert r.status_code == 502 and "is not reachable" in r.json()["error"]
    assert "llmcycle serve" in r.json()["error"]
    r = client.get("/api/models")
    assert r.status_code == 502 and "is not reachable" in r.json()["error"]
    bad = client.post("/api/playground", json={"prompt": "hi", "top_p": 3})
    assert bad.status_code == 400 and bad.json()["error"].startswith("top_p")
    assert client.post("/api/playground", json={"prompt": ""}).status_code == 400


# ------------------------------------------------------------------------------ with a served model
@pytest.fixture(scope="module")
def model_url(tmp_path_factory):
    """A tiny GPT-2, trained a little so that it continues a prompt with words, served by serve's app."""
    import torch

    from llmcycle.evaluation import harness
    from llmcycle.serve.app import create_app
    from test_generation import _train
    from tiny import make_gpt2

    before = torch.get_num_threads()
    torch.set_num_threads(1)
    loaded = harness.load(str(make_gpt2(tmp_path_factory.mktemp("gpt2"))), device="cpu")
    _train(loaded.model, loaded.tokenizer)
    with running(create_app(loaded, model_name="tiny-gpt2", max_batch_size=2)) as url:
        yield url
    torch.set_num_threads(before)


def test_playground_relays_the_stream(project, model_url):
    _, store, _ = project
    with local_client(create_ui_app(store, model_url=model_url + "/v1")) as client:
        assert client.get("/api/models").json() == {"url": model_url, "models": ["tiny-gpt2"]}
        body = {"prompt": "the quick brown", "max_tokens": 12, "temperature": 0}
        with client.stream("POST", "/api/playground", json=body) as r:
            assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
            events = [line[len("data: "):] for line in r.iter_lines() if line.startswith("data: ")]
        assert events[-1] == "[DONE]"
        chunks = [json.loads(e) for e in events[:-1]]
        text = "".join(c["choices"][0]["delta"].get("content", "") for c in chunks)
        assert text.strip() and len(chunks) > 3  # role, several deltas, finish
        wrong = client.post("/api/playground", json={**body, "model": "nope"})
        assert wrong.status_code == 502 and "does not exist" in wrong.json()["error"]


# ------------------------------------------------------------------------------------------ the CLI
def test_cli_refuses_a_port_in_use(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parents[2])}
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        proc = subprocess.run([sys.executable, "-m", "llmcycle", "ui", "-p", str(tmp_path), "--port", str(port)],
                              capture_output=True, text=True, timeout=120, env=env)
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == f"error: port {port} on 127.0.0.1 is in use; pick another with --port"


def test_cli_refuses_a_missing_project(tmp_path, capsys):
    from llmcycle.cli import main

    assert main(["ui", "-p", str(tmp_path / "nowhere"), "--port", "0"]) == 2
    assert "project file not found" in capsys.readouterr().err


# ---------------------------------------------------------------------------------------- the browser
@pytest.fixture(scope="module")
def ui_url(project, model_url):
    _, store, _ = project
    with running(create_ui_app(store, model_url=model_url)) as url:
        yield url


@pytest.fixture()
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    pg = context.new_page()
    errors = []
    pg.on("pageerror", lambda exc: errors.append(str(exc)))  # an uncaught exception in app.js
    pg.set_default_timeout(20_000)
    yield pg
    context.close()
    assert not errors, errors


def _shot(pg, name):
    ARTIFACTS.mkdir(parents=True, exist_ok=True)
    pg.screenshot(path=str(ARTIFACTS / name), full_page=True)


def _wait_compared(pg, *ids):
    """Until the compare view has drawn everything (figures, plots, curves, outputs) for these runs."""
    pg.wait_for_function(f"document.getElementById('view-compare').dataset.loaded === '{','.join(ids)}'")


def _rows(pg) -> list[str]:
    return pg.eval_on_selector_all("#runs-table tbody tr", "rows => rows.map(r => r.dataset.id)")


def test_browser_runs_table_filters_and_sorts(page, ui_url, project):
    _, _, ids = project
    page.goto(ui_url)
    page.wait_for_selector("#runs-table tbody tr")
    assert len(_rows(page)) == 7
    gone = page.locator(f'tr[data-id="{ids["gone"]}"]')
    assert gone.locator("td.status").inner_text().startswith("missing")
    assert gone.locator("input[type=checkbox]").is_disabled()
    page.select_option("#f-stage", "tune")
    page.wait_for_function("document.querySelectorAll('#runs-table tbody tr').length === 4")
    page.fill("#f-variant", "lora")
    page.wait_for_function("document.querySelectorAll('#runs-table tbody tr').length === 2")
    assert sorted(_rows(page)) == sorted([ids["lora"], ids["nosummary"]])
    page.fill("#f-variant", "")
    page.select_option("#f-stage", "")
    page.wait_for_function("document.querySelectorAll('#runs-table tbody tr').length === 7")
    page.select_option("#f-sort", "rougeL")
    page.wait_for_function(f"document.querySelector('#runs-table tbody tr').dataset.id === '{ids['full']}'")
    assert _rows(page)[:3] == [ids["full"], ids["lora"], ids["prompt"]]
    # what the figure stands on: 3 examples, 1 skipped as too long, fewer than evaluate.min_examples
    assert "n=3 (1 skipped) ⚠ few" in page.locator(f'tr[data-id="{ids["full"]}"]').inner_text()
    # its paired Δ against the prompt baseline on the 3 examples both scored: +0.5, not significant on 3
    assert "Δ baseline +0.500" in page.locator(f'tr[data-id="{ids["full"]}"]').inner_text()
    _shot(page, "ui_runs.png")


def test_browser_compare_shows_figures_plots_and_outputs(page, ui_url, project):
    _, _, ids = project
    page.goto(ui_url)
    page.check(f'input[data-id="{ids["lora"]}"]')
    page.check(f'input[data-id="{ids["full"]}"]')
    page.click("#compare-btn")
    _wait_compared(page, ids["lora"], ids["full"])
    headers = page.locator("#compare-table thead th").all_inner_texts()
    assert headers[1:] == [f"lora ({ids['lora'][-4:]})", f"full ({ids['full'][-4:]})"]
    table = page.inner_text("#compare-table")
    assert "0.420" in table and "0.550 [0.500, 0.600] ★" in table
    assert page.locator("#bar-chart svg rect.bar").count() == 2
    assert page.locator("#curve-chart svg path.curve").count() == 2  # both runs' loss curves
    assert page.locator("#curve-chart svg circle.point").count() == 2  # full's two points around its NaN
    assert page.input_value("#curve-key") == "loss"
    outputs = page.locator("#examples .output").all_inner_texts()
    assert any("Anna reserves a table." in o for o in outputs) and any("Anna books a table." in o for o in outputs)
    assert "#compare?ids=" in page.url  # a comparison can be reloaded from its address
    _shot(page, "ui_compare.png")
    page.goto(f"{ui_url}/#compare?ids={ids['ppo']},{ids['lora']}")  # PPO's curves, by address
    _wait_compared(page, ids["ppo"], ids["lora"])
    keys = page.eval_on_selector_all("#curve-key option", "options => options.map(o => o.value)")
    assert keys[:4] == ["loss", "val_loss", "reward_mean", "kl"]
    page.select_option("#curve-key", "reward_mean")
    assert page.text_content("#curve-chart svg .title") == "reward_mean by step"
    assert page.locator("#curve-chart svg path.curve").count() == 1


def test_browser_playground_streams_an_answer(page, ui_url):
    page.goto(ui_url + "/#playground")
    page.wait_for_function("document.getElementById('model').options.length > 0")
    page.fill("#prompt", "the quick brown")
    page.fill("#max-tokens", "16")
    page.fill("#temperature", "0")
    page.click("#send")
    page.wait_for_function("document.getElementById('answer').dataset.state === 'done'")
    assert page.inner_text("#answer").strip()
    assert int(page.get_attribute("#answer", "data-chunks")) > 1  # appended piece by piece as it streamed
    assert page.is_hidden("#play-error")
    assert "finish reason" in page.inner_text("#play-stats")
    _shot(page, "ui_playground.png")


def test_browser_empty_project_and_model_server_down(page, tmp_path):
    store = RunStore.for_project(tmp_path)
    with running(create_ui_app(store, model_url=f"http://127.0.0.1:{_free_port()}")) as url:
        page.goto(url)
        page.wait_for_selector("#runs-message:not([hidden])")
        assert page.inner_text("#runs-message").startswith("No runs yet")
        page.click("nav a[data-view=playground]")
        page.wait_for_selector("#model-status.error")
        page.fill("#prompt", "hello")
        page.click("#send")
        page.wait_for_selector("#play-error:not([hidden])")
        assert "is not reachable" in page.inner_text("#play-error")
        _shot(page, "ui_playground_error.png")
        page.click("nav a[data-view=runs]")  # the rest of the page still works
        page.wait_for_selector("#view-runs:not([hidden]) #runs-message:not([hidden])")


def test_foreign_hosts_and_cross_origin_posts_are_refused(tmp_path):
    """DNS rebinding (a foreign Host reading the runs) and a web page posting to the playground (which
    relays with the dashboard's API key) are refused before any handler runs."""
    app = create_ui_app(RunStore.for_project(tmp_path), model_url=f"http://127.0.0.1:{_free_port()}",
                        allowed_hosts=["dash.internal"])
    with TestClient(app, base_url="http://evil.example:8765") as client:
        r = client.get("/api/runs")
        assert r.status_code == 403 and "Host 'evil.example:8765'" in r.json()["error"]
    with TestClient(app, base_url="http://dash.internal:8765") as client:  # an allowed name
        assert client.get("/api/runs").status_code == 200
    with local_client(app) as client:
        body = '{"prompt": "hello"}'
        for headers, status in (({"Origin": "http://evil.example", "Content-Type": "text/plain"}, 403),
                                ({"Origin": "http://127.0.0.1:9999", "Content-Type": "application/json"}, 403),
                                ({"Origin": LOCAL, "Content-Type": "text/plain"}, 415)):
            r = client.post("/api/playground", content=body, headers=headers)
            assert r.status_code == status, (headers, r.text)
        no_origin = TestClient(app, base_url=LOCAL).post("/api/playground", json={"prompt": "hello"})
        assert no_origin.status_code == 403 and "cross-origin" in no_origin.json()["error"]
        # its own page passes (and meets the unreachable model server)
        assert client.post("/api/playground", json={"prompt": "hello"}).status_code == 502
