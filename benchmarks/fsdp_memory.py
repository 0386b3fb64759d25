"""Memory per rank of a sharded full fine-tune: one process vs FSDP2 on two (torchrun, CPU, gloo).

A t5-small-shaped model (d_model 512, 6 + 6 layers, 8 heads, d_ff 2048, 32,128-row vocabulary, tied
embeddings: 60.5M parameters; random init, as nothing can be downloaded) is fully fine-tuned through
llmcycle.training.loop.fit for --steps steps on the same synthetic dialogues and batches, once as one
plain process (strategy ddp, world 1) and once as `torchrun --nproc_per_node 2` with parallelism.strategy
fsdp. Each process reports, for rank 0:

  held_mb: the bytes of parameters, gradients and AdamW state it holds (measured on the tensors after
           the first optimizer step, before the gradients are freed: a DTensor counts its local shard);
  peak_rss_mb: the highest resident memory of a logged window (VmHWM: activations, gathered blocks,
           allocator slack and the libraries included); the first window also holds the loading of the
           whole model (before it is sharded), so steps_2_on_peak_rss_mb gives the later windows' highest;
  losses: the logged loss of every step.

Goal (issue 21): held_mb per rank <= 0.6x one process's, with the same losses. Prints one JSON line.

    .venv/bin/python benchmarks/fsdp_memory.py [--steps 4] [--batch-size 8]
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

T5_SMALL = dict(d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6, num_heads=8,
                vocab_size=32128, dropout_rate=0.0)
NAMES = ["Ann", "Ben", "Cleo", "Dev", "Eva", "Finn", "Gus", "Hana"]


def examples(n: int):
    from llmcycle.data.records import Example

    rows = []
    for i in range(n):
        a, b = NAMES[i % 8], NAMES[(i * 3 + 1) % 8]
        text = (f"#Person1#: Hi {b}, can we meet on day {i % 28 + 1} at {i % 12 + 1} o'clock about the "
                f"{['budget', 'trip', 'garden', 'report'][i % 4]}? #Person2#: Sure {a}, see you then.")
        rows.append(Example(text, [f"{a} and {b} will meet on day {i % 28 + 1} about the "
                                   f"{['budget', 'trip', 'garden', 'report'][i % 4]}."], {}, f"row {i}"))
    return rows


def build_model(out: Path) -> int:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from llmcycle.stages.pretrain.data import train_tokenizer
    from llmcycle.stages.pretrain.stage import PretrainConfig

    rows = examples(64)
    tok = train_tokenizer([r.input for r in rows] + [r.targets[0] for r in rows],
                          PretrainConfig(architecture="t5", vocab_size=2000, max_steps=1))
    torch.manual_seed(0)
    model = T5ForConditionalGeneration(T5Config(pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                                                decoder_start_token_id=tok.pad_token_id, **T5_SMALL))
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return sum(p.numel() for p in model.parameters())


def worker(base: str, out: str, strategy: str, steps: int, batch_size: int) -> None:
    """One process's share: fit, then rank 0 writes what it held and its losses."""
    from llmcycle.training.finetune import TuneConfig
    from llmcycle.training.loop import fit

    logged: list[dict] = []
    cfg = TuneConfig(method="full", max_steps=steps, lr=1e-4, batch_size=batch_size, log_every=1, dropout=0.0,
                     checkpoint_every=10_000, parallelism={"strategy": strategy})
    trained = fit(cfg, base, examples(64), examples(2), "Summarize: {input}", Path(out) / f"work-{strategy}",
                  log=logged.append, progress=False)
    if trained.is_main:
        summary = trained.summary
        (Path(out) / f"{strategy}.json").write_text(json.dumps({
            "held_mb": summary["held_mb"], "held_total_mb": round(sum(summary["held_mb"].values()), 1),
            "peak_rss_mb": summary["train_peak_memory_mb"], "losses": [r["loss"] for r in logged],
            "steps_2_on_peak_rss_mb": max(r["peak_memory_mb"] for r in logged[1:]),
            "world_size": summary["world_size"], "parallelism": summary["parallelism"]}))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=4, help="at least 2")
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--worker", nargs=3, metavar=("BASE", "OUT", "STRATEGY"), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        return worker(*args.worker, args.steps, args.batch_size)
    load_before = os.getloadavg()[0]
    tmp = Path(tempfile.mkdtemp(prefix="fsdp-memory-"))
    try:
        params = build_model(tmp / "base")
        env = {**os.environ, "OMP_NUM_THREADS": "1"}
        me = [str(Path(__file__).resolve()), "--steps", str(args.steps), "--batch-size", str(args.batch_size)]
        torchrun = str(Path(sys.executable).with_name("torchrun"))
        for head, strategy in (([sys.executable], "ddp"),
                               ([torchrun, "--standalone", "--nproc_per_node", "2"], "fsdp")):
            subprocess.run([*head, *me, "--worker", str(tmp / "base"), str(tmp), strategy], env=env, check=True,
                           stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        one, sharded = (json.loads((tmp / f"{s}.json").read_text()) for s in ("ddp", "fsdp"))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    print(json.dumps({
        "benchmark": "fsdp_memory", "model": "t5-small-shaped", "parameters": params, "steps": args.steps,
        "batch_size": args.batch_size, "one_process": one, "fsdp_2_processes": sharded,
        "held_ratio_per_rank": round(sharded["held_total_mb"] / one["held_total_mb"], 3),
        "peak_rss_ratio_per_rank": round(sharded["peak_rss_mb"] / one["peak_rss_mb"], 3),
        "steps_2_on_peak_rss_ratio": round(sharded["steps_2_on_peak_rss_mb"] / one["steps_2_on_peak_rss_mb"], 3),
        "max_loss_difference": max(abs(a - b) for a, b in zip(one["losses"], sharded["losses"])),
        "goal": "held_ratio_per_rank <= 0.6 with the same losses",
        "load_avg_1m": [round(load_before, 2), round(os.getloadavg()[0], 2)]}))


if __name__ == "__main__":
    main()
