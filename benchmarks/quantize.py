"""int8 dynamic quantization vs float32 on the CPU: generation tokens/s and ROUGE-L on DialogSum dev.

The float32 model is a t5-small-shaped T5 (random weights, the same one benchmarks/tune_throughput.py
builds and caches in benchmarks/out/), or a trained model given with --model PATH. Its int8 version
is made through llmcycle's own path, the one `llmcycle optimize` (method: quantize) takes:
quantize_int8 -> save_int8 -> models.load_model on the saved folder. Then, with the course's prompt
on the first --n dev dialogues that fit the 512-token window:

  speed    both models generate exactly --max-new-tokens tokens for every prompt (greedy,
           min_new_tokens = max_new_tokens, so neither stops early and both do the same work), one
           prompt at a time (batch 1: a lone request) and in llmcycle's length-sorted batches of
           --batch-size; tokens/s = generated tokens / wall time. Runs are ordered fp32, int8, int8,
           fp32 (twice per model) so a steady drift in machine load cancels; the spread between a
           model's two runs is reported as noise.
  quality  the shared harness scores both on the first --quality-n dialogues (normal generation,
           stopping at EOS, max_new_tokens 50): ROUGE-L. On random weights ROUGE says nothing about
           quality; the output says so when no --model is given.

Goal: int8 at least 1.5x the float32 tokens/s, ROUGE-L within 1 point (0.01).

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/quantize.py [--model PATH] [--n 16] [--max-new-tokens 32]

Prints exactly one JSON line. Without the data it prints a JSON line with "skipped" and exits 0.
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
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"  # the course's prompt
WINDOW = 512


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def fixed_length_generation(model, tok, prompts: list[str], new_tokens: int, batch_size: int) -> tuple[int, float]:
    """(tokens generated, seconds): every prompt gets exactly `new_tokens` greedy tokens, batched the
    way llmcycle's Generator batches (length-sorted), EOS held back until then."""
    import torch

    from llmcycle.models.generation import GenerationConfig, Generator

    gen = Generator(model, tok, WINDOW)
    cfg = GenerationConfig(max_new_tokens=new_tokens, batch_size=batch_size)
    kwargs = {**gen.generate_kwargs(cfg), "min_new_tokens": new_tokens}
    encoded = gen.encode(prompts)
    tokens, t0 = 0, time.perf_counter()
    with torch.inference_mode():
        for batch in gen.plan_batches([len(r) for r in encoded], cfg):
            ids, mask = gen._tensors([encoded[i] for i in batch])
            out = model.generate(input_ids=ids, attention_mask=mask, **kwargs)
            completions = gen._completions(out, ids.shape[1])
            assert all(len(c) == new_tokens for c in completions), "a row generated a different number of tokens"
            tokens += sum(len(c) for c in completions)
    return tokens, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", type=Path, default=None, help="a trained float model folder (default: "
                    "t5-small-shaped random weights, for speed only)")
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with dialogsum.{train,dev}.jsonl")
    ap.add_argument("--n", type=int, default=16, help="dev dialogues timed")
    ap.add_argument("--quality-n", type=int, default=100, help="dev dialogues scored for ROUGE-L")
    ap.add_argument("--max-new-tokens", type=int, default=32, help="tokens every timed prompt generates")
    ap.add_argument("--batch-size", type=int, default=16, help="batch size of the batched timing")
    ap.add_argument("--vocab", type=int, default=32000, help="tokenizer size of the random model")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    dev_file = args.data / "dialogsum.dev.jsonl"
    if not dev_file.is_file():
        print(json.dumps({"benchmark": "quantize", "skipped": f"data not found: {dev_file}"}))
        return 0
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import torch

    from llmcycle.evaluation import harness
    from llmcycle.data.records import Example
    from llmcycle.models.generation import GenerationConfig, Generator
    from llmcycle.models.load import load_model
    from llmcycle.models.folders import load_source, parameter_count, weights_mb
    from llmcycle.models.int8 import conv1d_to_linear, dynamic_linears, quantize_int8, save_int8

    model_dir = args.model
    if model_dir is None:  # the random t5-small that tune_throughput.py builds (and caches)
        from tune_throughput import OUT, build_model

        model_dir = OUT / f"tune-throughput-t5-small-v{args.vocab}-s{args.seed}"
        if not (model_dir / "config.json").is_file():
            OUT.mkdir(parents=True, exist_ok=True)
            build_model(args, read_jsonl(args.data / "dialogsum.train.jsonl"), model_dir)

    with tempfile.TemporaryDirectory() as tmp:
        t0 = time.perf_counter()
        model, tok, _ = load_source(str(model_dir))
        swapped = conv1d_to_linear(model)
        save_int8(quantize_int8(model), tok, Path(tmp) / "int8", {"conv1d_as_linear": swapped})
        quantize_s = time.perf_counter() - t0
        del model
        fp32, tok = load_model(str(model_dir), dtype="float32", device="cpu")
        int8, _ = load_model(str(Path(tmp) / "int8"), device="cpu")
        sizes = {"fp32": weights_mb(Path(model_dir)), "int8": weights_mb(Path(tmp) / "int8")}
    models = {"fp32": fp32, "int8": int8}

    records, chosen = read_jsonl(dev_file), []
    for r in records:  # prompts are never cut: the ones over the window are left out
        if len(tok(TEMPLATE.format(dialogue=r["dialogue"]))["input_ids"]) <= WINDOW:
            chosen.append(r)
        if len(chosen) == max(args.n, args.quality_n):
            break
    prompts = [TEMPLATE.format(dialogue=r["dialogue"]) for r in chosen]
    timed = prompts[:args.n]

    for name, model in models.items():  # untimed warm-up of both paths
        fixed_length_generation(model, tok, timed[:2], 2, 2)
    load_before = os.getloadavg()
    runs: dict = {name: {"batch1": [], "batched": []} for name in models}
    for setting, bs in (("batch1", 1), ("batched", args.batch_size)):
        for name in ("fp32", "int8", "int8", "fp32"):
            runs[name][setting].append(fixed_length_generation(models[name], tok, timed, args.max_new_tokens, bs))
    load_after = os.getloadavg()

    def rate(pairs):
        return sum(n for n, _ in pairs) / sum(s for _, s in pairs)

    def spread(pairs):  # the two runs of one model: relative difference of their rates
        a, b = (n / s for n, s in pairs)
        return abs(a - b) / ((a + b) / 2)

    tokens_per_s = {name: {k: round(rate(v), 2) for k, v in r.items()} for name, r in runs.items()}
    speedup = {k: round(tokens_per_s["int8"][k] / tokens_per_s["fp32"][k], 3) for k in ("batch1", "batched")}
    noise = {name: {k: round(spread(v), 3) for k, v in r.items()} for name, r in runs.items()}

    examples = [Example(r["dialogue"], [r["summary"]], r, f"{dev_file.name}:{i + 1}")
                for i, r in enumerate(chosen[:args.quality_n])]
    quality, eval_rate = {}, {}
    for name, model in models.items():
        loaded = harness.LoadedModel(name, str(model_dir), model, tok, Generator(model, tok, WINDOW))
        summary, _ = harness.evaluate(loaded, prompts[:args.quality_n], examples, "summarization",
                                      GenerationConfig(max_new_tokens=50, batch_size=args.batch_size),
                                      perplexity=False, progress=False)
        quality[name] = round(summary["rougeL"], 4)
        eval_rate[name] = round(summary["completion_tokens_per_s"], 2)
    delta_points = round(100 * (quality["int8"] - quality["fp32"]), 2)

    print(json.dumps({
        "benchmark": "quantize",
        "tokens_per_s": tokens_per_s, "speedup_int8_over_fp32": speedup,
        "rougeL": quality, "rougeL_delta_points": delta_points,
        "goals": {"speedup": 1.5, "rougeL_within_points": 1.0},
        "goals_met": {"speedup_batch1": speedup["batch1"] >= 1.5, "speedup_batched": speedup["batched"] >= 1.5,
                      "rougeL": abs(delta_points) <= 1.0},
        "quality_note": (f"trained model {args.model}" if args.model else
                         "UNTRAINED random weights: the ROUGE-L figures (and their difference) say nothing "
                         "about quality; pass --model PATH with a trained model for that"),
        "noise_between_repeats": noise,
        "eval_completion_tokens_per_s": eval_rate,
        "size_mb": {k: round(v, 2) for k, v in sizes.items()},
        "size_ratio": round(sizes["int8"] / sizes["fp32"], 3),
        "parameters": parameter_count(fp32), "quantized_layers": len(dynamic_linears(int8)),
        "quantize_s": round(quantize_s, 2),
        "n_timed": len(timed), "n_scored": len(examples), "max_new_tokens": args.max_new_tokens,
        "batch_size": args.batch_size, "schedule": "per setting: fp32, int8, int8, fp32",
        "model": str(model_dir), "init": "trained (--model)" if args.model else f"random, seed {args.seed}",
        "cpu_threads": torch.get_num_threads(), "quantized_engine": torch.backends.quantized.engine,
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "torch": torch.__version__, "data": str(dev_file),
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
