"""Endpoint evaluation: `llmcycle eval --endpoint` against `llmcycle serve`, concurrency 1 vs 16.

A t5-small-shaped model (random weights, its tokenizer trained on DialogSum, briefly trained so that
outputs vary in length; eval_throughput.py builds it) is served by `llmcycle serve` (its project's
template, dynamic batching of up to 16 requests) in its own process. The same project is then
evaluated through the endpoint, each time from the CLI in a fresh process as a user runs it:

    llmcycle eval --endpoint URL --model bench --concurrency 1
    llmcycle eval --endpoint URL --model bench --concurrency 16

on the first --n DialogSum dev dialogues whose prompt fits the 512-token window. Measured: examples/s
of each (the asking only: the summary's examples_per_s), their ratio (goal: >= 3x at 16), and whether
the greedy outputs and the headline metric are identical (they must be: the server batches requests
but generates each as alone, and eval asks for the same prompts). Runs c16, c1, c1, c16 on halves so a
drift in machine load cancels.

    .venv/bin/python benchmarks/endpoint_eval.py [--n 200] [--max-new-tokens 50] [--train-steps 30]

Prints exactly one JSON line. Without the data it prints a JSON line with "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

from eval_throughput import DEFAULT_DATA, TEMPLATE, build_model, read_jsonl  # noqa: E402
from serve_load import free_port, wait_until_healthy  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def env() -> dict:
    path = os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    return {**os.environ, "PYTHONPATH": path, "TRANSFORMERS_VERBOSITY": "error", "HF_HUB_DISABLE_PROGRESS_BARS": "1",
            "TOKENIZERS_PARALLELISM": "false"}


def start_server(project: Path, model_dir: Path):
    """`llmcycle serve --run MODEL -p PROJECT` on a free port, until it answers /health."""
    port = free_port()
    cmd = [sys.executable, "-m", "llmcycle", "serve", "--run", str(model_dir), "-p", str(project), "--port", str(port)]
    proc = subprocess.Popen(cmd, env=env(), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url, 180)
    return proc, url


def endpoint_eval(project: Path, url: str, model: str, concurrency: int, data: Path) -> tuple[dict, dict]:
    """`llmcycle eval --endpoint` in a fresh process: (its JSON summary, its outputs by example)."""
    cmd = [sys.executable, "-m", "llmcycle", "eval", "-p", str(project), "--endpoint", f"{url}/v1", "--model", model,
           "--concurrency", str(concurrency), "--data", str(data), "--json"]
    done = subprocess.run(cmd, env=env(), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"llmcycle eval --endpoint failed ({done.returncode}): {done.stderr.strip()[-500:]}")
    summary = json.loads(done.stdout)
    rows = read_jsonl(project / "runs" / summary["run_id"] / "artifacts" / "predictions.jsonl")
    return summary, {r["where"].rsplit(":", 1)[-1]: r["prediction"] for r in rows}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="DialogSum dev JSONL")
    ap.add_argument("--n", type=int, default=200, help="first N dialogues whose prompt fits 512 tokens")
    ap.add_argument("--max-new-tokens", type=int, default=50)
    ap.add_argument("--vocab", type=int, default=32000)
    ap.add_argument("--train-steps", type=int, default=30, help="optimizer steps on dialogue->summary (batch 8)")
    ap.add_argument("--train-lr", type=float, default=1e-3)
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    if not args.data.is_file():
        print(json.dumps({"benchmark": "endpoint_eval", "skipped": f"data not found: {args.data}"}))
        return 0
    os.environ.update({k: v for k, v in env().items() if k != "PYTHONPATH"})
    from transformers import AutoTokenizer

    records = read_jsonl(args.data)
    train_file = args.data.with_name("dialogsum.train.jsonl")
    pairs = read_jsonl(train_file) if train_file.is_file() else records
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        facts = build_model(args, [r["dialogue"] for r in pairs] + [r["summary"] for r in pairs], pairs, tmp / "model")
        tok = AutoTokenizer.from_pretrained(tmp / "model")
        chosen, over = [], 0  # the first n that fit; the server would refuse the others as too long
        for r in records:
            if len(chosen) == args.n:
                break
            fits = len(tok(TEMPLATE.format(dialogue=r["dialogue"]))["input_ids"]) <= 512
            over += not fits
            chosen += [r] if fits else []
        halves = [chosen[: len(chosen) // 2], chosen[len(chosen) // 2:]]
        for i, part in enumerate(halves):
            with open(tmp / f"half{i}.jsonl", "w", encoding="utf-8") as fh:
                fh.writelines(json.dumps({"dialogue": r["dialogue"], "summary": r["summary"]}) + "\n" for r in part)
        gen = {"max_new_tokens": args.max_new_tokens}
        (tmp / "llmcycle.yaml").write_text(
            "project: {name: endpoint-eval, task: summarization}\n"
            "data: {eval: half0.jsonl, input: dialogue, target: summary}\n"
            f"evaluate:\n  template: {json.dumps(TEMPLATE)}\n  generation: {json.dumps(gen)}\n"
            "  perplexity: false\n", encoding="utf-8")
        proc, url = start_server(tmp, tmp / "model")
        try:
            endpoint_eval(tmp, url, str(tmp / "model"), 4, tmp / "half0.jsonl")  # warm-up, untimed
            load_before = os.getloadavg()
            asked = {1: 0.0, 16: 0.0}
            count = {1: 0, 16: 0}
            outputs = {1: {}, 16: {}}
            rouge = {1: [], 16: []}
            for concurrency, half in ((16, 0), (1, 0), (1, 1), (16, 1)):
                summary, outs = endpoint_eval(tmp, url, str(tmp / "model"), concurrency, tmp / f"half{half}.jsonl")
                asked[concurrency] += summary["generation_s"]
                count[concurrency] += summary["n_examples"]
                outputs[concurrency].update({f"{half}:{k}": v for k, v in outs.items()})
                rouge[concurrency].append((summary["n_examples"], summary["rougeL"]))
        finally:
            proc.terminate()
            proc.wait(30)
    rate = {c: count[c] / asked[c] for c in asked}
    mean = lambda parts: sum(n * v for n, v in parts) / sum(n for n, _ in parts)  # noqa: E731
    differ = sum(outputs[1][k] != outputs[16].get(k) for k in outputs[1])
    print(json.dumps({
        "benchmark": "endpoint_eval", "n": count[1], "left_out_over_window": over, "max_new_tokens": args.max_new_tokens, "model": facts,
        "examples_per_s": {"concurrency_1": round(rate[1], 3), "concurrency_16": round(rate[16], 3)},
        "ratio_16_vs_1": round(rate[16] / rate[1], 2), "goal_ratio": 3.0,
        "identical_outputs": differ == 0, "outputs_differ": differ,
        "rougeL": {"concurrency_1": round(mean(rouge[1]), 4), "concurrency_16": round(mean(rouge[16]), 4)},
        "load_avg_1m": {"before": round(load_before[0], 2), "after": round(os.getloadavg()[0], 2)},
    }))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
