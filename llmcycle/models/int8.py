"""int8 model folders (optimize's int8_dynamic scheme): saving one, and loading it back as the
quantized model the stage evaluated; the bitsandbytes requirement check."""
from __future__ import annotations

import contextlib
import json
import os
import shutil
from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_tree
from llmcycle.models import hub as models
from llmcycle.models.hub import INFO_FILE
from llmcycle.models.hub import (
    INT8_MARKER as QUANT_MARKER,  # models.load.load_model looks for it
)

QUANT_WEIGHTS = "model.int8.safetensors"


@contextlib.contextmanager
def quiet_quantization():
    """torch.ao's quantize_dynamic and quantized tensors still work but warn on every call that they
    are deprecated (torchao is their successor); one such line per layer would drown the output."""
    import warnings

    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message=r".*torch\.ao\.quantization is deprecated.*")
        warnings.filterwarnings("ignore", message=r".*quantized tensor creation functions.*")
        yield


# ------------------------------------------------------------------------------- int8 dynamic
def conv1d_to_linear(model) -> int:
    """Replace transformers' Conv1D (GPT-2's projections: a Linear with a transposed weight) by
    nn.Linear in place, so dynamic quantization covers them; returns how many were replaced."""
    import torch
    from transformers.pytorch_utils import Conv1D

    swaps = [(name, m) for name, m in model.named_modules() if isinstance(m, Conv1D)]
    for name, conv in swaps:
        linear = torch.nn.Linear(conv.nx, conv.nf, device=conv.weight.device, dtype=conv.weight.dtype)
        with torch.no_grad():
            linear.weight.copy_(conv.weight.t())
            linear.bias.copy_(conv.bias)
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, linear)
    return len(swaps)


def quantize_int8(model, per_channel: bool = True):
    """The model with every nn.Linear replaced by a dynamically quantized int8 Linear (in place)."""
    import torch
    from torch.ao.quantization import (
        default_dynamic_qconfig,
        per_channel_dynamic_qconfig,
        quantize_dynamic,
    )

    qconfig = per_channel_dynamic_qconfig if per_channel else default_dynamic_qconfig
    with quiet_quantization():
        return quantize_dynamic(model, {torch.nn.Linear: qconfig}, dtype=torch.qint8, inplace=True)


def dynamic_linears(model) -> dict:
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    return {name: m for name, m in model.named_modules() if isinstance(m, DynamicLinear)}


def save_int8(qmodel, tokenizer, dest: Path, info: dict) -> Path:
    """Write a quantize_int8 model: int8 weights + scales and the float tensors in one safetensors
    file (no pickle), config, generation config, tokenizer and the marker; atomically."""
    import torch
    from safetensors.torch import save_file

    tensors: dict = {}
    quantized = dynamic_linears(qmodel)
    for name, module in quantized.items():
        weight, bias = module._weight_bias()
        tensors[f"{name}.weight.int8"] = weight.int_repr().contiguous()
        if weight.qscheme() in (torch.per_channel_affine, torch.per_channel_symmetric):
            tensors[f"{name}.weight.scale"] = weight.q_per_channel_scales().contiguous()
            # int8 weights have int8 zero points (0 when symmetric): stored as such, widened on loading
            tensors[f"{name}.weight.zero_point"] = weight.q_per_channel_zero_points().to(torch.int8)
        else:
            tensors[f"{name}.weight.scale"] = torch.tensor([weight.q_scale()], dtype=torch.float64)
            tensors[f"{name}.weight.zero_point"] = torch.tensor([weight.q_zero_point()], dtype=torch.int8)
        if bias is not None:
            tensors[f"{name}.bias"] = bias.detach().contiguous()
    # The float rest (embeddings, norms). Tied tensors are stored once; the rebuilt model ties them again.
    tied, stored = {}, {}
    for key, value in qmodel.state_dict().items():
        if not isinstance(value, torch.Tensor) or any(key.startswith(q + ".") for q in quantized):
            continue
        identity = (value.data_ptr(), value.numel(), value.dtype)
        if identity in stored:
            tied[key] = stored[identity]
            continue
        stored[identity] = key
        tensors[key] = value.detach().contiguous()

    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    save_file(tensors, str(tmp / QUANT_WEIGHTS))
    qmodel.config.save_pretrained(str(tmp))
    if getattr(qmodel, "generation_config", None) is not None:
        qmodel.generation_config.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    marker = {"format": 1, "scheme": "int8_dynamic", "per_channel": info.get("per_channel", True),
              "conv1d_as_linear": info.get("conv1d_as_linear", 0) > 0, "weights": QUANT_WEIGHTS,
              "quantized_modules": sorted(quantized), "tied": tied}
    (tmp / QUANT_MARKER).write_text(json.dumps(marker, indent=2) + "\n")
    (tmp / INFO_FILE).write_text(json.dumps(info, indent=2, default=str) + "\n")
    fsync_tree(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


def load_int8(path: str, device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) of an int8_dynamic folder: the architecture rebuilt from its config,
    quantized as it was saved, and the stored int8 weights loaded into it. CPU only."""
    import torch
    from safetensors.torch import load_file

    if device not in ("auto", "cpu"):
        raise UserError(f"model folder {path} is int8 dynamically quantized, which runs on the CPU only; "
                        "set model.device to cpu or auto")
    folder = Path(path)
    try:
        marker = json.loads((folder / QUANT_MARKER).read_text())
        tensors = load_file(str(folder / marker["weights"]))
    except (OSError, ValueError, KeyError) as exc:
        raise UserError(f"int8 model folder {path} is damaged: {exc}") from None
    config = models.load_config(path, trust_remote_code)
    tokenizer = models.load_tokenizer(path, trust_remote_code)
    model = models.auto_class(config).from_config(config, trust_remote_code=trust_remote_code).float()
    if (folder / "generation_config.json").is_file():
        from transformers import GenerationConfig

        model.generation_config = GenerationConfig.from_pretrained(path)
    if marker.get("conv1d_as_linear"):
        conv1d_to_linear(model)
    model.eval()
    quantize_int8(model, per_channel=marker.get("per_channel", True))
    quantized = dynamic_linears(model)
    if sorted(quantized) != sorted(marker.get("quantized_modules", [])):
        raise UserError(f"int8 model folder {path}: its quantized layers do not match the architecture "
                        "its config.json describes (a damaged or hand-edited folder)")
    with quiet_quantization():
        for name, module in quantized.items():
            ints, scale, zero = (tensors.pop(f"{name}.weight.{k}") for k in ("int8", "scale", "zero_point"))
            if scale.numel() > 1 or marker.get("per_channel"):
                weight = torch._make_per_channel_quantized_tensor(ints, scale, zero.long(), 0)
            else:
                weight = torch._make_per_tensor_quantized_tensor(ints, float(scale), int(zero))
            module.set_weight_bias(weight, tensors.pop(f"{name}.bias", None))
    for alias, key in marker.get("tied", {}).items():
        tensors[alias] = tensors[key]
    # The quantized modules' own entries (packed weights, activation qparams) were set above; every
    # other tensor must come from the file, and the file must hold nothing else.
    state = model.state_dict()
    unexpected = [k for k in tensors if k not in state]
    missing = [k for k, v in state.items() if isinstance(v, torch.Tensor) and k not in tensors
               and not any(k.startswith(q + ".") for q in quantized)]
    if missing or unexpected:
        raise UserError(f"int8 model folder {path} does not match its config: missing {missing[:3]}, "
                        f"unexpected {unexpected[:3]}")
    state.update(tensors)
    model.load_state_dict(state)
    return model, tokenizer


