"""The GPU paths on tiny models: bf16 mixed-precision tuning, QLoRA / int8 LoRA (bitsandbytes), the
bitsandbytes optimize schemes and the server's engine on CUDA. They skip on machines without a CUDA GPU
(CI has none); run them on one with `LLMCYCLE_TEST_GPU=1 pytest tests/test_gpu.py` (without it,
tests/conftest.py hides the GPU so the rest of the suite keeps its exact CPU checks)."""
import importlib.util

import pytest
import torch

from llmcycle.models.generation import GenerationConfig, Generator
from llmcycle.models.load import load_model
from test_optimize import execute as optimize_execute, make_project as optimize_project
from test_tune import _changes, _initial, examples, train
from tiny import make_gpt2

HAS_CUDA = torch.cuda.is_available()
HAS_BNB = importlib.util.find_spec("bitsandbytes") is not None
pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not HAS_CUDA, reason="needs a CUDA GPU and LLMCYCLE_TEST_GPU=1")]
needs_bnb = pytest.mark.skipif(not HAS_BNB, reason="needs bitsandbytes (pip install bitsandbytes)")


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_full_tuning_runs_on_the_gpu_in_bf16_and_learns(tmp_path, arch):
    trained, base = train(tmp_path, arch, steps=30, method="full", lr=3e-3)
    assert trained.device.type == "cuda"
    assert next(trained.model.parameters()).dtype == torch.float32  # fp32 master weights under bf16 autocast
    trainable, changed, names = _changes(_initial(base, arch, method="full"), trained.model.cpu())
    assert trainable == changed == names
    assert torch.isfinite(torch.tensor(trained.summary["final_train_loss"]))
    assert trained.summary["useful_tokens_per_s"] > 0


@needs_bnb
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_quantized_base_lora_trains_only_the_adapter(tmp_path, arch, bits):
    import bitsandbytes as bnb

    trained, _ = train(tmp_path, arch, steps=6, method="lora", bits=bits, target_modules=["q", "v"]
                       if arch == "t5" else ["c_attn"])
    quant_cls = bnb.nn.Linear4bit if bits == 4 else bnb.nn.Linear8bitLt
    quantized = [n for n, m in trained.model.named_modules() if isinstance(m, quant_cls)]
    assert quantized, "the frozen base layers were not quantized"
    lora = {n for n, p in trained.model.named_parameters() if p.requires_grad}
    assert lora and all("lora_" in n for n in lora)
    # the adapter learned: B starts at zero, so any non-zero B means the optimizer moved it
    assert any(p.abs().sum() > 0 for n, p in trained.model.named_parameters() if "lora_B" in n)


@needs_bnb
@pytest.mark.parametrize("scheme,bits", [("bnb_int8", 8), ("bnb_nf4", 4)])
def test_bitsandbytes_schemes_are_saved_reloaded_and_evaluated(tmp_path, scheme, bits):
    path = optimize_project(tmp_path, {"q": {"method": "quantize", "scheme": scheme, "latency_samples": 4}})
    out = optimize_execute(path, "q")
    s = out.summary
    assert s["weight_bits"] == bits and s["device"] == "cuda"
    assert s["headline"] == "rougeL" and s["n_examples"] == 6 and s["latency_p50_ms"] > 0
    model, tok = load_model(s["model_dir"])  # what eval and serve do with the folder
    assert model.device.type == "cuda" and model.config.quantization_config is not None
    outs = Generator(model, tok).generate([e.input for e in examples(3)], GenerationConfig(max_new_tokens=4))
    assert len(outs) == 3


def test_server_engine_generates_on_the_gpu_as_generate_does(tmp_path):
    from llmcycle.evaluation import harness

    folder = make_gpt2(tmp_path / "g")
    loaded = harness.load(str(folder), device="cuda", dtype="float32")
    assert loaded.model.device.type == "cuda"
    cpu, tok = load_model(str(folder), device="cpu")
    prompts = [e.input for e in examples(4)]
    cfg = GenerationConfig(max_new_tokens=6)
    on_gpu = [r.token_ids for r in loaded.generator.generate(prompts, cfg)]
    on_cpu = [r.token_ids for r in Generator(cpu, tok).generate(prompts, cfg)]
    assert on_gpu == on_cpu  # greedy, float32: the same tokens on both devices
