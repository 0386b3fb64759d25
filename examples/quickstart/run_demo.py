"""`make demo`: generate the quickstart's data, carry the project through the lifecycle, print results.

Everything runs offline: the data is generated here and the base model is pretrained by `llmcycle`.
Each step is the command a user would type; they run in this folder.
"""
from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def llmcycle(*args: str) -> None:
    cmd = [sys.executable, "-m", "llmcycle", *args]
    print("$ llmcycle " + " ".join(args), flush=True)
    subprocess.run(cmd, cwd=HERE, check=True)


def free_port() -> int:
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve_and_ask() -> None:
    """Deploy: serve the best run within the scope's budgets, ask it once with the `openai` client,
    then stop the server (SIGTERM drains in-flight requests)."""
    import json
    import signal
    import urllib.request

    port = free_port()
    print(f"$ llmcycle serve --run best --port {port}", flush=True)
    server = subprocess.Popen([sys.executable, "-m", "llmcycle", "serve", "--run", "best", "--port", str(port)],
                              cwd=HERE)
    try:
        for _ in range(240):  # loading the model takes a few seconds
            try:
                with urllib.request.urlopen(f"http://127.0.0.1:{port}/health", timeout=1) as r:
                    if json.load(r).get("status") == "ok":
                        break
            except OSError:
                if server.poll() is not None:
                    raise SystemExit("the server stopped before it was ready")
                time.sleep(0.5)
        from openai import OpenAI

        client = OpenAI(base_url=f"http://127.0.0.1:{port}/v1", api_key="unused")
        dialogue = ("#Person1#: I would like a ticket to Oslo for Friday.\n#Person2#: First or second class?\n"
                    "#Person1#: Second class, please. How much is it?\n#Person2#: That is 40 euros.")
        # greedy, so the demo's answer is the same every time (the API's default samples at temperature 1)
        reply = client.chat.completions.create(model=client.models.list().data[0].id, max_tokens=40,
                                               temperature=0, messages=[{"role": "user", "content": dialogue}])
        print("request:", dialogue.replace("\n", " | "))
        print("reply:  ", reply.choices[0].message.content, f"({reply.usage.completion_tokens} tokens)")
        # served ≡ evaluated: the served model, evaluated through its API on the first 40 eval dialogues,
        # must give the outputs its run's evaluation gave (the report compares them example by example)
        llmcycle("eval", "--endpoint", f"http://127.0.0.1:{port}/v1", "--model", client.models.list().data[0].id,
                 "--concurrency", "16", "--limit", "40")
    finally:
        server.send_signal(signal.SIGTERM)
        server.wait(timeout=60)


def main() -> None:
    start = time.time()
    if not (HERE / "data" / "toxicity.jsonl").exists():
        subprocess.run([sys.executable, "make_data.py"], cwd=HERE, check=True)
    llmcycle("run")                      # every configured stage, in lifecycle order, compared at the end
    llmcycle("scope")                    # the plan again, now with the pretrained model's tokenizer
    llmcycle("runs", "list")
    serve_and_ask()
    llmcycle("report")                   # one self-contained HTML page: lineage, variants vs the scope, plots
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    print(f"results: {HERE / 'runs'} (one folder per run; `llmcycle runs show RUN` in {HERE})")
    print(f"report:  {HERE / 'report.html'} (open it in a browser; it needs no network)")


if __name__ == "__main__":
    main()
