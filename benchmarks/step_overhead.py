"""Host overhead per fine-tuning step: the training loop of an earlier revision vs this checkout's.

With a tiny model on a CPU the forward and backward passes cost almost nothing, so the time of a step
is the loop's own host (Python) work: building batches, counting tokens, reading the loss back,
stepping the optimizer, logging. Both loops run the same `llmcycle.training.loop.fit` on the same
tiny GPT-2-shaped model (random weights, a byte-level BPE trained here), the same synthetic examples
and settings, each in its own process importing its own source tree (the baseline from
`git archive --baseline-rev`, default: the commit before the fast path), in rounds
baseline, current, current, baseline so that a drift in machine load cancels.

A step's time is (T(warm + n steps) - T(warm steps)) / n, each T the wall time of a whole fit() call:
setup (loading, encoding) is the same in both calls and cancels. Even a 74k-parameter model's forward
and backward take milliseconds of torch's own per-op dispatch on a CPU, so each worker also times the
model's forward + backward alone on batches of the same examples; a step minus that is the loop's own
overhead, the figure the goal is about (`ratio_loop_overhead`); `ratio_step` is the whole step's.
`--compile` also measures the current loop with compile: true (torch.compile of the step; it compiles
for a while first, outside the difference).

    .venv/bin/python benchmarks/step_overhead.py [--steps 200] [--rounds 2] [--baseline-rev REV] [--compile]

Prints exactly one JSON line.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tarfile
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
BASELINE_REV = "1b47ccc"  # the last commit with the loop that reads the loss back at every step

WORKER = r"""
import json, sys, time
from pathlib import Path

from llmcycle.data.records import Example
from llmcycle.training.finetune import TuneConfig
from llmcycle.training.loop import fit

model_dir, work, warm, steps, compile_ = sys.argv[1], Path(sys.argv[2]), int(sys.argv[3]), int(sys.argv[4]), sys.argv[5]
words = ["red", "blue", "green", "grey", "cat", "dog"]
train = [Example(f"{words[i % 6]} is here number {i} " + "and more " * (i % 7), [words[i % 6]], {}, f"row {i}")
         for i in range(256)]
held = train[:4]


def timed(n):
    opts = dict(method="full", max_steps=n, batch_size=4, lr=1e-3, log_every=50, checkpoint_every=10**6,
                eval_every=None, group_by_length=True)
    if compile_ != "default":
        opts["compile"] = compile_ == "on"
    cfg = TuneConfig(**opts)
    start = time.perf_counter()
    fit(cfg, model_dir, train, held, "{input} ->", work / f"w{n}", progress=False, device="cpu")
    return time.perf_counter() - start


def model_ms(n=200):
    # the model's own forward and backward (what a step cannot avoid) on the very batches fit trains on
    # (its encoding, its length-grouped order), timed alone: the rest of a step is the loop's
    import torch
    import torch.nn.functional as F
    from llmcycle.models.generation import target_end_id
    from llmcycle.training.batches import collate, encode_examples, length_grouped_batches
    from llmcycle.training.finetune import load_base

    model, tok = load_base(model_dir, TuneConfig(method="full", max_steps=1), device="cpu")
    model.train()
    end_id, _ = target_end_id(model, tok, "causal")
    feats = encode_examples(train, [f"{e.input} ->" for e in train], tok, "causal", 10**6, end_id=end_id).features
    order = length_grouped_batches([len(f["input_ids"]) for f in feats], 4, 42, 0)
    batches = [collate([feats[i] for i in b], tok.pad_token_id) for b in order]

    def step(b):
        logits = model(input_ids=b["input_ids"], attention_mask=b["attention_mask"]).logits[:, :-1]
        F.cross_entropy(logits.float().reshape(-1, logits.size(-1)), b["labels"][:, 1:].reshape(-1),
                        ignore_index=-100, reduction="sum").backward()
        model.zero_grad(set_to_none=True)
    for b in batches[:4]:
        step(b)
    start = time.perf_counter()
    for i in range(n):
        step(batches[i % len(batches)])
    return (time.perf_counter() - start) / n * 1000


timed(warm)  # imports, allocator, and with compile the compilation itself
t_short, t_long = timed(warm), timed(warm + steps)
print(json.dumps({"ms_per_step": (t_long - t_short) / steps * 1000, "model_ms": model_ms()}))
"""


def baseline_tree(rev: str, out: Path) -> Path:
    """The package as it was at `rev` (git archive), for the baseline process to import."""
    archive = out / "baseline.tar"
    subprocess.run(["git", "-C", str(ROOT), "archive", "--format=tar", "-o", str(archive), rev, "llmcycle"],
                   check=True)
    with tarfile.open(archive) as tar:
        tar.extractall(out / "baseline", filter="data")
    return out / "baseline"


def measure(tree: Path, model_dir: Path, work: Path, warm: int, steps: int, compile_: str) -> dict:
    env = {**os.environ, "PYTHONPATH": str(tree), "TRANSFORMERS_VERBOSITY": "error", "OMP_NUM_THREADS": "1",
           "TOKENIZERS_PARALLELISM": "false", "HF_HUB_DISABLE_PROGRESS_BARS": "1"}
    done = subprocess.run([sys.executable, "-c", WORKER, str(model_dir), str(work), str(warm), str(steps), compile_],
                          env=env, capture_output=True, text=True, cwd=work)
    if done.returncode != 0:
        raise SystemExit(f"the worker for {tree} failed: {done.stderr.strip()[-800:]}")
    return json.loads(done.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--steps", type=int, default=200, help="timed steps per measurement")
    ap.add_argument("--warm", type=int, default=20, help="steps of the shorter run")
    ap.add_argument("--rounds", type=int, default=2, help="rounds of baseline, current, current, baseline")
    ap.add_argument("--baseline-rev", default=BASELINE_REV)
    ap.add_argument("--compile", action="store_true", help="also time the current loop with compile: true")
    args = ap.parse_args()
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from serve_load import build_model  # a tiny GPT-2 with its own BPE tokenizer, random weights

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        facts = build_model(argparse.Namespace(arch="gpt", d_model=32, layers=2, vocab=1000), tmp / "model")
        trees = {"baseline": baseline_tree(args.baseline_rev, tmp), "current": ROOT}
        times = {"baseline": [], "current": [], "current_compiled": []}
        load_before = os.getloadavg()
        for r in range(args.rounds):
            for name in ("baseline", "current", "current", "baseline"):
                work = tmp / f"{name}-{r}-{len(times[name])}"
                work.mkdir()
                times[name].append(measure(trees[name], tmp / "model", work, args.warm, args.steps, "default"))
            if args.compile:
                work = tmp / f"compiled-{r}"
                work.mkdir()
                times["current_compiled"].append(measure(ROOT, tmp / "model", work, args.warm, args.steps, "on"))
    mean = {k: sum(m["ms_per_step"] for m in v) / len(v) for k, v in times.items() if v}
    # the model's forward + backward, timed alone in every worker process alike: the same work in both
    model = [m["model_ms"] for k in ("baseline", "current") for m in times[k]]
    model_ms = sum(model) / len(model)
    loop = {k: mean[k] - model_ms for k in ("baseline", "current")}
    result = {"benchmark": "step_overhead", "model": facts, "batch_size": 4, "steps": args.steps,
              "baseline_rev": args.baseline_rev,
              "ms_per_step": {k: round(v, 3) for k, v in mean.items()},
              "model_forward_backward_ms": round(model_ms, 3),
              "loop_overhead_ms": {k: round(v, 3) for k, v in loop.items()},
              "ratio_loop_overhead": round(loop["baseline"] / loop["current"], 2), "goal_ratio": 2.0,
              "ratio_step": round(mean["baseline"] / mean["current"], 2),
              "load_avg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)}}
    if "current_compiled" in mean:
        result["ratio_step_compiled"] = round(mean["baseline"] / mean["current_compiled"], 2)
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
