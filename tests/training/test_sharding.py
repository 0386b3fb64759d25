"""FSDP2-sharded training (llmcycle/training/sharding.py) under torchrun on CPU (gloo): the same losses and
weights as one process, each rank holding half of every weight and of the optimizer state, sharded
checkpoints that resume on another number of processes, two "nodes" launched through the CLI, and a rank
that dies making the others stop with one clear line.

Why the tolerances: one process and two sum the same token losses in another order; losses agree to
~1e-6 and weights to ~1e-5 (Adam turns last-bit gradient differences into small step differences).
"""
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

TUNE_DRIVER = """
import json, os, sys
from pathlib import Path
import torch
from llmcycle.data.records import Example
from llmcycle.training.finetune import TuneConfig
from llmcycle.training.loop import fit

out, base, method, strategy, resume = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4], sys.argv[5] == "1"
words = ["red", "blue", "green", "grey", "cat", "dog", "sun", "sea", "sky"]
# 9 examples in batches of 4: the last batch has one row, so one process joins with a zero-weight row
examples = [Example(f"{w} is number {i} " + "x " * (i % 4), [w], {}, f"row {i}") for i, w in enumerate(words)]
logged = []
cfg = TuneConfig(method=method, max_steps=6, lr=1e-2, batch_size=4, grad_accum=2, log_every=1, dropout=0.0,
                 checkpoint_every=3, r=4,
                 parallelism={"strategy": strategy, "shard_size": int(os.environ.get("SHARD_SIZE", 0)) or None})
trained = fit(cfg, base, examples, examples[:2], "{input} ->", out / "work", log=logged.append, progress=False,
              resume=resume)
tag = f"{strategy}-w{trained.summary['world_size']}-r{os.environ.get('RANK', 0)}"
params = {k: v.detach().clone() for k, v in trained.model.named_parameters() if v.requires_grad}
assert all(type(v) is torch.Tensor for v in params.values())  # the returned model is whole, not sharded
torch.save(params, out / f"params-{tag}.pt")
(out / f"log-{tag}.json").write_text(json.dumps(logged))
(out / f"summary-{tag}.json").write_text(json.dumps(trained.summary, default=str))
"""

PRETRAIN_DRIVER = """
import json, os, sys
from pathlib import Path
from llmcycle.stages.pretrain.stage import PretrainConfig, train

out, arch, strategy, resume = Path(sys.argv[1]), sys.argv[2], sys.argv[3], sys.argv[4] == "1"
texts = [f"document {i} says the {w} fox jumps over {i % 7} lazy dogs and the sea is {w}"
         for i, w in enumerate(["red", "blue", "green", "grey", "calm", "wild"] * 6)]
logged = []
cfg = PretrainConfig(architecture=arch, vocab_size=300, seq_len=32, batch_size=6, max_steps=6, warmup_steps=1,
                     dropout=0.0, checkpoint_every=3, log_every=1, parallelism={"strategy": strategy})
summary = train(cfg, texts, out / "work", log=logged.append, progress=False, resume=resume)
tag = f"{strategy}-w{os.environ.get('WORLD_SIZE', 1)}-r{os.environ.get('RANK', 0)}"
(out / f"log-{tag}.json").write_text(json.dumps(logged))
(out / f"summary-{tag}.json").write_text(json.dumps(summary, default=str))
"""

ENV = {**os.environ, "OMP_NUM_THREADS": "1"}


def torchrun() -> str:
    path = Path(sys.executable).with_name("torchrun")
    if not path.exists():
        pytest.skip("torchrun is not installed next to this Python")
    return str(path)


def launch(tmp_path, driver: str, args: list[str], procs: int | None, **env) -> subprocess.CompletedProcess:
    """The driver under torchrun with `procs` processes, or as one plain process (procs None)."""
    script = tmp_path / "driver.py"
    script.write_text(driver)
    head = [torchrun(), "--standalone", "--nproc_per_node", str(procs)] if procs else [sys.executable]
    proc = subprocess.run([*head, str(script), *args], env={**ENV, **env}, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def read(tmp_path, kind: str, tag: str):
    return json.loads((tmp_path / f"{kind}-{tag}.json").read_text())


def same_losses(a: list[dict], b: list[dict]) -> None:
    assert [r["step"] for r in a] == [r["step"] for r in b] and a
    for x, y in zip(a, b):
        assert x["loss"] == pytest.approx(y["loss"], abs=1e-5), (x["step"], x["loss"], y["loss"])


def test_launch_checks_refuse_what_sharding_cannot_do(monkeypatch):
    from llmcycle.core.errors import UserError
    from llmcycle.training.finetune import TuneConfig
    from llmcycle.training.sharding import check_launch

    monkeypatch.delenv("RANK", raising=False)
    with pytest.raises(UserError, match=r"tune.parallelism.strategy: fsdp .*torchrun --nproc_per_node N"):
        check_launch(TuneConfig(method="full", max_steps=1, parallelism={"strategy": "fsdp"}), "tune", "full")
    check_launch(TuneConfig(method="full", max_steps=1), "tune", "full")  # ddp needs nothing
    monkeypatch.setenv("RANK", "0")
    monkeypatch.setenv("WORLD_SIZE", "2")
    fsdp = lambda method, **extra: TuneConfig(method=method, max_steps=1,  # noqa: E731
                                              parallelism={"strategy": "fsdp", **extra})
    with pytest.raises(UserError, match="shard_size: 3 does not divide the 2 processes"):
        check_launch(fsdp("full", shard_size=3), "tune", "full")
    with pytest.raises(UserError, match="not method prompt_tuning"):
        check_launch(fsdp("prompt_tuning"), "tune", "prompt_tuning")
    check_launch(fsdp("lora", shard_size=1), "tune", "lora")


@pytest.mark.slow
@pytest.mark.parametrize("model,method,shard_size", [("t5", "full", 2), ("llama", "full", 2), ("llama", "lora", 2),
                                                     ("t5", "lora", 1)])
def test_fsdp_tune_gives_one_process_losses_with_half_of_everything_per_rank(tmp_path, model, method, shard_size):
    """shard_size 1 of 2 processes: HSDP's replicated groups of one, each rank holding everything."""
    import torch

    from tiny import make_chat_model, make_t5

    base = make_t5(tmp_path / "base") if model == "t5" else make_chat_model(tmp_path / "base", "llama3")
    launch(tmp_path, TUNE_DRIVER, [str(tmp_path), str(base), method, "fsdp", "0"], 2, SHARD_SIZE=str(shard_size))
    launch(tmp_path, TUNE_DRIVER, [str(tmp_path), str(base), method, "ddp", "0"], None)

    same_losses(read(tmp_path, "log", "fsdp-w2-r0"), read(tmp_path, "log", "ddp-w1-r0"))
    assert read(tmp_path, "log", "fsdp-w2-r1") == []  # only rank 0 logs
    sharded, single = (torch.load(tmp_path / f"params-{t}.pt") for t in ("fsdp-w2-r0", "ddp-w1-r0"))
    other_rank = torch.load(tmp_path / "params-fsdp-w2-r1.pt")
    assert sharded.keys() == single.keys() == other_rank.keys() and sharded
    for name in sharded:
        assert torch.equal(sharded[name], other_rank[name]), name  # gathered whole on every rank
        assert torch.allclose(sharded[name], single[name], atol=1e-4), name
    facts = read(tmp_path, "summary", "fsdp-w2-r0")["parallelism"]
    trainable = read(tmp_path, "summary", "fsdp-w2-r0")["trainable_params"]
    assert facts["strategy"] == "fsdp" and facts["world_size"] == 2 and facts["shard_size"] == shard_size
    # each rank holds 1/shard_size of every weight (dim 0 split, padded by at most a row per tensor)
    share = facts["params"] / shard_size
    assert share <= facts["rank0_params"] <= share * 1.04
    # AdamW's two moments of the trainable weights, split the same way
    assert 2 * trainable / shard_size <= facts["rank0_optimizer_state"] <= 2 * trainable / shard_size * 1.04


@pytest.mark.slow
@pytest.mark.parametrize("method", ["full", "lora"])
def test_sharded_checkpoints_resume_on_another_number_of_processes(tmp_path, method):
    from tiny import make_gpt2

    base = make_gpt2(tmp_path / "base")
    ckpts = tmp_path / "work" / "checkpoints"
    args = lambda strategy, resume: [str(tmp_path), str(base), method, strategy, resume]  # noqa: E731
    launch(tmp_path, TUNE_DRIVER, args("fsdp", "0"), 2)
    reference = read(tmp_path, "log", "fsdp-w2-r0")
    assert sorted(p.name for p in (ckpts / "step-6").iterdir()) == ["COMPLETE", "dcp", "state.json",
                                                                    "trainer_state.pt"]
    assert {p.name for p in (ckpts / "step-6" / "dcp").iterdir()} >= {"__0_0.distcp", "__1_0.distcp", ".metadata"}

    # 2 -> 1: a plain process resumes the sharded step-3; a save killed half-way (its temporary folder)
    # is cleared, never read
    shutil.rmtree(ckpts / "step-6")
    (ckpts / ".tmp-step-6-sharded" / "dcp").mkdir(parents=True)
    (ckpts / ".tmp-step-6-sharded" / "dcp" / "__0_0.distcp").write_bytes(b"cut short")
    launch(tmp_path, TUNE_DRIVER, args("ddp", "1"), None)
    same_losses(read(tmp_path, "log", "ddp-w1-r0"), reference[3:])
    assert not (ckpts / ".tmp-step-6-sharded").exists()
    assert (ckpts / "step-6" / "model").is_dir()  # an unsharded run writes an ordinary checkpoint

    # 1 -> 2: two sharded processes resume the unsharded step-3
    shutil.rmtree(ckpts / "step-6")
    launch(tmp_path, TUNE_DRIVER, args("fsdp", "1"), 2)
    same_losses(read(tmp_path, "log", "fsdp-w2-r0"), reference[3:])
    summary = read(tmp_path, "summary", "fsdp-w2-r0")
    assert summary["resumed_from"]["step"] == 3 and summary["steps"] == 6


@pytest.mark.slow
def test_a_sharded_checkpoint_of_another_model_is_refused_in_one_line(tmp_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    from tiny import make_gpt2

    base = make_gpt2(tmp_path / "base")
    launch(tmp_path, TUNE_DRIVER, [str(tmp_path), str(base), "full", "fsdp", "0"], 2)
    shutil.rmtree(tmp_path / "work" / "checkpoints" / "step-6")
    config = GPT2Config.from_pretrained(str(base))
    config.n_embd = 32  # the same folder, tokenizer and data; wider weights
    GPT2LMHeadModel(config).save_pretrained(str(base))
    script = tmp_path / "driver.py"
    proc = subprocess.run([torchrun(), "--standalone", "--nproc_per_node", "2", str(script), str(tmp_path),
                           str(base), "full", "fsdp", "1"], env=ENV, capture_output=True, text=True, timeout=300)
    assert proc.returncode != 0
    assert "its sharded weights do not fit this model" in proc.stderr and "step-3" in proc.stderr


@pytest.mark.slow
@pytest.mark.parametrize("arch", ["gpt", "t5"])
def test_pretrain_shards_and_resumes_with_one_process_losses(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    launch(tmp_path, PRETRAIN_DRIVER, [str(tmp_path), arch, "fsdp", "0"], 2)
    launch(tmp_path, PRETRAIN_DRIVER, [str(tmp_path), arch, "ddp", "0"], None)  # clears the checkpoints
    single = read(tmp_path, "log", "ddp-w1-r0")
    same_losses(read(tmp_path, "log", "fsdp-w2-r0"), single)
    facts = read(tmp_path, "summary", "fsdp-w2-r0")["parallelism"]
    assert facts["params"] / 2 <= facts["rank0_params"] <= facts["params"] * 0.52
    # 1 -> 2: the sharded processes resume the plain run's step-3 and end where it ended
    shutil.rmtree(tmp_path / "work" / "checkpoints" / "step-6")
    launch(tmp_path, PRETRAIN_DRIVER, [str(tmp_path), arch, "fsdp", "1"], 2)
    same_losses(read(tmp_path, "log", "fsdp-w2-r0"), single[3:])
    # the model gathered into one ordinary Hugging Face folder
    auto = AutoModelForCausalLM if arch == "gpt" else AutoModelForSeq2SeqLM
    assert sum(p.numel() for p in auto.from_pretrained(str(tmp_path / "work" / "model")).parameters()) \
        == facts["params"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_nodes(path: Path, args: list[str], env: dict) -> list[subprocess.Popen]:
    """Two torchrun agents, one process each, meeting at a c10d rendezvous on this machine: what two
    real nodes run (the first starts first, so it hosts the rendezvous store)."""
    port, agents = free_port(), []
    for node in range(2):
        agents.append(subprocess.Popen(
            [torchrun(), "--nnodes", "2", "--nproc_per_node", "1", "--rdzv-backend", "c10d", "--rdzv-endpoint",
             f"127.0.0.1:{port}", "--rdzv-id", f"llmcycle-test-{port}", "-m", "llmcycle", *args],
            cwd=path, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True))
        time.sleep(1.0 if node == 0 else 0)
    return agents


PROJECT_TUNE = ("tune:\n"
                "  one: {method: full, lr: 1e-3, batch_size: 4, max_steps: 4, checkpoint_every: 2, eval_every: 2,"
                " log_every: 1}\n"
                "  sharded: {method: full, lr: 1e-3, batch_size: 4, max_steps: 4, checkpoint_every: 2,"
                " eval_every: 2, log_every: 1, parallelism: {strategy: fsdp}}\n")


@pytest.mark.slow
def test_two_nodes_through_the_cli_record_one_sharded_run(tmp_path):
    """Two "nodes" train `tune.sharded` to one process's losses (its twin `tune.one`, unsharded); rank 0
    records one run whose model folder loads with from_pretrained and whose predictions equal `llmcycle
    eval` of that folder in one process."""
    from transformers import AutoModelForSeq2SeqLM

    sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
    from test_evaluate import make_project

    path = make_project(tmp_path, extra=PROJECT_TUNE)
    agents = two_nodes(tmp_path, ["tune", "-p", str(path), "--variant", "sharded", "--json"], ENV)
    outs = [a.communicate(timeout=300) for a in agents]
    assert [a.returncode for a in agents] == [0, 0], outs[0][1][-2000:] + outs[1][1][-2000:]
    outcome = next(json.loads(o)[0] for o, _ in outs if o.strip())
    assert sum("FSDP2 on 2 processes; rank 0 held" in err for _, err in outs) == 1  # said once, by rank 0
    assert outcome["status"] == "completed" and outcome["summary"]["world_size"] == 2
    facts = outcome["summary"]["parallelism"]
    assert facts["strategy"] == "fsdp" and facts["params"] / 2 <= facts["rank0_params"] <= facts["params"] * 0.52
    one = subprocess.run([sys.executable, "-m", "llmcycle", "tune", "-p", str(path), "--variant", "one", "--json"],
                         env=ENV, capture_output=True, text=True, timeout=300)
    assert one.returncode == 0, one.stderr[-2000:]
    runs = json.loads(subprocess.run([sys.executable, "-m", "llmcycle", "runs", "list", "-p", str(path), "--json"],
                                     capture_output=True, text=True, check=True).stdout)
    assert sorted((r["variant"], r["status"]) for r in runs) == [("one", "completed"), ("sharded", "completed")]
    by_variant = {r["variant"]: tmp_path / "runs" / r["id"] for r in runs}
    metrics = {v: [json.loads(line) for line in (d / "metrics.jsonl").read_text().splitlines()]
               for v, d in by_variant.items()}
    same_losses([m for m in metrics["sharded"] if "loss" in m], [m for m in metrics["one"] if "loss" in m])
    assert [m["step"] for m in metrics["sharded"] if "val_loss" in m] == [2, 4]
    assert (by_variant["sharded"] / "artifacts/checkpoints/step-4/dcp").is_dir()
    model_dir = by_variant["sharded"] / "artifacts/model"
    assert sum(p.numel() for p in AutoModelForSeq2SeqLM.from_pretrained(str(model_dir)).parameters()) \
        == facts["params"]
    evaluated = subprocess.run([sys.executable, "-m", "llmcycle", "eval", "-p", str(path), "--model",
                                "run:tune/sharded", "--json"], env=ENV, capture_output=True, text=True, timeout=300)
    assert evaluated.returncode == 0, evaluated.stderr[-2000:]
    predictions = lambda run_dir: [(r["where"], r["prediction"]) for r in map(json.loads, (  # noqa: E731
        run_dir / "artifacts/predictions.jsonl").read_text().splitlines())]
    assert predictions(by_variant["sharded"]) == predictions(tmp_path / "runs" / json.loads(evaluated.stdout)["run_id"])


def worker_of(agent: subprocess.Popen) -> int:
    children = Path(f"/proc/{agent.pid}/task/{agent.pid}/children").read_text().split()
    assert children, "the torchrun agent has no worker"
    return int(children[0])


@pytest.mark.slow
@pytest.mark.parametrize("how", ["killed", "hung"])
def test_a_rank_that_dies_or_hangs_stops_the_others_in_one_line(tmp_path, how):
    """Node 2's worker is killed (or stopped: alive but silent) mid-training: node 1's rank exits with one
    line naming what happened within the collective timeout, instead of hanging."""
    sys.path.insert(0, str(Path(__file__).parents[1] / "evaluation"))
    from test_evaluate import make_project

    path = make_project(tmp_path, model="gpt2", extra="tune:\n  long: {method: full, lr: 1e-3, batch_size: 4, "
                        "max_steps: 2000, checkpoint_every: 5000, log_every: 1, parallelism: {strategy: fsdp}}\n")
    agents = two_nodes(tmp_path, ["tune", "-p", str(path)], {**ENV, "LLMCYCLE_GATHER_TIMEOUT_S": "8"})
    try:
        deadline = time.time() + 180
        while time.time() < deadline and not any(
                len(p.read_text().splitlines()) >= 3 for p in (tmp_path / "runs").glob("*/metrics.jsonl")):
            time.sleep(0.5)
        os.kill(worker_of(agents[1]), signal.SIGKILL if how == "killed" else signal.SIGSTOP)
        stopped = time.time()
        _, err = agents[0].communicate(timeout=120)
        assert time.time() - stopped < 60
    finally:
        for agent in agents:
            with __import__("contextlib").suppress(ProcessLookupError):
                os.killpg(agent.pid, signal.SIGKILL)
    assert agents[0].returncode != 0
    line = next(x for x in err.splitlines() if x.startswith("error: rank 0"))
    assert "another of the 2 processes died or did not answer within 8 s" in line and "--resume" in line
