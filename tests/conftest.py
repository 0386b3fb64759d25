"""Shared test settings."""
import os

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
