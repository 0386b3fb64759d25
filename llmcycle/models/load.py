"""Loading any model llmcycle can name: a Hugging Face folder or Hub id, a folder of adapters (its base
with the adapter applied) or an int8 folder that `optimize` wrote (rebuilt and quantized again)."""
from __future__ import annotations

from pathlib import Path

from llmcycle.models.adapters import load_adapter
from llmcycle.models.hub import INT8_MARKER, adapter_base, load_plain
from llmcycle.models.int8 import load_int8


def load_model(name_or_path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer): the model in eval mode on the device, and its tokenizer."""
    if adapter_base(name_or_path) is not None:
        return load_adapter(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    if (Path(name_or_path) / INT8_MARKER).is_file():
        return load_int8(name_or_path, device=device, trust_remote_code=trust_remote_code)
    return load_plain(name_or_path, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
