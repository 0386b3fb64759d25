"""Quantization for `llmcycle optimize` (method: quantize).

    scheme: int8_dynamic   every nn.Linear (and GPT-2's Conv1D, turned into Linear first) gets int8
                           weights (one scale per output row with per_channel, else per matrix) and
                           quantizes its input on the fly at each call (torch.ao quantize_dynamic).
                           CPU only. Embeddings and norms stay float32.
    scheme: bnb_int8       bitsandbytes LLM.int8() on a CUDA GPU.
    scheme: bnb_nf4        bitsandbytes 4-bit NormalFloat with double quantization on a CUDA GPU.

An int8_dynamic folder holds config.json, the tokenizer, `model.int8.safetensors` (the int8 weights
with their scales and zero points, the other tensors in float32; safetensors, so loading runs no
pickled code) and `llmcycle_quantization.json`. `models.load.load_model` sees the marker and calls
`load_int8`, which rebuilds the architecture from the config, quantizes it the same way and loads
the stored int8 weights, so `eval`, `serve` and `run:optimize/VARIANT` get the same int8 model the
stage evaluated. bitsandbytes folders are plain save_pretrained folders whose config.json carries
the quantization_config; models.hub.load_plain places them on the GPU while loading.
"""
from __future__ import annotations

import shutil
from pathlib import Path

from llmcycle.models import hub as models
from llmcycle.models.folders import load_source, save_folder, source_facts
from llmcycle.models.int8 import (
    conv1d_to_linear,
    dynamic_linears,
    quantize_int8,
    save_int8,
)


def quantize(cfg, source_path: str, dest: Path, opts: dict, info: dict) -> dict:
    """Quantize the source as cfg.scheme says and save it to dest; facts for the summary."""

    if cfg.scheme == "int8_dynamic":
        model, tok, merged = load_source(source_path, dtype="float32", device="cpu",
                                         trust_remote_code=opts.get("trust_remote_code", False))
        facts = source_facts(model, merged)
        swapped = conv1d_to_linear(model)
        model = quantize_int8(model, per_channel=cfg.per_channel)
        save_int8(model, tok, dest, {**info, "per_channel": cfg.per_channel, "conv1d_as_linear": swapped})
        # quantization changes precision, not the parameter count (a tied output layer gets an int8
        # copy of the float embeddings: stored twice, counted once)
        return {**facts, "parameters": facts["source_parameters"], "quantized_layers": len(dynamic_linears(model)),
                "weight_bits": 8, "device": "cpu"}
    return _quantize_bnb(cfg, source_path, dest, opts, info)


def _quantize_bnb(cfg, source_path: str, dest: Path, opts: dict, info: dict) -> dict:
    """bitsandbytes 8-bit or 4-bit (NF4, double quantization) on the GPU, saved with save_pretrained
    (transformers serializes both; config.json keeps the quantization_config that loading needs)."""
    import torch
    from transformers import BitsAndBytesConfig

    trust = opts.get("trust_remote_code", False)
    model, tok, merged = load_source(source_path, dtype="float32", device="cpu", trust_remote_code=trust)
    facts = source_facts(model, merged)
    # bitsandbytes quantizes while loading from a folder: hand it the (merged) full-precision weights
    staging = dest.with_name(f".staging-{dest.name}")
    save_folder(model, tok, staging, info)
    del model
    compute = torch.bfloat16 if torch.cuda.is_bf16_supported() else torch.float16
    quant = (BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
                                bnb_4bit_compute_dtype=compute) if cfg.scheme == "bnb_nf4"
             else BitsAndBytesConfig(load_in_8bit=True))
    config = models.load_config(str(staging), trust)
    model = models.auto_class(config).from_pretrained(str(staging), config=config, quantization_config=quant,
                                                      dtype=compute, device_map={"": 0}, trust_remote_code=trust)
    save_folder(model, tok, dest, info)
    shutil.rmtree(staging, ignore_errors=True)
    return {**facts, "parameters": facts["source_parameters"], "weight_bits": 4 if cfg.scheme == "bnb_nf4" else 8,
            "device": "cuda"}
