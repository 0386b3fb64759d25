"""Data-parallel evaluation: `torchrun --nproc_per_node 2 -m llmcycle eval` on CPU (gloo) splits the batches
between the processes and gathers them in the data's order; the outputs and metrics equal one process's,
and rank 0 alone records the run."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from test_evaluate import make_project

pytestmark = pytest.mark.slow
METRICS = ("rouge1", "rouge2", "rougeL", "headline_value", "n_examples", "hallucinated_entity_rate")


def torchrun():
    path = Path(sys.executable).with_name("torchrun")
    if not path.exists():
        pytest.skip("torchrun is not installed next to this Python")
    return str(path)


def runs(project) -> list[dict]:
    out = subprocess.run([sys.executable, "-m", "llmcycle", "runs", "list", "-p", str(project), "--json"],
                         capture_output=True, text=True, check=True).stdout
    return json.loads(out)


def predictions(root: Path, run_id: str) -> list[dict]:
    rows = [json.loads(line) for line in (root / "runs" / run_id / "artifacts/predictions.jsonl").read_text()
            .splitlines()]
    return [{k: v for k, v in r.items() if k not in ("latency_s",)} for r in rows]


@pytest.mark.parametrize("model", ["t5", "gpt2"])
def test_two_processes_give_one_process_outputs_and_metrics(tmp_path, model):
    project = make_project(tmp_path, model=model)
    args = ["-m", "llmcycle", "eval", "-p", str(project), "--json", "--set", "evaluate.generation.batch_size=2"]
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    two = subprocess.run([torchrun(), "--standalone", "--nproc_per_node", "2", *args], capture_output=True, text=True,
                         timeout=300, env=env)
    assert two.returncode == 0, two.stderr[-3000:]
    one = subprocess.run([sys.executable, *args], capture_output=True, text=True, timeout=300, env=env)
    assert one.returncode == 0, one.stderr[-3000:]
    a, b = json.loads(two.stdout), json.loads(one.stdout)  # rank 0 alone printed its JSON
    for key in METRICS:
        assert a[key] == b[key], key
    recorded = runs(project)
    assert len(recorded) == 2 and {r["stage"] for r in recorded} == {"eval"}  # one run per launch
    assert predictions(tmp_path, a["run_id"]) == predictions(tmp_path, b["run_id"])
    assert len(predictions(tmp_path, a["run_id"])) == 6
