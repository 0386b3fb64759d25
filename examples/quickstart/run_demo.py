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


def main() -> None:
    start = time.time()
    if not (HERE / "data" / "train.jsonl").exists():
        subprocess.run([sys.executable, "make_data.py"], cwd=HERE, check=True)
    llmcycle("run")                      # every configured stage, in lifecycle order, compared at the end
    llmcycle("scope")                    # the plan again, now with the pretrained model's tokenizer
    llmcycle("runs", "list")
    print(f"\ndemo finished in {time.time() - start:.0f} s")
    print(f"results: {HERE / 'runs'} (one folder per run; `llmcycle runs show RUN` in {HERE})")


if __name__ == "__main__":
    main()
