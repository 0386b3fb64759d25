"""Packing vs padding: useful (non-padding) tokens per second when pretraining on DialogSum.

Trains the same small model in one process with the same seed and one shared tokenizer, on
packed blocks (documents joined with EOS and cut into full blocks: no padding at all) and
on one example per dialogue, shuffled and padded to the longest in each batch. Both use the
real training loop (llmcycle.stages.pretrain.stage.train), so the figures are what `llmcycle pretrain` achieves.
Throughput counts time inside training steps only (batch building, forward, backward, optimizer),
not tokenizer training or checkpoint writes.

    .venv/bin/python benchmarks/pretrain_throughput.py [--arch t5|gpt] [--steps 40] [--d-model 128] ...

Prints exactly one JSON line. Without the data (../shared/data/dialogsum next to the repo) it
prints a JSON line with "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/dialogsum"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with dialogsum.train.jsonl")
    ap.add_argument("--arch", choices=["t5", "gpt"], default="t5")
    ap.add_argument("--size", choices=["tiny", "small", "base"], default="tiny", help="preset the dims below override")
    ap.add_argument("--d-model", type=int, default=128)
    ap.add_argument("--layers", type=int, default=2, help="t5: in encoder and decoder each")
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--d-ff", type=int, default=512)
    ap.add_argument("--seq-len", type=int, default=256)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--steps", type=int, default=40, help="optimizer steps per mode (packed, padded)")
    ap.add_argument("--rounds", type=int, default=2, help="split each mode's steps into this many runs, ABBA order")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    path = args.data / "dialogsum.train.jsonl"
    if not path.is_file():
        print(json.dumps({"benchmark": "pretrain_throughput", "skipped": f"data not found: {path}"}))
        return 0

    import torch

    from llmcycle.stages.pretrain.stage import PretrainConfig, train
    from llmcycle.stages.pretrain.data import train_tokenizer

    with open(path, encoding="utf-8") as fh:
        texts = [json.loads(line)["dialogue"] for line in fh if line.strip()]

    def config(packing: bool, steps: int) -> PretrainConfig:
        return PretrainConfig(
            architecture=args.arch, size=args.size, d_model=args.d_model, n_layers=args.layers,
            n_heads=args.heads, d_ff=args.d_ff, vocab_size=args.vocab, seq_len=args.seq_len,
            batch_size=args.batch_size, max_steps=steps, warmup_steps=min(10, steps), packing=packing,
            seed=args.seed, checkpoint_every=10**9, log_every=10**9,
        )

    t0 = time.perf_counter()
    tokenizer = train_tokenizer(texts, config(True, 1))
    tokenizer_s = time.perf_counter() - t0

    # Other processes on a shared machine change the speed over time, so the two modes are run
    # in ABBA order (packed, padded, padded, packed, ...) in `rounds` chunks of steps/rounds each,
    # which cancels a steady drift in load; throughput is summed over a mode's chunks.
    per_run = max(1, args.steps // args.rounds)
    order = [m for r in range(args.rounds) for m in ((True, False) if r % 2 == 0 else (False, True))]
    runs: dict[str, list[dict]] = {"packed": [], "padded": []}
    load_before = os.getloadavg()[0]
    with tempfile.TemporaryDirectory() as tmp:
        # a short untimed run first, so one-time costs (lazy imports, allocator warm-up) fall on
        # neither measured run
        train(config(True, 2), texts, Path(tmp) / "warmup", progress=False, tokenizer=tokenizer)
        for i, packing in enumerate(order):
            name = "packed" if packing else "padded"
            runs[name].append(train(config(packing, per_run), texts, Path(tmp) / f"{name}-{i}",
                                    progress=False, tokenizer=tokenizer))
    load_after = os.getloadavg()[0]

    agg = {}
    for name, rs in runs.items():
        step_time = sum(r["tokens_seen"] / r["tokens_per_s"] for r in rs)
        tokens, useful = sum(r["tokens_seen"] for r in rs), sum(r["useful_tokens"] for r in rs)
        agg[name] = {"useful_per_s": useful / step_time, "tokens_per_s": tokens / step_time,
                     "padding": 1 - useful / tokens, "step_time_s": step_time,
                     "wall_s": sum(r["wall_s"] for r in rs), "steps": sum(r["steps"] for r in rs)}
    packed, padded = agg["packed"], agg["padded"]
    first = runs["packed"][0]
    print(json.dumps({
        "benchmark": "pretrain_throughput",
        "useful_tokens_per_s_packed": round(packed["useful_per_s"], 1),
        "useful_tokens_per_s_padded": round(padded["useful_per_s"], 1),
        "ratio_packed_over_padded": round(packed["useful_per_s"] / padded["useful_per_s"], 3),
        "goal_ratio": 1.5,
        "padding_fraction_padded": round(padded["padding"], 4),
        "padding_fraction_packed": round(packed["padding"], 4),
        "tokens_per_s_packed": round(packed["tokens_per_s"], 1),
        "tokens_per_s_padded": round(padded["tokens_per_s"], 1),
        "steps": {k: a["steps"] for k, a in agg.items()},
        "step_time_s": {k: round(a["step_time_s"], 2) for k, a in agg.items()},
        "wall_s": {k: round(a["wall_s"], 2) for k, a in agg.items()},
        "tokenizer_train_s": round(tokenizer_s, 2),
        "final_loss": {k: round(rs[-1]["final_loss"], 4) for k, rs in runs.items()},
        "examples": {k: rs[0]["examples"] for k, rs in runs.items()},
        "parameters": first["parameters"],
        "loadavg_1m": {"before": round(load_before, 2), "after": round(load_after, 2)},
        "settings": {"arch": args.arch, "dims": first["dims"], "vocab_size": first["vocab_size"],
                     "seq_len": args.seq_len, "batch_size": args.batch_size, "seed": args.seed,
                     "rounds": args.rounds, "steps_per_run": per_run, "cpu_threads": torch.get_num_threads(),
                     "documents": len(texts), "data": str(path)},
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
