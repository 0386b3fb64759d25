"""GPU fine-tuning throughput and model FLOPs utilisation (MFU) of `llmcycle tune` in bf16.

A flan-t5-base-shaped model (d_model 768, 12 + 12 layers, 12 heads, d_ff 2048 gated-GELU, 32k vocabulary,
untied head; random init, tokenizer trained on the data, as nothing can be downloaded) is fine-tuned on
DialogSum train with the course's prompt through llmcycle.training.loop.fit (bf16 autocast on the GPU,
dynamic padding, length-grouped batches) for each method: full, lora (r 32 on q, v, as in the course)
and, with bitsandbytes, qlora (the same LoRA over a 4-bit NF4 base).

    python benchmarks/gpu_tune.py --data ../shared/data/dialogsum [--steps 60] [--batch-size 32]

MFU = model FLOPs per second / the GPU's dense bf16 peak (H100 SXM: 989 TFLOP/s; override with --peak-tflops).
Model FLOPs count only useful (non-padding) tokens, per example (the usual 6N rule, split by stack):
  forward + backward = 3 x forward for full fine-tuning; 2 x forward for adapters, whose frozen
  weights need no weight gradients (input gradients only);
  forward = 2 x (encoder matmul params x source tokens + decoder matmul params x target tokens
            + head d_model x vocab x target tokens) + attention scores and values
            (4 x layers x d_attn x (S^2 + T^2 + S x T)).
Throughput is taken over the logged windows after the first (CUDA start-up and allocator warm-up
excluded). Prints exactly one JSON line; without a GPU it prints {"skipped": ...} and exits 0.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import statistics
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DEFAULT_DATA = Path(__file__).resolve().parents[2] / "shared/data/dialogsum"
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
FLAN_T5_BASE = dict(d_model=768, d_kv=64, d_ff=2048, num_layers=12, num_decoder_layers=12, num_heads=12,
                    feed_forward_proj="gated-gelu", tie_word_embeddings=False, dropout_rate=0.1)


def read_jsonl(path: Path, limit: int) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        rows = [json.loads(line) for line in fh if line.strip()]
    return rows[:limit]


def build_model(records: list[dict], out: Path, vocab: int, seed: int) -> dict:
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from llmcycle.stages.pretrain.stage import PretrainConfig
    from llmcycle.stages.pretrain.data import train_tokenizer

    cfg = PretrainConfig(architecture="t5", size="base", vocab_size=vocab, seq_len=512, max_steps=1, seed=seed)
    tok = train_tokenizer([r["dialogue"] for r in records] + [r["summary"] for r in records], cfg)
    torch.manual_seed(seed)
    config = T5Config(vocab_size=len(tok), pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id, **FLAN_T5_BASE)
    model = T5ForConditionalGeneration(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"parameters": sum(p.numel() for p in model.parameters()), "vocab_size": len(tok),
            "shape": "flan-t5-base", **{k: FLAN_T5_BASE[k] for k in ("d_model", "num_layers", "d_ff")}}


def flops_per_example(config, src: float, tgt: float, src_sq: float, tgt_sq: float, src_tgt: float,
                      backward_factor: int) -> float:
    """Model FLOPs of one example (mean lengths and mean squared lengths over the data)."""
    d, ff, heads, dkv = config.d_model, config.d_ff, config.num_heads, config.d_kv
    attn = 4 * d * heads * dkv  # q, k, v, o
    ffn = (3 if config.is_gated_act else 2) * d * ff
    enc = config.num_layers * (attn + ffn)
    dec = config.num_decoder_layers * (2 * attn + ffn)  # self- and cross-attention projections
    head = d * config.vocab_size
    scores = 4 * heads * dkv * (config.num_layers * src_sq + config.num_decoder_layers * (tgt_sq + src_tgt))
    forward = 2 * (enc * src + (dec + head) * tgt) + scores
    return backward_factor * forward


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA)
    ap.add_argument("--examples", type=int, default=4000, help="DialogSum train examples used")
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--batch-size", type=lambda v: v if v == "auto" else int(v), default=32,
                    help="examples per step, or auto (the largest that fits: batch_size auto)")
    ap.add_argument("--compile", action="store_true", help="tune with compile: true (torch.compile of the step)")
    ap.add_argument("--vocab", type=int, default=32128)
    ap.add_argument("--methods", default="full,lora,qlora")
    ap.add_argument("--peak-tflops", type=float, default=989.0, help="dense bf16 peak of the GPU")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()

    import torch

    if not torch.cuda.is_available():
        print(json.dumps({"benchmark": "gpu_tune", "skipped": "no CUDA GPU here"}))
        return 0
    train_file = args.data / "dialogsum.train.jsonl"
    if not train_file.is_file():
        print(json.dumps({"benchmark": "gpu_tune", "skipped": f"{train_file} not found"}))
        return 0

    from transformers import T5Config

    from llmcycle.data.records import Example
    from llmcycle.models.hub import load_tokenizer
    from llmcycle.training.finetune import TuneConfig
    from llmcycle.training.loop import fit

    records = read_jsonl(train_file, args.examples)
    examples = [Example(r["dialogue"], [r["summary"]], {"dialogue": r["dialogue"]}, str(i))
                for i, r in enumerate(records)]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "base"
        facts = build_model(records, model_dir, args.vocab, args.seed)
        config = T5Config.from_pretrained(model_dir)
        tok = load_tokenizer(str(model_dir))
        prompts = [TEMPLATE.format(dialogue=r["dialogue"]) for r in records]
        src = [min(len(tok(p).input_ids), 512) for p in prompts]
        tgt = [len(tok(r["summary"]).input_ids) for r in records]  # + EOS, as training sees it
        stats = dict(src=statistics.mean(src), tgt=statistics.mean(tgt),
                     src_sq=statistics.mean(s * s for s in src), tgt_sq=statistics.mean(t * t for t in tgt),
                     src_tgt=statistics.mean(s * t for s, t in zip(src, tgt)))
        for method in args.methods.split(","):
            if method == "qlora" and importlib.util.find_spec("bitsandbytes") is None:
                results[method] = {"skipped": "bitsandbytes not installed"}
                continue
            extra = {} if method == "full" else {"r": 32, "alpha": 32, "target_modules": ["q", "v"]}
            cfg = TuneConfig(method="full" if method == "full" else "lora", bits=4 if method == "qlora" else None,
                             lr=1e-4 if method == "full" else 1e-3, batch_size=args.batch_size,
                             max_steps=args.steps, log_every=10, checkpoint_every=10**9,
                             seed=args.seed, compile=args.compile, **extra)
            logs: list[dict] = []
            torch.cuda.reset_peak_memory_stats()
            trained = fit(cfg, str(model_dir), examples, examples[:8], TEMPLATE, Path(tmp) / method,
                          log=logs.append, progress=False, dtype="bfloat16")
            windows = [r["tokens_per_s"] for r in logs if "tokens_per_s" in r]
            padded_tps = statistics.mean(windows[1:] or windows)  # the first window holds the warm-up
            useful_share = trained.summary["useful_tokens_per_s"] / trained.summary["tokens_per_s"]
            useful_tps = padded_tps * useful_share
            ex_per_s = useful_tps / (stats["src"] + stats["tgt"])
            model_flops = flops_per_example(config, **stats, backward_factor=3 if method == "full" else 2) * ex_per_s
            results[method] = {
                "useful_tokens_per_s": round(useful_tps), "padded_tokens_per_s": round(padded_tps),
                "examples_per_s": round(ex_per_s, 1), "model_tflops_per_s": round(model_flops / 1e12, 1),
                "mfu": round(model_flops / (args.peak_tflops * 1e12), 4),
                "trainable_pct": round(trained.summary["trainable_pct"], 3),
                "final_train_loss": round(trained.summary["final_train_loss"], 4),
                # the loop starts a new peak at every log line and keeps the highest in its summary
                "peak_gpu_memory_gb": round(max(torch.cuda.max_memory_allocated() / 2**20,
                                                trained.summary.get("train_peak_memory_mb") or 0) / 1024, 2),
                "batch_size": trained.summary.get("batch_size"), "compiled": trained.summary.get("compiled"),
            }
            del trained
            torch.cuda.empty_cache()
    print(json.dumps({
        "benchmark": "gpu_tune", "gpu": torch.cuda.get_device_name(0), "precision": "bf16 autocast",
        "model": facts, "batch_size": args.batch_size, "steps": args.steps, "examples": len(examples),
        "mean_source_tokens": round(stats["src"], 1), "mean_target_tokens": round(stats["tgt"], 1),
        "peak_tflops_assumed": args.peak_tflops, "results": results, "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
