"""Zero-shot vs full fine-tuning vs LoRA on DialogSum, driven through `llmcycle run` end to end.

The course's lab 2 in miniature, on 2 CPU cores and offline: the script writes an llmcycle project
(benchmarks/out/dialogsum/ by default, git-ignored) that

  1. pretrains a small T5-style base model from scratch on DialogSum train text (dialogues and
     summaries; `pretrain.base`),
  2. scores it zero-shot with the course's prompt on the dev set (`prompt`, 0 shots),
  3. fine-tunes it on DialogSum train in full (`tune.full`) and with LoRA (`tune.lora`: r 32,
     alpha 32, dropout 0.05 on q and v, the course's settings), each scored on the same dev examples,

runs `python -m llmcycle run -p DIR --json` as a user would, and prints the table the course prints
(ROUGE-1/2/L/Lsum per model) with trainable parameters and wall time per stage, then one JSON line
with every figure, wall time and setting.

    .venv/bin/python benchmarks/dialogsum_tune.py                 # about 15-25 minutes on 2 CPU cores
    .venv/bin/python benchmarks/dialogsum_tune.py --fresh         # delete the project and start over
    .venv/bin/python benchmarks/dialogsum_tune.py --tune-steps 100 --limit 50   # a quick look

The project folder persists, and llmcycle skips a stage variant whose config and inputs are unchanged
(content hash): re-running reuses the pretrained base (and any finished tuning) and only redoes what a
changed flag touches. --fresh removes the folder first. Without the data (../shared/data/dialogsum
next to the repo, or --data) it prints one JSON line with "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/dialogsum"
DEFAULT_OUT = REPO / "benchmarks/out/dialogsum"
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
ROUGE = ("rouge1", "rouge2", "rougeL", "rougeLsum")


def project_config(args, train: Path, dev: Path) -> dict:
    """The llmcycle.yaml the benchmark runs (also written to the project folder for inspection)."""
    tune_common = {"batch_size": args.batch_size, "max_steps": args.tune_steps,
                   "warmup_steps": max(1, args.tune_steps // 10), "checkpoint_every": args.tune_steps,
                   "log_every": 10, "seed": args.seed}
    return {
        "project": {"name": "dialogsum-tune-benchmark", "task": "summarization"},
        "data": {"train": str(train), "eval": str(dev), "input": "dialogue", "target": "summary"},
        "model": {"name": "run:pretrain/base", "dtype": "float32" if args.device == "cpu" else "auto",
                  "device": args.device,
                  # T5's relative positions have no hard limit; a few DialogSum dialogues exceed 512
                  # tokens of this small vocabulary, and an evaluation prompt is never cut
                  "context_window": args.context_window},
        "pretrain": {"base": {
            "architecture": "t5", "d_model": args.d_model, "n_layers": args.layers, "n_heads": args.heads,
            "d_ff": args.d_ff, "vocab_size": args.vocab, "seq_len": args.seq_len, "packing": True,
            "objective": args.objective, "noise_density": args.noise_density,
            "batch_size": args.batch_size, "lr": args.pretrain_lr, "warmup_steps": max(1, args.pretrain_steps // 10),
            "max_steps": args.pretrain_steps, "checkpoint_every": args.pretrain_steps, "log_every": 20,
            "seed": args.seed}},
        "evaluate": {"template": TEMPLATE, "generation": {"max_new_tokens": 50, "batch_size": 32},
                     "limit": args.limit, "show_examples": 2},
        "prompt": {"shots": [0]},  # zero-shot: the pretrained base with the course's prompt
        "tune": {
            "full": {"method": "full", "lr": args.full_lr, **tune_common},
            "lora": {"method": "lora", "r": args.lora_r, "alpha": args.lora_alpha, "dropout": 0.05,
                     "lr": args.lora_lr, **tune_common},
        },
    }


def fmt(v, digits=4) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA,
                    help="folder with dialogsum.train.jsonl and dialogsum.dev.jsonl")
    ap.add_argument("--out", type=Path, default=DEFAULT_OUT, help="the llmcycle project folder to write and run")
    ap.add_argument("--fresh", action="store_true", help="delete the project folder (and its runs) first")
    ap.add_argument("--limit", type=int, default=200, help="dev examples scored (the first N of 500)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="cuda: pretrain, tune and evaluate on the GPU (bf16 where it is supported)")
    ap.add_argument("--threads", type=int, default=1,
                    help="CPU threads for torch in `llmcycle run` (OMP_NUM_THREADS); 0 = torch's default (all "
                         "cores). 1 by default: on cores shared with other processes, 2 threads per process "
                         "ran about 10x slower than 1 here")
    g = ap.add_argument_group("pretraining (the base model)")
    g.add_argument("--d-model", type=int, default=128)
    g.add_argument("--layers", type=int, default=2, help="in the encoder and in the decoder each")
    g.add_argument("--heads", type=int, default=4)
    g.add_argument("--d-ff", type=int, default=512)
    g.add_argument("--vocab", type=int, default=4000)
    g.add_argument("--seq-len", type=int, default=256)
    g.add_argument("--pretrain-steps", type=int, default=500)
    g.add_argument("--objective", choices=["span_corruption", "denoising"], default="span_corruption",
                   help="pretraining objective (pretrain.objective)")
    g.add_argument("--noise-density", type=float, default=0.15, help="fraction of tokens masked in pretraining")
    g.add_argument("--pretrain-lr", type=float, default=2e-3)
    g = ap.add_argument_group("fine-tuning (full and LoRA share steps and batch size)")
    g.add_argument("--batch-size", type=int, default=16, help="also the pretraining batch size")
    g.add_argument("--tune-steps", type=int, default=400)
    g.add_argument("--full-lr", type=float, default=2e-3)
    g.add_argument("--lora-lr", type=float, default=5e-3)
    g.add_argument("--lora-r", type=int, default=32)
    g.add_argument("--lora-alpha", type=int, default=32)
    g.add_argument("--context-window", type=int, default=1024)
    args = ap.parse_args()

    train, dev = args.data / "dialogsum.train.jsonl", args.data / "dialogsum.dev.jsonl"
    missing = [str(p) for p in (train, dev) if not p.is_file()]
    if missing:
        print(json.dumps({"benchmark": "dialogsum_tune", "skipped": f"data not found: {', '.join(missing)}"}))
        return 0

    import yaml

    out = args.out.resolve()
    if args.fresh and out.exists():
        shutil.rmtree(out)
    out.mkdir(parents=True, exist_ok=True)
    config = project_config(args, train.resolve(), dev.resolve())
    (out / "llmcycle.yaml").write_text(
        "# Written by benchmarks/dialogsum_tune.py; re-running the script rewrites it.\n"
        + yaml.safe_dump(config, sort_keys=False, width=120))

    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep))
    if args.threads:
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(args.threads)
    cmd = [sys.executable, "-m", "llmcycle", "run", "-p", str(out), "--json"]
    print(f"$ {' '.join(cmd)}", file=sys.stderr, flush=True)
    load_before = os.getloadavg()[0]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=REPO, env=env, stdout=subprocess.PIPE, text=True)  # stderr passes through
    wall = time.perf_counter() - t0
    if proc.returncode != 0:
        print(json.dumps({"benchmark": "dialogsum_tune", "error": f"llmcycle run exited {proc.returncode}",
                          "project": str(out), "wall_s": round(wall, 1)}))
        return 1
    runs = {f"{r['stage']}.{r['variant']}": r for r in json.loads(proc.stdout)["runs"]}

    pre = runs["pretrain.base"]
    zero = next(r for key, r in runs.items() if key.startswith("prompt."))
    rows = [("zero-shot (pretrained base)", zero), ("full fine-tune", runs["tune.full"]),
            ("LoRA (r 32, q+v)" if args.lora_r == 32 else f"LoRA (r {args.lora_r}, q+v)", runs["tune.lora"])]

    def reused(r) -> str:
        return " (reused)" if r["status"] == "skipped" else ""

    ps = pre["summary"]
    lines = [
        f"DialogSum dev, first {zero['summary']['n_examples']} dialogues; base: T5 {ps['dims']['d_model']}d x "
        f"{ps['dims']['n_layers']}+{ps['dims']['n_layers']} layers, {ps['parameters'] / 1e6:.2f}M parameters, "
        f"pretrained {ps['steps']} steps ({ps['tokens_seen'] / 1e6:.2f}M tokens, final loss "
        f"{ps['final_loss']:.3f}) in {ps['wall_s']:.0f} s{reused(pre)}",
        "",
        "| model | ROUGE-1 | ROUGE-2 | ROUGE-L | ROUGE-Lsum | ref. perplexity | trainable params | train steps | wall s |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for name, r in rows:
        s = r["summary"]
        trainable = (f"{s['trainable_params']:,} ({s['trainable_pct']:.2f}%)" if "trainable_params" in s else "0")
        wall_s = s.get("wall_s", s.get("generation_s", 0))  # the zero-shot run records its generation time
        lines.append(f"| {name} | " + " | ".join(fmt(s.get(k)) for k in ROUGE)
                     + f" | {fmt(s.get('perplexity'), 1)} | {trainable} | {s.get('steps', 0)} | {wall_s:.0f}{reused(r)} |")
    print("\n".join(lines))
    print(f"\nwall time of `llmcycle run`: {wall:.0f} s (reused stages cost nothing; their own times are "
          f"shown); project: {out}\n")

    figures = {}
    for key, (_name, r) in zip(("zero_shot", "full", "lora"), rows):
        s = r["summary"]
        figures[key] = {**{k: round(s[k], 4) for k in ROUGE},
                        "rougeL_ci95": [round(s.get("headline_ci_low", 0), 4), round(s.get("headline_ci_high", 0), 4)],
                        "perplexity": round(s["perplexity"], 2) if s.get("perplexity") else None,
                        "len_words_mean": round(s.get("len_words_mean", 0), 1),
                        "trainable_params": s.get("trainable_params", 0),
                        "trainable_pct": round(s.get("trainable_pct", 0.0), 3),
                        "final_train_loss": round(s["final_train_loss"], 4) if "final_train_loss" in s else None,
                        "train_wall_s": s.get("train_wall_s"), "wall_s": s.get("wall_s", s.get("generation_s")),
                        "run_id": r["run_id"], "status": r["status"]}
    full_l, lora_l, zero_l = figures["full"]["rougeL"], figures["lora"]["rougeL"], figures["zero_shot"]["rougeL"]
    print(json.dumps({
        "benchmark": "dialogsum_tune",
        "n_eval": zero["summary"]["n_examples"],
        **figures,
        "lora_over_full_rougeL": round(lora_l / full_l, 3) if full_l else None,
        "full_minus_zero_shot_rougeL": round(full_l - zero_l, 4),
        "pretrain": {"parameters": ps["parameters"], "steps": ps["steps"], "tokens_seen": ps["tokens_seen"],
                     "final_loss": round(ps["final_loss"], 4), "wall_s": ps["wall_s"], "run_id": pre["run_id"],
                     "status": pre["status"]},
        "wall_s": round(wall, 1),
        "loadavg_1m": {"before": round(load_before, 2), "after": round(os.getloadavg()[0], 2)},
        "settings": {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()},
        "project": str(out),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
