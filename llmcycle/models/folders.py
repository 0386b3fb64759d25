"""Model folders as optimize reads and writes them: their size on disk and in memory, parameter
counts, the source loaded at full precision (adapters merged), a plain folder saved with how it was made."""
from __future__ import annotations

import json
from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.models.adapters import save_model
from llmcycle.models.hub import INFO_FILE
from llmcycle.models.int8 import QUANT_MARKER, dynamic_linears
from llmcycle.models.load import load_model

WEIGHT_SUFFIXES = (".safetensors", ".bin", ".pt", ".pth")


# -------------------------------------------------------------------------------- shared helpers
def weights_mb(folder: Path) -> float:
    """Megabytes of the weight files in a model folder (config and tokenizer not counted)."""
    return sum(p.stat().st_size for p in Path(folder).iterdir()
               if p.is_file() and p.name.endswith(WEIGHT_SUFFIXES)) / 2**20


def tensor_mb(model) -> float:
    """Megabytes of a model's parameters and buffers in memory, tied tensors counted once."""
    seen, total = set(), 0
    for t in list(model.parameters()) + list(model.buffers()):
        key = (t.data_ptr(), t.numel(), t.dtype)
        if key not in seen:
            seen.add(key)
            total += t.numel() * t.element_size()
    return total / 2**20


def parameter_count(model) -> int:
    """Parameters as trained: int8 weights packed outside parameters() by dynamic quantization count
    too, and bitsandbytes' 4-bit tensors (two weights per stored byte) count twice."""

    total = sum(p.numel() * (2 if type(p).__name__ == "Params4bit" else 1) for p in model.parameters())
    for module in dynamic_linears(model).values():
        weight, bias = module._weight_bias()
        total += weight.numel() + (bias.numel() if bias is not None else 0)
    return total


def source_facts(model, merged: bool) -> dict:
    """The source's size in memory (its size on disk is the stage's `source_size_mb`) and parameter count."""
    return {"source_tensor_mb": round(tensor_mb(model), 3), "source_parameters": parameter_count(model),
            "merged_adapter": merged}


def is_quantized(path: str) -> bool:
    folder = Path(path)
    if (folder / QUANT_MARKER).is_file():
        return True
    try:
        return "quantization_config" in json.loads((folder / "config.json").read_text())
    except (OSError, ValueError):
        return False


def load_source(path: str, *, dtype: str = "float32", device: str = "cpu", trust_remote_code: bool = False):
    """(plain model, tokenizer, whether adapters were merged) of the model to optimize. Optimizing
    starts from full-precision weights: an already quantized model is refused."""

    if is_quantized(path):
        raise UserError(f"optimize: source {path} is already quantized; optimize the unquantized model "
                        "(quantize last)")
    model, tok = load_model(path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if not hasattr(model, "peft_config"):
        return model, tok, False
    try:
        merged = model.merge_and_unload()
    except AttributeError:  # prompt tuning: a soft prompt is input, not weights to merge into
        raise UserError(f"optimize: source {path} is a {model.active_peft_config.peft_type} adapter, which "
                        "cannot be merged into the model's weights; optimize a LoRA or fully tuned model") from None
    merged.eval()
    return merged, tok, True


def save_folder(model, tokenizer, dest: Path, info: dict) -> Path:
    """A plain Hugging Face folder, written atomically, describing how it was made."""

    save_model(model, tokenizer, dest)
    (dest / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    return dest
