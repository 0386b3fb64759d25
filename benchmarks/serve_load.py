"""Inference server load: dynamic batching vs one request at a time, and a lone request vs model.generate.

A GPT-2-shaped model of a few million parameters (random weights, its own byte-level BPE tokenizer) is
built locally and served by `llmcycle.serve.app.serve` twice, in two server processes side by side:

  batched        max_batch_size 16: concurrent requests share forward passes (llmcycle.serve.engine)
  one_at_a_time  max_batch_size 1: the same server and engine, one request in the model at a time

Every request asks for exactly --max-tokens tokens (min_tokens = max_tokens masks EOS out), so both
servers do the same work. Measured in one run:

  throughput     completion tokens/s with --clients concurrent clients (goal: batched >= 3x one at a time)
  lone latency   p50 of one request at a time to the idle batched server vs p50 of a bare
                 `model.generate` call in this process on the same prompt and max_new_tokens (goal <= 1.2x);
                 the server's greedy text must equal generate's

    .venv/bin/python benchmarks/serve_load.py [--clients 16] [--requests 64] [--max-tokens 32] [--arch gpt|t5]

Prints exactly one JSON line. Needs no data: prompts are synthetic sentences.
"""
from __future__ import annotations

import argparse
import concurrent.futures
import json
import os
import random
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # run from a checkout without installing

SERVER = """
import sys
from llmcycle.serve.app import serve
serve(sys.argv[1], port=int(sys.argv[2]), max_batch_size=int(sys.argv[3]), model_name="bench", log_level="warning",
      device=sys.argv[4])
"""


def corpus(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    words = [("".join(rng.choice("abcdefghijklmnopqrstuvwxyz") for _ in range(rng.randint(2, 8))))
             for _ in range(3000)]
    return [" ".join(rng.choice(words) for _ in range(rng.randint(8, 40))) for _ in range(n)]


def build_model(args, out: Path) -> dict:
    """Tokenizer + random-weight model saved to `out`; returns facts for the report."""
    import torch

    from llmcycle.models.hub import auto_class
    from llmcycle.stages.pretrain.stage import PretrainConfig
    from llmcycle.models.scratch import build_model_config
    from llmcycle.stages.pretrain.data import train_tokenizer

    cfg = PretrainConfig(architecture=args.arch, size="tiny", d_model=args.d_model, n_layers=args.layers,
                         n_heads=4, vocab_size=args.vocab, seq_len=512, max_steps=1, seed=0)
    tok = train_tokenizer(corpus(3000, 0), cfg)
    torch.manual_seed(0)
    config = build_model_config(cfg, tok)
    model = auto_class(config).from_config(config)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    return {"arch": args.arch, "d_model": args.d_model, "layers": args.layers, "vocab_size": len(tok),
            "parameters": sum(p.numel() for p in model.parameters()), "init": "random, seed 0"}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(model_dir: Path, max_batch_size: int, device: str):
    port = free_port()
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join([str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p]), "TRANSFORMERS_VERBOSITY": "error"}
    proc = subprocess.Popen([sys.executable, "-c", SERVER, str(model_dir), str(port), str(max_batch_size), device],
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    url = f"http://127.0.0.1:{port}"
    wait_until_healthy(proc, url, 120)
    return proc, url


def wait_until_healthy(proc, url: str, seconds: float) -> None:
    """Poll the server's /health until it answers 200; its stderr's end when it exits first."""
    import httpx

    deadline = time.time() + seconds
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-2000:]}")
        try:
            if httpx.get(f"{url}/health").status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.time() > deadline:
            proc.kill()
            raise SystemExit(f"server did not start in {seconds:g} s")
        time.sleep(0.1)


def request_body(prompt: str, max_tokens: int) -> dict:
    return {"model": "bench", "prompt": prompt, "max_tokens": max_tokens, "min_tokens": max_tokens,
            "temperature": 0}


def load_round(url: str, prompts: list[str], clients: int, max_tokens: int) -> tuple[int, float, int]:
    """All prompts through `clients` concurrent clients; (completion tokens, wall seconds, non-200s)."""
    import httpx

    local = threading.local()

    def one(prompt: str) -> tuple[int, int]:
        if not hasattr(local, "http"):
            local.http = httpx.Client(base_url=url, timeout=600)
        r = local.http.post("/v1/completions", json=request_body(prompt, max_tokens))
        return r.status_code, r.json()["usage"]["completion_tokens"] if r.status_code == 200 else 0

    start = time.perf_counter()
    with concurrent.futures.ThreadPoolExecutor(clients) as pool:
        results = list(pool.map(one, prompts))
    wall = time.perf_counter() - start
    return sum(t for _, t in results), wall, sum(s != 200 for s, _ in results)


def mean_batch(url: str) -> float:
    import httpx

    text = httpx.get(f"{url}/metrics").text
    get = lambda name: float(next(l for l in text.splitlines() if l.startswith(name)).rsplit(" ", 1)[1])  # noqa: E731
    steps = get("llmcycle_batch_size_count")
    return get("llmcycle_batch_size_sum") / steps if steps else 0.0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--arch", choices=["gpt", "t5"], default="gpt")
    ap.add_argument("--d-model", type=int, default=256)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--vocab", type=int, default=4000)
    ap.add_argument("--clients", type=int, default=16, help="concurrent clients in the throughput test")
    ap.add_argument("--requests", type=int, default=64, help="requests per server in the throughput test")
    ap.add_argument("--max-tokens", type=int, default=32)
    ap.add_argument("--lone", type=int, default=20, help="lone requests (and generate calls) for the p50")
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu",
                    help="where the servers and the bare generate run (cuda: the GPU figures of the closing note)")
    args = ap.parse_args()
    os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

    import httpx
    import torch

    from llmcycle.evaluation import harness

    torch.set_num_threads(1)  # as the servers (OMP_NUM_THREADS=1): one core each on a shared machine
    prompts = corpus(args.requests, 1)
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(tmp) / "model"
        facts = build_model(args, model_dir)
        servers = {"batched": start_server(model_dir, 16, args.device),
                   "one_at_a_time": start_server(model_dir, 1, args.device)}
        try:
            for _, url in servers.values():  # untimed warm-up: first forward passes, allocator, connections
                load_round(url, prompts[:4], 4, 4)

            # Throughput, in halves (batched, single, single, batched) so a drift in machine load cancels.
            load_before = os.getloadavg()
            tokens = {k: 0 for k in servers}
            wall = {k: 0.0 for k in servers}
            failed = 0
            half = len(prompts) // 2
            for name, part in (("batched", prompts[:half]), ("one_at_a_time", prompts[:half]),
                               ("one_at_a_time", prompts[half:]), ("batched", prompts[half:])):
                t, w, f = load_round(servers[name][1], part, args.clients, args.max_tokens)
                tokens[name] += t
                wall[name] += w
                failed += f
            rate = {k: tokens[k] / wall[k] for k in servers}
            batch = {k: round(mean_batch(url), 2) for k, (_, url) in servers.items()}

            # Lone request vs bare model.generate, interleaved one by one.
            loaded = harness.load(str(model_dir), device=args.device)
            model, tok = loaded.model, loaded.tokenizer
            prompt = prompts[0]
            ids = tok(prompt, return_tensors="pt").to(model.device)
            kw = dict(max_new_tokens=args.max_tokens, min_new_tokens=args.max_tokens, do_sample=False,
                      pad_token_id=loaded.generator.pad_id)
            url = servers["batched"][1]
            http = httpx.Client(base_url=url, timeout=600)
            with torch.inference_mode():
                model.generate(**ids, **kw)
                http.post("/v1/completions", json=request_body(prompt, args.max_tokens))
                lat = {"server": [], "generate": []}
                for _ in range(args.lone):
                    t0 = time.perf_counter()
                    out = model.generate(**ids, **kw)
                    lat["generate"].append(time.perf_counter() - t0)
                    t0 = time.perf_counter()
                    r = http.post("/v1/completions", json=request_body(prompt, args.max_tokens))
                    lat["server"].append(time.perf_counter() - t0)
            start = 1 if loaded.kind == "seq2seq" else ids["input_ids"].shape[1]
            generate_text = tok.decode(out[0, start:], skip_special_tokens=True)
            server_text = r.json()["choices"][0]["text"]
            load_after = os.getloadavg()
        finally:
            for proc, _ in servers.values():
                proc.terminate()
            for proc, _ in servers.values():
                proc.wait(60)
    p50 = {k: statistics.median(v) for k, v in lat.items()}
    print(json.dumps({
        "benchmark": "serve_load",
        "completion_tokens_per_s": {k: round(v, 1) for k, v in rate.items()},
        "batched_over_one_at_a_time": round(rate["batched"] / rate["one_at_a_time"], 2),
        "p50_latency_s": {"lone_request": round(p50["server"], 4), "model_generate": round(p50["generate"], 4)},
        "lone_request_over_generate": round(p50["server"] / p50["generate"], 3),
        "goals": {"batched_over_one_at_a_time": ">= 3", "lone_request_over_generate": "<= 1.2"},
        "identical_greedy_text": server_text == generate_text,
        "non_200_responses": failed,
        "mean_rows_per_decode_step": batch,
        "clients": args.clients, "requests_per_server": len(prompts), "max_tokens": args.max_tokens,
        "completion_tokens": tokens, "wall_s": {k: round(v, 2) for k, v in wall.items()},
        "lone_requests": args.lone, "prompt_tokens_lone": int(ids["input_ids"].shape[1]),
        "model": facts,
        "schedule": "throughput halves: batched, one_at_a_time, one_at_a_time, batched; then lone request and "
                    "generate alternately",
        "servers": "two subprocesses (llmcycle.serve.app.serve), OMP_NUM_THREADS=1; clients: httpx threads",
        "loadavg": {"before": [round(x, 2) for x in load_before], "after": [round(x, 2) for x in load_after]},
        "cpu_threads": torch.get_num_threads(), "torch": torch.__version__, "device": args.device,
        "gpu": torch.cuda.get_device_name(0) if args.device == "cuda" else None,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
