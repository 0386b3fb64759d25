"""Data-parallel fine-tuning: `torchrun --nproc_per_node 2` on CPU (gloo) gives both processes the same
weights after every step, and the same losses and weights as one process over the same global batches.

Why compare with one process rather than only with the mean of the two ranks' shard losses: tune_loop
divides each process's summed token loss by the token count of the whole global batch, so the logged
loss (an all_reduce of the sums) and the gradient (DDP's mean over processes, times the world size)
are by construction those of one process over the same batch; only the order of float additions
differs. Losses agree to ~1e-7. Weights agree to ~1e-5, not bit for bit: Adam divides each gradient by
its running RMS, which turns last-bit differences of near-zero gradients into small step differences.
"""
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

DRIVER = """
import json, os, sys
from pathlib import Path
import torch
from llmcycle.data.records import Example
from llmcycle.training.finetune import TuneConfig
from llmcycle.training.loop import fit

out, base = Path(sys.argv[1]), sys.argv[2]
rank = int(os.environ.get("RANK", 0))
words = ["red", "blue", "green", "grey", "cat", "dog", "sun", "sea", "sky"]
# 9 examples in batches of 4: the last batch has one row, so one process joins with a zero-weight row
examples = [Example(f"{w} is number {i} " + "x " * (i % 4), [w], {}, f"row {i}") for i, w in enumerate(words)]
logged = []
cfg = TuneConfig(method=sys.argv[3], max_steps=6, lr=1e-2, batch_size=4, grad_accum=2, log_every=1,
                 dropout=0.0, checkpoint_every=100)
trained = fit(cfg, base, examples, examples[:2], "{input} ->", out / f"work-{os.environ.get('WORLD_SIZE', 1)}",
              log=logged.append, progress=False)
tag = f"w{trained.summary['world_size']}-r{rank}"
trainable = {k: v.detach().clone() for k, v in trained.model.named_parameters() if v.requires_grad}
torch.save(trainable, out / f"params-{tag}.pt")
(out / f"log-{tag}.json").write_text(json.dumps(logged))
"""


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_two_processes_agree_with_each_other_and_with_one(tmp_path, method):
    import torch

    from tiny import make_gpt2

    torchrun = shutil.which("torchrun", path=str(Path(sys.executable).parent)) or shutil.which("torchrun")
    if torchrun is None:
        pytest.skip("torchrun is not installed next to this Python")
    base = make_gpt2(tmp_path / "base")
    (tmp_path / "driver.py").write_text(DRIVER)
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    args = [str(tmp_path / "driver.py"), str(tmp_path), str(base), method]
    ddp = subprocess.run([torchrun, "--standalone", "--nproc_per_node", "2", *args], env=env,
                         capture_output=True, text=True, timeout=300)
    assert ddp.returncode == 0, ddp.stderr[-3000:]
    one = subprocess.run([sys.executable, *args], env=env, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-3000:]

    r0, r1, single = (torch.load(tmp_path / f"params-{t}.pt") for t in ("w2-r0", "w2-r1", "w1-r0"))
    assert r0.keys() == r1.keys() == single.keys() and r0
    for name in r0:
        assert torch.equal(r0[name], r1[name]), name  # DDP keeps the processes identical
        assert torch.allclose(r0[name], single[name], atol=1e-4), name
    logs = {t: json.loads((tmp_path / f"log-{t}.json").read_text()) for t in ("w2-r0", "w2-r1", "w1-r0")}
    assert logs["w2-r1"] == []  # only rank 0 logs
    assert [r["step"] for r in logs["w2-r0"]] == [1, 2, 3, 4, 5, 6]
    for a, b in zip(logs["w2-r0"], logs["w1-r0"]):
        assert a["loss"] == pytest.approx(b["loss"], abs=1e-5) and a["epoch"] == b["epoch"]


@pytest.mark.slow
def test_torchrun_through_the_cli_records_one_run(tmp_path):
    """`torchrun -m llmcycle tune`: rank 0 records one run; the other rank trains without writing. Validation
    during training and the final evaluation are split between the ranks: the run's predictions equal
    one process's `llmcycle eval` of the saved model."""
    torchrun = Path(sys.executable).with_name("torchrun")
    if not torchrun.exists():
        pytest.skip("torchrun is not installed next to this Python")
    sys.path.insert(0, str(Path(__file__).parents[1]))
    from test_evaluate import make_project

    path = make_project(tmp_path, extra="tune:\n  lora: {method: lora, r: 4, lr: 1e-3, batch_size: 4, "
                                         "max_steps: 4, checkpoint_every: 2, eval_every: 2}\n")
    proc = subprocess.run([str(torchrun), "--standalone", "--nproc_per_node", "2", "-m", "llmcycle", "tune",
                           "-p", str(path), "--json"], capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-2000:]
    outcome = json.loads(proc.stdout)[0]
    assert outcome["status"] == "completed" and outcome["summary"]["world_size"] == 2
    runs = json.loads(subprocess.run([sys.executable, "-m", "llmcycle", "runs", "list", "-p", str(path), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert [(r["stage"], r["status"]) for r in runs] == [("tune", "completed")]
    assert (tmp_path / "runs" / runs[0]["id"] / "artifacts/model/adapter_config.json").exists()
    metrics = [json.loads(line) for line in (tmp_path / "runs" / runs[0]["id"] / "metrics.jsonl").read_text()
               .splitlines()]
    assert [m["step"] for m in metrics if "val_loss" in m] == [2, 4]
    one = subprocess.run([sys.executable, "-m", "llmcycle", "eval", "-p", str(path), "--model", "run:tune/lora",
                          "--json"], capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    read = lambda run_id: [(r["where"], r["prediction"]) for r in map(json.loads, (  # noqa: E731
        tmp_path / "runs" / run_id / "artifacts/predictions.jsonl").read_text().splitlines())]
    assert read(runs[0]["id"]) == read(json.loads(one.stdout)["run_id"])
    assert outcome["summary"]["rougeL"] == json.loads(one.stdout)["rougeL"]
