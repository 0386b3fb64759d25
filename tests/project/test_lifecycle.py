"""`llmcycle run` and `llmcycle pretrain` end to end on a tiny project, including kill -9 and --resume."""
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from llmcycle.project.config import load_project
from llmcycle.project.lifecycle import content_hash, plan_stages, variants
from llmcycle.core.errors import UserError

PRETRAIN = """pretrain:
  tiny:
    architecture: {arch}
    d_model: 32
    n_layers: 1
    n_heads: 2
    d_ff: 64
    vocab_size: 300
    seq_len: 32
    batch_size: 4
    lr: 3e-3
    warmup_steps: 2
    max_steps: {steps}
    checkpoint_every: {every}
    log_every: 5
"""


def make_project(root: Path, arch="t5", steps=20, every=10) -> Path:
    root.mkdir(parents=True, exist_ok=True)
    rows = [{"text": f"the {c} cat number {i} sat on the mat and looked at dog {i % 7}",
             "summary": f"cat {i} sat"} for i, c in enumerate(["red", "blue", "green", "grey"] * 15)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (root / "llmcycle.yaml").write_text("""project: {name: tiny, task: summarization}
scope: {use_case: lifecycle test}
data: {train: train.jsonl, input: text, target: summary, eval_size: 5}
model: {name: "run:pretrain/tiny"}
""" + PRETRAIN.format(arch=arch, steps=steps, every=every))
    return root / "llmcycle.yaml"


def cli(*args, cwd=None, check=True):
    proc = subprocess.run([sys.executable, "-m", "llmcycle", *args], capture_output=True, text=True,
                          cwd=cwd, timeout=600)
    if check:
        assert proc.returncode == 0, proc.stderr
    return proc


def test_stage_selection():
    assert plan_stages() == ["scope", "pretrain", "select", "prompt", "tune", "align", "optimize"]
    assert plan_stages(only=["pretrain"]) == ["pretrain"]
    assert plan_stages(start="align") == ["align", "optimize"]
    with pytest.raises(UserError, match="did you mean 'scope'"):
        plan_stages(only=["scoep"])


def test_content_hash_follows_config_and_data(tmp_path):
    path = make_project(tmp_path)
    project = load_project(path)
    cfg = variants(project, "pretrain")["tiny"]
    h = content_hash(project, "pretrain", "tiny", cfg)
    assert h == content_hash(load_project(path), "pretrain", "tiny", cfg)
    changed = load_project(path, ["pretrain.tiny.lr=1e-3"])
    assert content_hash(changed, "pretrain", "tiny", variants(changed, "pretrain")["tiny"]) != h
    with open(tmp_path / "train.jsonl", "a") as fh:
        fh.write(json.dumps({"text": "new", "summary": "new"}) + "\n")
    assert content_hash(load_project(path), "pretrain", "tiny", cfg) != h


@pytest.mark.parametrize("arch", ["t5", "gpt"])
def test_run_pretrains_then_the_model_loads_and_scope_uses_it(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    path = make_project(tmp_path, arch=arch)
    out = json.loads(cli("run", "-p", str(path), "--json").stdout)["runs"]
    assert [(r["stage"], r["status"]) for r in out] == [("scope", "completed"), ("pretrain", "completed")]
    summary = out[1]["summary"]
    assert summary["steps"] == 20 and summary["padding_fraction"] == 0.0
    model_dir = Path(summary["model_dir"])
    cls = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    model, tok = cls.from_pretrained(model_dir), AutoTokenizer.from_pretrained(model_dir)
    assert model.num_parameters() == summary["parameters"]
    assert tok.decode(tok("the cat sat", add_special_tokens=False)["input_ids"]).strip() == "the cat sat"
    # loss curve recorded in the run store
    metrics = [json.loads(l) for l in (model_dir.parents[1] / "metrics.jsonl").read_text().splitlines()]
    assert [m["step"] for m in metrics] == [5, 10, 15, 20]
    # the scope plan now sees the pretrained model (run:pretrain/tiny resolves)
    plan = json.loads(cli("scope", "-p", str(path), "--json").stdout)
    assert plan["model"]["parameters"] == summary["parameters"]
    assert plan["data"]["token_stats"]["train"]["input"]["count"] == 55
    # unchanged: the second run skips both stages, a changed key reruns pretrain only
    again = json.loads(cli("run", "-p", str(path), "--json").stdout)["runs"]
    assert [r["status"] for r in again] == ["skipped", "skipped"]
    changed = json.loads(cli("run", "-p", str(path), "--only", "pretrain", "--set",
                             "pretrain.tiny.lr=1e-3", "--json").stdout)["runs"]
    assert [(r["stage"], r["status"]) for r in changed] == [("pretrain", "completed")]


def _weights(model_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "model.safetensors"))


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    import torch

    steps, every = 300, 20
    straight = make_project(tmp_path / "straight", steps=steps, every=every)
    done = json.loads(cli("pretrain", "-p", str(straight), "--json").stdout)[0]["summary"]

    path = make_project(tmp_path / "killed", steps=steps, every=every)
    proc = subprocess.Popen([sys.executable, "-m", "llmcycle", "pretrain", "-p", str(path), "--json"],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if list((tmp_path / "killed" / "runs").glob("pretrain-*/artifacts/checkpoints/step-*/COMPLETE")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    runs = json.loads(cli("runs", "list", "-p", str(path), "--json").stdout)
    assert [r["status"] for r in runs] == ["incomplete"], "the run must be killed mid-way"

    resumed = json.loads(cli("pretrain", "-p", str(path), "--resume", "--json").stdout)[0]
    assert resumed["run_id"] == runs[0]["id"] and resumed["summary"]["resumed_from"]
    assert resumed["summary"]["final_loss"] == pytest.approx(done["final_loss"], abs=1e-5)
    a, b = _weights(Path(done["model_dir"])), _weights(Path(resumed["summary"]["model_dir"]))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    assert json.loads(cli("runs", "show", runs[0]["id"], "-p", str(path), "--json").stdout)["status"] == "completed"


def test_resume_errors(tmp_path):
    path = make_project(tmp_path, steps=10, every=5)
    proc = cli("pretrain", "-p", str(path), "--resume", check=False)
    assert proc.returncode == 2 and "nothing to resume" in proc.stderr
    # a failed run with a corrupt checkpoint: one-line error naming the checkpoint
    cli("pretrain", "-p", str(path))
    project = load_project(path)
    store = project.store()
    rec = store.list("pretrain")[0]
    from llmcycle.training.checkpoints import latest_checkpoint

    newest = latest_checkpoint(rec.artifacts / "checkpoints")
    assert newest.name == "step-10"
    for f in newest.iterdir():
        if f.suffix in (".safetensors", ".pt", ".bin"):
            f.write_bytes(b"garbage")
    # mark the run unfinished as a kill would have left it
    data = json.loads((rec.dir / "run.json").read_text())
    data["status"] = "failed"
    (rec.dir / "run.json").write_text(json.dumps(data))
    proc = cli("pretrain", "-p", str(path), "--resume", check=False)
    assert proc.returncode == 2 and "corrupt checkpoint" in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    # the model the run had written is still there
    assert (rec.artifacts / "model" / "config.json").exists()
