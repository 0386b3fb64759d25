"""Fine-tuning throughput and memory: `llmcycle tune` vs the course's recipe, and LoRA vs full.

A t5-small-shaped model (random init, tokenizer trained on DialogSum) is fine-tuned on DialogSum
train with the course's prompt. Two measurements:

  throughput  useful (non-padding) tokens/s of llmcycle's loop (llmcycle.training.loop.fit, method full:
              dynamic padding, length-grouped batches) vs the course notebook's recipe: every prompt
              padded to 512 tokens and every summary to 128, trained by a plain PyTorch AdamW loop
              (what HF Trainer does with default settings, minus its bookkeeping) in data order.
              Same examples, model init, optimizer, lr, grad clipping, batch size and steps; time
              inside training steps only (no model loading, tokenization or checkpoint writes).
  memory      peak RSS of `fit` with LoRA (r=32, alpha=32 on q,v as in the course) vs full, each in
              its own subprocess (a process's peak RSS only ever grows).

    .venv/bin/python benchmarks/tune_throughput.py [--steps 12] [--batch-size 8] [--rounds 2] [--only memory] ...

Prints exactly one JSON line. Without the data it prints a JSON line with "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/dialogsum"
OUT = Path(__file__).resolve().parent / "out"  # git-ignored; the built model is cached there
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
INPUT_LEN = 512  # the course pads every prompt to this (FLAN-T5's model_max_length), llmcycle's window


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def maxrss_kib() -> int:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux


def build_model(args, records: list[dict], out: Path) -> None:
    """Tokenizer trained on dialogues + summaries, t5-small dims, random init; written atomically."""
    import torch
    from transformers import T5ForConditionalGeneration

    from llmcycle.stages.pretrain.stage import PretrainConfig
    from llmcycle.models.scratch import build_model_config
    from llmcycle.stages.pretrain.data import train_tokenizer

    cfg = PretrainConfig(architecture="t5", size="small", vocab_size=args.vocab, seq_len=INPUT_LEN,
                         max_steps=1, seed=args.seed)
    tok = train_tokenizer([r["dialogue"] for r in records] + [r["summary"] for r in records], cfg)
    torch.manual_seed(args.seed)
    model = T5ForConditionalGeneration(build_model_config(cfg, tok))
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    model.save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)


def n_tokens(tok, r: dict, split: bool = False):
    """Prompt and summary token counts, EOS included: what both recipes feed the model unpadded."""
    counts = (len(tok(TEMPLATE.format(dialogue=r["dialogue"]))["input_ids"]), len(tok(r["summary"])["input_ids"]))
    return counts if split else sum(counts)


def choose(records: list[dict], tok, n: int, label_len: int) -> tuple[list[dict], int]:
    """The first n records that neither recipe alters: prompt within 512 tokens (llmcycle skips longer
    ones, the course truncates them) and summary within label_len (the course would truncate it)."""
    chosen, skipped = [], 0
    for r in records:
        if len(chosen) == n:
            break
        prompt, summary = n_tokens(tok, r, split=True)
        if prompt <= INPUT_LEN and summary <= label_len:
            chosen.append(r)
        else:
            skipped += 1
    return chosen, skipped


def run_fit(args, model_dir: Path, records: list[dict], method: str, steps: int, work: Path, log=None):
    """llmcycle's training loop, exactly as `llmcycle tune` calls it; returns its summary."""
    from llmcycle.data.records import Example
    from llmcycle.training.finetune import TuneConfig
    from llmcycle.training.loop import fit

    cfg = TuneConfig(method=method, batch_size=args.batch_size, max_steps=steps, lr=args.lr, r=32, alpha=32,
                     target_modules=["q", "v"], group_by_length=True, eval_every=None, seed=args.seed,
                     checkpoint_every=10**9, log_every=steps,  # one log call, at the last step
                     gradient_checkpointing=getattr(args, "gradient_checkpointing", False))
    examples = [Example(r["dialogue"], [r["summary"]], r, r["fname"]) for r in records]
    trained = fit(cfg, str(model_dir), examples, [], TEMPLATE.replace("{dialogue}", "{input}"), work,
                  log=log, progress=False, device="cpu")
    return trained.summary


def run_course(args, model_dir: Path, tok, records: list[dict]) -> dict:
    """The course notebook's recipe: tokenize_function + Trainer, with the Trainer as a plain loop."""
    import torch
    from transformers import T5ForConditionalGeneration

    # Done by dataset.map before training in the notebook, so untimed (as llmcycle's encoding is).
    ids = tok([TEMPLATE.format(dialogue=r["dialogue"]) for r in records], padding="max_length",
              truncation=True, max_length=INPUT_LEN, return_tensors="pt")["input_ids"]
    labels = tok([r["summary"] for r in records], padding="max_length", truncation=True,
                 max_length=args.label_len, return_tensors="pt")["input_ids"]
    pad = tok.pad_token_id
    useful = int((ids != pad).sum() + (labels != pad).sum())
    steps = len(records) // args.batch_size
    torch.manual_seed(args.seed)
    model = T5ForConditionalGeneration.from_pretrained(str(model_dir), dtype=torch.float32)
    model.train()
    # Trainer's defaults: AdamW without weight decay, linear decay to 0 without warmup, max_grad_norm 1.
    opt = torch.optim.AdamW(model.parameters(), lr=args.lr, weight_decay=0.0)
    sched = torch.optim.lr_scheduler.LambdaLR(opt, lambda s: 1.0 - s / steps)
    step_time, loss = 0.0, None
    for step in range(steps):
        b = slice(step * args.batch_size, (step + 1) * args.batch_size)
        t0 = time.perf_counter()
        # The course's faults, kept: pad ids stay in the labels (not -100), so the loss also teaches
        # the model to emit padding, and only input_ids + labels survive its remove_columns, so the
        # encoder attends to padding too. Neither changes the compute, which is what is measured.
        loss = model(input_ids=ids[b], labels=labels[b]).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        sched.step()
        opt.zero_grad(set_to_none=True)
        step_time += time.perf_counter() - t0
    return {"useful": useful, "tokens": steps * args.batch_size * (INPUT_LEN + args.label_len),
            "step_time": step_time, "steps": steps, "final_loss": float(loss.detach())}


def child_memory(args, model_dir: Path, records: list[dict], method: str) -> dict:
    """One `fit` in this fresh process; peak RSS at the points that separate fixed costs from training."""
    import llmcycle.training.loop as tune_mod  # fit calls the load_base bound in its module

    marks = {"start_kib": maxrss_kib()}  # interpreter, torch/transformers imports, the JSONL read
    original = tune_mod.load_base

    def load_base(*a, **k):  # fit looks load_base up in its module when it runs: this wrapper is what it calls
        result = original(*a, **k)
        marks["after_load_kib"] = maxrss_kib()  # imports, data, the base model: the fixed costs
        return result

    tune_mod.load_base = load_base
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as tmp:
        s = run_fit(args, model_dir, records, method, args.steps, Path(tmp),
                    log=lambda _: marks.__setitem__("end_of_steps_kib", maxrss_kib()))
        marks["after_fit_kib"] = maxrss_kib()  # also covers the final checkpoint write
    return {**marks, "wall_s": round(time.perf_counter() - t0, 1), "steps": s["steps"],
            "trainable_params": s["trainable_params"], "total_params": s["total_params"],
            "trainable_pct": round(s["trainable_pct"], 3), "final_loss": round(s["final_train_loss"], 4),
            "useful_tokens_per_s": round(s["useful_tokens_per_s"], 1)}


def memory_fields(memory: dict) -> dict:
    """The memory half's JSON fields (none when it was not run)."""
    if not memory:
        return {}
    lora, full = memory["lora"], memory["full"]
    inc = {m: memory[m]["after_fit_kib"] - memory[m]["after_load_kib"] for m in memory}
    return {
        "peak_rss_mib": {"lora": round(lora["after_fit_kib"] / 1024, 1), "full": round(full["after_fit_kib"] / 1024, 1)},
        "ratio_peak_rss_lora_over_full": round(lora["after_fit_kib"] / full["after_fit_kib"], 3),
        "ratio_training_increment_lora_over_full": round(inc["lora"] / inc["full"], 3) if inc["full"] > 0 else None,
        "memory": {m: {**{k: v for k, v in memory[m].items() if not k.endswith("_kib")},
                       **{k.replace("_kib", "_mib"): round(v / 1024, 1) for k, v in memory[m].items() if k.endswith("_kib")},
                       "training_increment_mib": round(inc[m] / 1024, 1)} for m in memory},
    }


def spawn(mode: str) -> dict:
    """Run this script again as a child; its last stdout line is its JSON result."""
    proc = subprocess.run([sys.executable, __file__, *sys.argv[1:], "--child", mode],
                          capture_output=True, text=True)
    if proc.returncode != 0:
        raise SystemExit(f"child {mode} failed ({proc.returncode}): {proc.stderr[-2000:]}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with dialogsum.train.jsonl")
    ap.add_argument("--steps", type=int, default=12, help="optimizer steps per method (split over rounds)")
    ap.add_argument("--batch-size", type=int, default=8)
    ap.add_argument("--rounds", type=int, default=2, help="throughput: chunks run in ABBA order")
    ap.add_argument("--label-len", type=int, default=128, help="the course's summary padding length")
    ap.add_argument("--lr", type=float, default=1e-4)
    ap.add_argument("--vocab", type=int, default=32000, help="tokenizer vocabulary (the corpus may give fewer)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--gradient-checkpointing", action="store_true",
                    help="memory runs (LoRA and full alike) recompute activations instead of keeping them")
    ap.add_argument("--only", choices=["memory", "throughput"],
                    help="run one half only (the other's fields are left out of the JSON line)")
    ap.add_argument("--child", choices=["build", "lora", "full"], help=argparse.SUPPRESS)
    args = ap.parse_args()

    path = args.data / "dialogsum.train.jsonl"
    if not path.is_file():
        print(json.dumps({"benchmark": "tune_throughput", "skipped": f"data not found: {path}"}))
        return 0
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    model_dir = OUT / f"tune-throughput-t5-small-v{args.vocab}-s{args.seed}"
    if args.steps % args.rounds:
        raise SystemExit("--steps must be a multiple of --rounds")

    if args.child:  # this process is one of the children spawned below
        records = read_jsonl(path)
        if args.child == "build":
            build_model(args, records, model_dir)
            print(json.dumps({"built": str(model_dir)}))
            return 0
        from llmcycle.models.hub import load_tokenizer

        chosen, _ = choose(records, load_tokenizer(str(model_dir)), args.steps * args.batch_size, args.label_len)
        print(json.dumps(child_memory(args, model_dir, chosen, args.child)))
        return 0

    # Nothing heavy is loaded here before the children run: on Linux a child's ru_maxrss starts from
    # the parent's peak RSS at fork/exec, so a parent that had already trained would inflate both.
    t0 = time.perf_counter()
    built = not (model_dir / "config.json").is_file()
    if built:
        OUT.mkdir(parents=True, exist_ok=True)
        spawn("build")
    build_s = time.perf_counter() - t0
    load_before = os.getloadavg()
    memory = {m: spawn(m) for m in ("lora", "full")} if args.only != "throughput" else {}
    load_mid = os.getloadavg()
    if args.only == "memory":
        print(json.dumps({"benchmark": "tune_throughput", "only": "memory", **memory_fields(memory),
                          "loadavg": {"before": [round(x, 2) for x in load_before],
                                      "after_memory_runs": [round(x, 2) for x in load_mid]},
                          "settings": {"steps": args.steps, "batch_size": args.batch_size, "seed": args.seed,
                                       "gradient_checkpointing": args.gradient_checkpointing,
                                       "lora": {"r": 32, "alpha": 32, "dropout": 0.05, "targets": ["q", "v"]}},
                          "model": {"arch": "t5", "size": "small", "parameters": memory["full"]["total_params"],
                                    "built_now": built}, "data": str(path)}))
        return 0

    import torch

    from llmcycle.models.hub import load_tokenizer

    tok = load_tokenizer(str(model_dir))
    records = read_jsonl(path)
    n = args.steps * args.batch_size
    chosen, skipped = choose(records, tok, n, args.label_len)
    per = (args.steps // args.rounds) * args.batch_size
    chunks = [chosen[i * per:(i + 1) * per] for i in range(args.rounds)]

    t = {"course": {"useful": 0, "tokens": 0, "step_time": 0.0, "steps": 0},
         "llmcycle": {"useful": 0, "tokens": 0, "step_time": 0.0, "steps": 0}}
    wall = {"course": 0.0, "llmcycle": 0.0}
    with tempfile.TemporaryDirectory() as tmp:
        # An untimed step of each first, so one-time costs (lazy imports, allocator) fall on neither.
        run_course(args, model_dir, tok, chosen[:args.batch_size])
        run_fit(args, model_dir, chosen[:args.batch_size], "full", 1, Path(tmp) / "warmup")
        # Shared machine: chunks run in ABBA order (course, llmcycle, llmcycle, course, ...) so a
        # steady drift in load cancels; each run starts from the same saved init.
        for i, chunk in enumerate(chunks):
            for name in (("course", "llmcycle") if i % 2 == 0 else ("llmcycle", "course")):
                w0 = time.perf_counter()
                if name == "course":
                    r = run_course(args, model_dir, tok, chunk)
                else:
                    s = run_fit(args, model_dir, chunk, "full", len(chunk) // args.batch_size, Path(tmp) / f"r{i}")
                    assert s["train_examples"] == len(chunk) and s["steps"] * args.batch_size == len(chunk)
                    # each chunk is consumed exactly once, so fit's useful tokens (prompt + target ids,
                    # EOS included) are the chunk's non-pad tokens, counted the same way as the course's
                    useful = sum(n_tokens(tok, e) for e in chunk)
                    st = useful / s["useful_tokens_per_s"]
                    r = {"useful": useful, "tokens": s["tokens_per_s"] * st, "step_time": st, "steps": s["steps"],
                         "final_loss": s["final_train_loss"]}
                wall[name] += time.perf_counter() - w0
                for k in ("useful", "tokens", "step_time", "steps"):
                    t[name][k] += r[k]
                t[name]["final_loss"] = r["final_loss"]
                gc.collect()
    load_after = os.getloadavg()

    rate = {k: v["useful"] / v["step_time"] for k, v in t.items()}
    print(json.dumps({
        "benchmark": "tune_throughput",
        "useful_tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "ratio_llmcycle_over_course": round(rate["llmcycle"] / rate["course"], 3),
        **memory_fields(memory),
        "goals": {"ratio_llmcycle_over_course": ">= 1.5", "ratio_peak_rss_lora_over_full": "< 0.7"},
        "padding_fraction": {k: round(1 - v["useful"] / v["tokens"], 4) for k, v in t.items()},
        "tokens_per_s_incl_padding": {k: round(v["tokens"] / v["step_time"], 1) for k, v in t.items()},
        "useful_tokens": {k: v["useful"] for k, v in t.items()},
        "step_time_s": {k: round(v["step_time"], 2) for k, v in t.items()},
        "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "final_loss": {k: round(v["final_loss"], 4) for k, v in t.items()},
        "examples": len(chosen), "skipped_not_fitting": skipped,
        "loadavg": {"before": [round(x, 2) for x in load_before], "after_memory_runs": [round(x, 2) for x in load_mid],
                    "after": [round(x, 2) for x in load_after]},
        "settings": {"steps": args.steps, "batch_size": args.batch_size, "rounds": args.rounds, "lr": args.lr,
                     "input_len": INPUT_LEN, "label_len": args.label_len, "seed": args.seed,
                     "lora": {"r": 32, "alpha": 32, "dropout": 0.05, "targets": ["q", "v"]},
                     "course_loop": "plain AdamW loop (Trainer defaults: wd 0, linear decay, clip 1.0), data order, "
                                    "input_ids+labels only, pad tokens not masked in labels",
                     "llmcycle": "tune_loop.fit method=full, group_by_length, dynamic padding, eval off",
                     "cpu_threads": torch.get_num_threads(), "torch": torch.__version__},
        "model": {"arch": "t5", "size": "small", "vocab_size": len(tok), "parameters": memory["full"]["total_params"] if memory else None,
                  "init": f"random, seed {args.seed}", "built_now": built, "build_s": round(build_s, 1)},
        "data": str(path),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
