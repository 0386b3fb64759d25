"""Shared test settings, and the headless browser the dashboard tests share.

Tests mirror the package's folders (tests/core, tests/models, tests/stages, ...). The helpers at the
top (tiny.py: models built in code; servers.py) and the test modules that others reuse (a project
builder, a trained tiny model) are importable from every folder: each test folder is on sys.path."""
import os
import shutil
import sys
from pathlib import Path

import pytest

_TESTS = Path(__file__).resolve().parent
for _folder in [_TESTS, *sorted(p for p in _TESTS.iterdir() if p.is_dir() and not p.name.startswith(("_", ".")))]:
    if str(_folder) not in sys.path:
        sys.path.insert(0, str(_folder))

# Tiny models run faster on one thread, and the suite must not fight itself for the 2 cores.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# Never reach for the Hub from tests: everything is built locally.
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# The suite checks exact CPU results (float32 weights, equality with a CPU reference), so on a GPU
# machine it still runs on the CPU; LLMCYCLE_TEST_GPU=1 shows the GPU, for tests/test_gpu.py.
if os.environ.get("LLMCYCLE_TEST_GPU") != "1":
    os.environ["CUDA_VISIBLE_DEVICES"] = ""

CHROMIUM_ARGS = ["--headless", "--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


@pytest.fixture(scope="module")  # per module, as other modules run asyncio between them
def browser():
    """The system's Chromium under Playwright; tests that use it skip, saying why, when either is missing."""
    sync_api = pytest.importorskip("playwright.sync_api",
                                   reason="playwright is not installed (pip install playwright==1.65.2)")
    exe = os.environ.get("LLMCYCLE_CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if exe is None:
        pytest.skip("chromium is not installed (apt-get install chromium): browser tests skipped")
    with sync_api.sync_playwright() as p:
        # The system's Chromium, not `playwright install`: that would download browsers at test time.
        b = p.chromium.launch(executable_path=exe, args=CHROMIUM_ARGS)
        yield b
        b.close()
