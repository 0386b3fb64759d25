"""Seconds per PPO step: llmcycle.stages.align.ppo vs TRL 0.11.4's PPOTrainer (the course's lab 3), same model and work.

A t5-small-shaped model (d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128, random weights from
--seed, tokenizer trained on DialogSum) is saved once; both sides load those very weights (a checksum
of all parameters is reported for each) and run full-policy PPO on the same batches of 16 DialogSum dev
prompts (the course's template): sample 32 new tokens per prompt (top_k 0, top_p 1), reward = number
of "the" in the response, then 4 PPO epochs of mini-batches of 4, Adam lr 1.41e-5, adaptive KL (0.2,
target 6, horizon 10000), gamma 1, lambda 0.95, clip 0.2 / 0.2, vf_coef 0.1, grad-norm clip 1.0.

  llmcycle  PPOTrainer.step(prompts): rollout, reward, KL, GAE, updates (dropout off by design)
  trl       PPOTrainer.generate(queries, batch_size=16) + decode + reward + PPOTrainer.step, the lab's
            loop with batched generation (the lab generated one prompt at a time, which is slower)

TRL 0.11.4 (the last with this trainer) needs transformers 4.x, so it runs in its own virtual
environment, created on first use at benchmarks/.venv-trl011 (git-ignored) from the pins in TRL_PINS.
Each side runs in its own process with its model loaded; the two take turns one step at a time in
ABBA order (llmcycle, trl, trl, llmcycle, ...) after --warmup untimed steps each, so the load of other
processes on a shared machine falls on both alike. Wall and CPU seconds are recorded per step (CPU
time moves less with that load), and each pair of steps run back to back gives a ratio of its own.

    OMP_NUM_THREADS=2 .venv/bin/python benchmarks/ppo_step.py [--steps 4] [--warmup 1] [--new-tokens 32]

Prints exactly one JSON line. Without DialogSum it uses synthetic dialogues of similar length (and says
so); if the TRL environment cannot be built, the JSON says why and gives no ratio.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent))  # run from a checkout without installing
DEFAULT_DATA = HERE.parents[1] / "shared/data/dialogsum"
OUT = HERE / "out"  # git-ignored; the model and prompts are cached there
TRL_VENV = HERE / ".venv-trl011"
TRL_PINS = ["torch==2.13.0", "trl==0.11.4", "transformers==4.46.3", "tokenizers==0.20.3", "accelerate==1.0.1",
            "datasets==3.0.2", "numpy==2.1.3", "pyarrow==26.0.1", "tyro==1.0.17", "rich==15.0.0"]
TEMPLATE = "Summarize the following conversation.\n\n{dialogue}\n\nSummary:"
WINDOW = 512
BATCH, MINI_BATCH, EPOCHS, LR = 16, 4, 4, 1.41e-5


def reward(text: str) -> float:
    """The same cheap score on both sides, so the reward model costs neither anything."""
    return float(text.count("the"))


def peak_rss_mib() -> float:
    return round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1)


def checksum(model) -> float:
    import torch

    with torch.no_grad():
        return float(sum(p.double().sum() for p in model.parameters()))


# ---------------------------------------------------------------------------------- setup (parent)
def read_records(data: Path) -> tuple[list[dict], list[dict], str]:
    """(dev records for prompts, records for the tokenizer, a description of the data)."""
    dev, train = data / "dialogsum.dev.jsonl", data / "dialogsum.train.jsonl"
    if dev.is_file():
        read = lambda p: [json.loads(line) for line in open(p, encoding="utf-8") if line.strip()]  # noqa: E731
        records = read(dev)
        return records, (read(train) if train.is_file() else records), str(dev)
    rng = random.Random(0)  # synthetic dialogues, DialogSum-like length (~150 words)
    words = "the a to you I and we it is for that can do what have my your this be with not so".split()
    words += "meeting price ticket doctor weekend office dinner train phone party money job hotel".split()
    records = [{"dialogue": "\n".join(f"#Person{1 + t % 2}#: " + " ".join(rng.choices(words, k=12)) + "."
                                      for t in range(12)), "summary": " ".join(rng.choices(words, k=20))}
               for _ in range(400)]
    return records, records, f"synthetic (no DialogSum at {data})"


def build_model(args, corpus: list[str], out: Path) -> None:
    """t5-small's dimensions, random init from --seed, tokenizer trained on the corpus; atomic."""
    import torch
    from transformers import T5Config, T5ForConditionalGeneration

    from llmcycle.stages.pretrain.stage import PretrainConfig
    from llmcycle.stages.pretrain.data import train_tokenizer

    tok = train_tokenizer(corpus, PretrainConfig(architecture="t5", size="small", vocab_size=32000,
                                                 seq_len=WINDOW, max_steps=1, seed=args.seed))
    config = T5Config(vocab_size=32128, d_model=512, d_kv=64, d_ff=2048, num_layers=6, num_decoder_layers=6,
                      num_heads=8, dropout_rate=args.dropout, feed_forward_proj="relu", tie_word_embeddings=True,
                      pad_token_id=tok.pad_token_id, eos_token_id=tok.eos_token_id,
                      decoder_start_token_id=tok.pad_token_id)
    torch.manual_seed(args.seed)
    tmp = out.with_name(out.name + f".tmp-{os.getpid()}")
    T5ForConditionalGeneration(config).save_pretrained(tmp)
    tok.save_pretrained(tmp)
    os.replace(tmp, out)


def ensure_trl_venv() -> str | None:
    """None when benchmarks/.venv-trl011 has TRL_PINS installed (installing them if needed), else why not."""
    python, stamp = TRL_VENV / "bin" / "python", TRL_VENV / "pins.txt"
    if python.is_file() and stamp.is_file() and stamp.read_text().split() == TRL_PINS:
        return None
    base = getattr(sys, "_base_executable", sys.executable)
    steps = [[base, "-m", "venv", "--clear", str(TRL_VENV)],
             [str(python), "-m", "pip", "install", "--quiet", "--disable-pip-version-check", *TRL_PINS]]
    for cmd in steps:
        proc = subprocess.run(cmd, capture_output=True, text=True)
        if proc.returncode != 0:
            lines = [ln for ln in (proc.stderr + proc.stdout).splitlines() if "is ignored" not in ln]
            return f"{' '.join(cmd[:4])} ... failed ({proc.returncode}): " + " | ".join(lines[-4:])
    stamp.write_text("\n".join(TRL_PINS) + "\n")
    return None


class Side:
    """One side in its own process, models loaded, running one PPO step per request on stdin."""

    def __init__(self, name: str, python: str, args, model_dir: Path, prompts_file: Path):
        self.name, self.log = name, OUT / f"ppo-step-{name}.stderr"
        cmd = [python, __file__, "--child", name, "--model-dir", str(model_dir), "--prompts-file", str(prompts_file),
               "--new-tokens", str(args.new_tokens), "--seed", str(args.seed)]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=open(self.log, "w"),
                                     text=True)
        self.info = self.read()  # sent once the model is loaded

    def read(self) -> dict:
        line = self.proc.stdout.readline()
        if not line:
            raise SystemExit(f"{self.name} child failed ({self.proc.wait()}): {self.log.read_text()[-3000:]}")
        return json.loads(line)

    def step(self, batch: int) -> dict:
        self.proc.stdin.write(f"{batch}\n")
        self.proc.stdin.flush()
        return self.read()

    def close(self) -> dict:
        self.proc.stdin.close()
        final = self.read()
        self.proc.wait()
        return final


def serve_steps(run_step: Callable[[dict], dict], batches: list[dict], info: dict) -> None:
    """The child's loop: report `info`, then one step per batch index read from stdin (wall and CPU
    seconds: CPU time moves less than wall time when other processes share the cores)."""
    print(json.dumps(info), flush=True)
    for line in sys.stdin:
        wall, cpu = time.perf_counter(), time.process_time()
        result = run_step(batches[int(line)])
        print(json.dumps({**result, "wall_s": time.perf_counter() - wall, "cpu_s": time.process_time() - cpu}),
              flush=True)
    print(json.dumps({"peak_rss_mib": peak_rss_mib()}), flush=True)


# ------------------------------------------------------------------------------ the two children
def child_llmcycle(args, batches: list[dict]) -> None:
    import torch

    from llmcycle.models.load import load_model
    from llmcycle.stages.align.ppo import PPOSettings, PPOTrainer

    model, tok = load_model(args.model_dir, dtype="float32", device="cpu")
    settings = PPOSettings(steps=10**6, batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS, lr=LR,
                           init_kl_coef=0.2, adaptive_kl=True, target_kl=6.0, kl_horizon=10000, gamma=1.0, lam=0.95,
                           cliprange=0.2, cliprange_value=0.2, vf_coef=0.1, grad_clip=1.0, temperature=1.0,
                           top_k=0, top_p=1.0, min_new_tokens=args.new_tokens, max_new_tokens=args.new_tokens,
                           seed=args.seed)
    trainer = PPOTrainer(model, tok, "seq2seq", lambda prompts, texts: [reward(t) for t in texts], settings)

    def run_step(batch: dict) -> dict:
        return {"response_length": trainer.step(batch["texts"])["response_length"]}

    serve_steps(run_step, batches, {"weights_checksum": checksum(model), "threads": torch.get_num_threads(),
                                    "versions": {"torch": torch.__version__}})


def child_trl(args, batches: list[dict]) -> None:
    import warnings

    import torch
    import transformers
    import trl
    from transformers import PreTrainedTokenizerFast
    from trl import AutoModelForSeq2SeqLMWithValueHead, PPOConfig, PPOTrainer

    warnings.filterwarnings("ignore")
    tok = PreTrainedTokenizerFast(tokenizer_file=str(Path(args.model_dir) / "tokenizer.json"), pad_token="<pad>",
                                  eos_token="</s>", unk_token="<unk>")
    model = AutoModelForSeq2SeqLMWithValueHead.from_pretrained(args.model_dir, torch_dtype=torch.float32)
    config = PPOConfig(learning_rate=LR, batch_size=BATCH, mini_batch_size=MINI_BATCH, ppo_epochs=EPOCHS,
                       gradient_accumulation_steps=1, init_kl_coef=0.2, adap_kl_ctrl=True, target=6.0,
                       horizon=10000, gamma=1.0, lam=0.95, cliprange=0.2, cliprange_value=0.2, vf_coef=0.1,
                       max_grad_norm=1.0, seed=args.seed)
    trainer = PPOTrainer(config=config, model=model, ref_model=None, tokenizer=tok)
    gen_kwargs = {"min_length": -1, "top_k": 0, "top_p": 1.0, "do_sample": True, "max_new_tokens": args.new_tokens,
                  "pad_token_id": tok.pad_token_id, "eos_token_id": tok.eos_token_id}

    def run_step(batch: dict) -> dict:  # the lab's loop body
        queries = [torch.tensor(ids) for ids in batch["ids"]]
        responses = trainer.generate(queries, batch_size=BATCH, **gen_kwargs)
        texts = tok.batch_decode(responses, skip_special_tokens=True)
        trainer.step(queries, responses, [torch.tensor(reward(t)) for t in texts])
        return {"response_length": statistics.mean(len(r) - 1 for r in responses)}  # minus the start token

    serve_steps(run_step, batches, {
        "weights_checksum": checksum(model.pretrained_model), "threads": torch.get_num_threads(),
        "versions": {"torch": torch.__version__, "trl": trl.__version__, "transformers": transformers.__version__}})


# ------------------------------------------------------------------------------------------ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DEFAULT_DATA, help="folder with dialogsum.dev.jsonl")
    ap.add_argument("--steps", type=int, default=4, help="timed PPO steps per side")
    ap.add_argument("--warmup", type=int, default=1, help="untimed steps per side first")
    ap.add_argument("--new-tokens", type=int, default=32, help="response length (min = max new tokens)")
    ap.add_argument("--dropout", type=float, default=0.1, help="the model's dropout_rate (t5-small's is 0.1)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--child", choices=["llmcycle", "trl"], help=argparse.SUPPRESS)
    ap.add_argument("--model-dir", help=argparse.SUPPRESS)
    ap.add_argument("--prompts-file", help=argparse.SUPPRESS)
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")

    if args.child:  # one side, in this process (the TRL side in its own environment)
        batches = json.loads(Path(args.prompts_file).read_text())
        (child_llmcycle if args.child == "llmcycle" else child_trl)(args, batches)
        return 0

    records, corpus_records, data_desc = read_records(args.data)
    synthetic = "-synthetic" if "synthetic" in data_desc else ""
    model_dir = OUT / f"ppo-step-t5-small-s{args.seed}-d{args.dropout}{synthetic}"
    t0 = time.perf_counter()
    built = not (model_dir / "config.json").is_file()
    if built:
        OUT.mkdir(parents=True, exist_ok=True)
        build_model(args, [r["dialogue"] for r in corpus_records] + [r["summary"] for r in corpus_records], model_dir)
    build_s = time.perf_counter() - t0

    from llmcycle.models.hub import load_tokenizer
    from llmcycle.data.prompting import encode_prompt

    tok = load_tokenizer(str(model_dir))
    n = (args.warmup + args.steps) * BATCH
    texts, ids = [], []
    for r in records:  # the first prompts that fit the window (neither side truncates)
        prompt = TEMPLATE.format(dialogue=r["dialogue"])
        encoded = encode_prompt(tok, prompt, "seq2seq")  # what llmcycle feeds the model; TRL gets the same ids
        if len(encoded) <= WINDOW:
            texts.append(prompt)
            ids.append(encoded)
        if len(texts) == n:
            break
    if len(texts) < n:
        raise SystemExit(f"only {len(texts)} prompts fit {WINDOW} tokens; need {n}")
    prompts_file = model_dir / f"prompts-{n}.json"
    prompts_file.write_text(json.dumps([{"texts": texts[i:i + BATCH], "ids": ids[i:i + BATCH]}
                                        for i in range(0, n, BATCH)]))

    t0 = time.perf_counter()
    trl_problem = ensure_trl_venv()
    venv_s = time.perf_counter() - t0
    sides = {"llmcycle": Side("llmcycle", sys.executable, args, model_dir, prompts_file)}
    if not trl_problem:
        sides["trl"] = Side("trl", str(TRL_VENV / "bin" / "python"), args, model_dir, prompts_file)
    load_before = os.getloadavg()
    # Both processes stay loaded and take turns, one step at a time, in ABBA order (llmcycle, trl, trl,
    # llmcycle, ...): the load of other processes on a shared machine falls on both sides alike.
    results = {name: [] for name in sides}
    for i in range(args.warmup + args.steps):
        names = list(sides) if i % 2 == 0 else list(sides)[::-1]
        for name in names:
            r = sides[name].step(i)
            if i >= args.warmup:
                results[name].append({**r, "loadavg_1min": round(os.getloadavg()[0], 2)})
    load_after = os.getloadavg()
    finals = {name: side.close() for name, side in sides.items()}

    def summary(name: str) -> dict:
        rows = results[name]
        return {"wall_s_mean": round(statistics.mean(r["wall_s"] for r in rows), 2),
                "wall_s_median": round(statistics.median(r["wall_s"] for r in rows), 2),
                "cpu_s_mean": round(statistics.mean(r["cpu_s"] for r in rows), 2),
                "wall_s": [round(r["wall_s"], 2) for r in rows], "cpu_s": [round(r["cpu_s"], 2) for r in rows],
                "loadavg_1min_after_each": [r["loadavg_1min"] for r in rows],
                "response_length": round(statistics.mean(r["response_length"] for r in rows), 2),
                "peak_rss_mib": finals[name]["peak_rss_mib"], **sides[name].info}

    ours = summary("llmcycle")
    theirs = summary("trl") if "trl" in sides else None
    ratio = (lambda key: round(ours[key] / theirs[key], 3) if theirs else None)  # noqa: E731
    # per-pair ratios: the two steps of a pair ran back to back, under about the same load
    pairs = [round(a["wall_s"] / b["wall_s"], 3) for a, b in zip(results["llmcycle"], results.get("trl", []))]
    print(json.dumps({
        "benchmark": "ppo_step",
        "seconds_per_step": {"llmcycle": ours["wall_s_mean"], "trl_0.11.4": theirs["wall_s_mean"] if theirs else None},
        "ratio_llmcycle_over_trl": ratio("wall_s_mean"),
        "ratio_median_wall": ratio("wall_s_median"), "ratio_cpu_time": ratio("cpu_s_mean"),
        "ratio_per_step_pair": pairs,
        "goal": {"ratio_llmcycle_over_trl": "<= 1.0"},
        "trl_unavailable": trl_problem,
        "same_weights": abs(ours["weights_checksum"] - theirs["weights_checksum"]) < 1e-6 if theirs else None,
        "llmcycle": ours, "trl": theirs,
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "settings": {"batch_size": BATCH, "mini_batch_size": MINI_BATCH, "ppo_epochs": EPOCHS, "lr": LR,
                     "new_tokens": args.new_tokens, "timed_steps_per_side": args.steps, "warmup_steps": args.warmup,
                     "seed": args.seed, "order": "steps alternate ABBA between two loaded processes",
                     "policy": "full (reference = frozen copy on both sides)", "sampling": "top_k 0, top_p 1, T 1",
                     "trl_generate_batch_size": BATCH, "trl_pins": TRL_PINS,
                     "omp_num_threads": os.environ.get("OMP_NUM_THREADS")},
        "model": {"arch": "t5", "dims": "t5-small: d_model 512, 6+6 layers, 8 heads, d_ff 2048, vocab 32128",
                  "dropout_rate": args.dropout, "init": f"random, seed {args.seed}", "built_now": built,
                  "build_s": round(build_s, 1), "dir": str(model_dir)},
        "trl_venv": {"path": str(TRL_VENV), "setup_s": round(venv_s, 1)},
        "data": data_desc,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
