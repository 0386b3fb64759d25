"""Text that looks like markup or drives a terminal, end to end: it enters through the data (inputs and
references) and through a model's outputs, goes through `eval`, `prompt`, `runs compare`, the report in
both formats and the dashboard, and must come out literally everywhere (control characters as symbols).

The model is a tiny GPT-2 made to repeat one added token whatever it reads, so its outputs are known to
hold `[/INST]`, `[bold]`, `<script>` and an escape sequence."""
from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from llmcycle.core.textsafe import visible
from tiny import make_gpt2

DATA_TEXT = ("[INST] Anna asks [/INST] [bold]loud[/bold] [link=http://x]x[/link] \x1b[31mred\x1b[0m "
             "\x1b]0;pwned\x07 <script>alert(1)</script>")
REFERENCE = "[/INST] ref \x1b[2J <img src=x onerror=alert(2)>"
SAID = "[/INST][bold]b[/bold]<script>alert(3)</script>\x1b[32mgreen"  # what the model says
LITERALS = ("[INST] Anna asks [/INST]", "[bold]loud[/bold]", "[link=http://x]x[/link]", "\u241b[31mred",
            "\u241b]0;pwned\u2407", "[/INST] ref \u241b[2J", "[/INST][bold]b[/bold]", "\u241b[32mgreen")


def make_parrot(dir: Path) -> Path:
    """A GPT-2 whose every next token is SAID (one added token): the final layer norm sends every
    position to one vector, and only SAID's (tied) embedding row points along it."""
    import torch
    from transformers import AutoTokenizer, GPT2LMHeadModel

    make_gpt2(dir)
    tok = AutoTokenizer.from_pretrained(dir)
    tok.add_tokens([SAID])
    model = GPT2LMHeadModel.from_pretrained(dir)
    model.resize_token_embeddings(len(tok))
    with torch.no_grad():
        direction = torch.ones(model.config.n_embd)
        model.transformer.ln_f.weight.zero_()
        model.transformer.ln_f.bias.copy_(direction)
        model.transformer.wte.weight[tok.convert_tokens_to_ids(SAID)] = 10 * direction
    model.save_pretrained(dir)
    tok.save_pretrained(dir)
    return dir


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A project whose data and model outputs are hostile text, with an eval and a prompt run."""
    root = tmp_path_factory.mktemp("hostile")
    make_parrot(root / "parrot")
    rows = [{"text": f"{DATA_TEXT} {i}", "summary": REFERENCE} for i in range(8)]
    (root / "data.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "llmcycle.yaml").write_text(
        "project: {name: hostile, task: summarization}\n"
        "data: {train: data.jsonl, input: text, target: summary, eval_size: 3}\n"
        "model: {name: parrot}\n"
        'evaluate: {template: "{input} ->", generation: {max_new_tokens: 2}, show_examples: 1}\n'
        "prompt: {templates: {plain: \"{input} ->\"}}\n")
    shown = {"eval": cli(root, "eval"), "prompt": cli(root, "prompt")}
    runs = json.loads(cli(root, "runs", "list", "--json"))
    ids = {r["stage"]: r["id"] for r in runs}
    assert set(ids) == {"eval", "prompt"} and all(r["status"] == "completed" for r in runs), runs
    shown["compare"] = cli(root, "runs", "compare", ids["eval"], ids["prompt"])
    return root, ids, shown


def cli(root: Path, *args: str) -> str:
    """stdout of the real CLI, as wide as a terminal can be, so no cell is cut or wrapped."""
    proc = subprocess.run([sys.executable, "-m", "llmcycle", *args, "-p", str(root / "llmcycle.yaml")],
                          capture_output=True, text=True, timeout=300, env={**os.environ, "COLUMNS": "400"})
    assert proc.returncode == 0, proc.stderr  # `[/INST]` made this an internal error (MarkupError) before
    return proc.stdout


def test_the_model_really_says_hostile_text(hostile):
    root, ids, _ = hostile
    rows = [json.loads(line) for line in
            (root / "runs" / ids["eval"] / "artifacts" / "predictions.jsonl").read_text().splitlines()]
    assert rows and all(r["prediction"].startswith(SAID) for r in rows)
    assert all(r["input"].startswith(DATA_TEXT) for r in rows)


@pytest.mark.parametrize("command", ["eval", "prompt", "compare"])
def test_the_terminal_shows_it_literally(hostile, command):
    _, _, shown = hostile
    text = shown[command]
    assert "\x1b" not in text and "\x07" not in text  # nothing reaches the terminal as a control
    for literal in LITERALS:
        assert literal in text, (command, literal)
    assert "<script>alert(1)</script>" in text and "<script>alert(3)</script>" in text  # as text, nothing lost


@pytest.mark.parametrize("fmt", ["html", "md"])
def test_the_report_shows_it_literally(hostile, fmt):
    root, _, _ = hostile
    out = root / f"report.{fmt}"
    cli(root, "report", "-o", str(out))
    text = out.read_text()
    assert "\x1b" not in text and "\x07" not in text
    assert "<script>alert" not in text and "<img src=x" not in text  # no element from data or outputs
    if fmt == "html":  # (an invented number, such as 32 in the model's escape sequence, is <mark>ed)
        plain = text.replace("<mark>", "").replace("</mark>", "")
        for literal in (*LITERALS, "&lt;script&gt;alert(3)&lt;/script&gt;"):
            assert literal in plain, literal
    else:  # Markdown punctuation escaped too: a viewer shows `[/INST]`, not a link or a bracketed span
        for literal in ("\\[INST\\] Anna asks \\[/INST\\]", "\\[link=http://x\\]x\\[/link\\]",
                        "\u241b\\[31mred", "&lt;script&gt;alert\\(3\\)&lt;/script&gt;\u241b\\[**32**mgreen"):
            assert literal in text, literal


def test_the_dashboard_api_carries_it_unchanged(hostile):
    pytest.importorskip("fastapi")
    from fastapi.testclient import TestClient

    from llmcycle.core.store import RunStore
    from llmcycle.ui.app import create_ui_app

    root, ids, _ = hostile
    client = TestClient(create_ui_app(RunStore.for_project(root)), base_url="http://127.0.0.1:8765")
    data = client.get(f"/api/compare?ids={ids['eval']},{ids['prompt']}&examples=1").json()
    example = data["examples"][0]
    assert example["input"].startswith(DATA_TEXT) and example["references"] == [REFERENCE]
    assert all(out.startswith(SAID) for out in example["outputs"].values())


def test_the_page_shows_it_literally(hostile, browser):
    from servers import running

    from llmcycle.core.store import RunStore
    from llmcycle.ui.app import create_ui_app

    root, ids, _ = hostile
    with running(create_ui_app(RunStore.for_project(root))) as url:
        page = browser.new_page()
        alerts = []
        page.on("dialog", lambda d: (alerts.append(d.message), d.dismiss()))
        page.goto(f"{url}/#compare?ids={ids['eval']},{ids['prompt']}")
        page.wait_for_function(
            f"document.getElementById('view-compare').dataset.loaded === '{ids['eval']},{ids['prompt']}'")
        shown = page.inner_text("#examples")
        scripts = page.eval_on_selector_all("script", "nodes => nodes.map(n => n.getAttribute('src'))")
        images = page.locator("#examples img").count()
        page.close()
    assert not alerts and images == 0 and all(src and src.startswith("/static/") for src in scripts)
    assert "\x1b" not in shown
    for literal in (*LITERALS, "<script>alert(1)</script>", "<script>alert(3)</script>"):
        assert literal in shown, literal


def test_textsafe_js_matches_textsafe_py():
    """The page's TextSafe.visible (textsafe.js) shows control characters as textsafe.py does."""
    import shutil

    node = shutil.which("node")
    if node is None:
        pytest.skip("node is not installed: the page's textsafe.js is checked in the browser test only")
    from llmcycle.ui.app import STATIC

    sample = DATA_TEXT + SAID + "\x00\x7f\x85\x9b\t\n"
    script = (f"const T = require({json.dumps(str(STATIC / 'textsafe.js'))});"
              f"process.stdout.write(JSON.stringify(T.visible({json.dumps(sample)})));")
    got = json.loads(subprocess.run([node, "-e", script], capture_output=True, text=True, check=True).stdout)
    assert got == visible(sample)
