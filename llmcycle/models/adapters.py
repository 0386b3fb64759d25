"""Adapter folders: what `tune` and `align` save (a PEFT adapter plus llmcycle_base.json naming its
base, or a whole model), and loading one back as a model; the default LoRA targets per family."""
from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_tree, quiet_saves
from llmcycle.models.hub import (
    ADAPTER_CONFIG,
    BASE_FILE,
    adapter_base,
    load_plain,
    load_tokenizer,
)


def load_adapter(path, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) of an adapter folder: its base (models.adapter_base) with the adapter
    applied, unmerged, as a PeftModel in eval mode."""
    from peft import PeftModel

    path = Path(path)
    base = adapter_base(path)
    if not base:
        raise UserError(f"adapter folder {path} does not say which base model it belongs to")
    model, _ = load_plain(base, dtype=dtype, device=device, trust_remote_code=trust_remote_code)
    tokenizer = load_tokenizer(str(path), trust_remote_code)
    try:
        model = PeftModel.from_pretrained(model, str(path), is_trainable=False)
    except Exception as exc:  # noqa: BLE001 - a damaged adapter folder, as one line
        raise UserError(f"adapter folder {path} could not be loaded onto {base}: "
                        f"{(str(exc).strip().splitlines() or [type(exc).__name__])[0]}") from None
    model.eval()
    return model, tokenizer


def save_model(model, tokenizer, dest: Path, meta: dict | None = None, project_dir: Path | None = None) -> Path:
    """Write the trained model (the adapter, or the whole model for full) to `dest` atomically. An
    adapter whose base folder lies inside project_dir records it relative to itself too."""

    base = Path(str((meta or {}).get("base_path", "")))
    if project_dir is not None and base.is_absolute() and base.is_dir() \
            and base.resolve().is_relative_to(Path(project_dir).resolve()):
        meta = {**meta, "base_relative": os.path.relpath(base.resolve(), Path(dest).resolve())}

    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        model.save_pretrained(str(tmp))
    tokenizer.save_pretrained(str(tmp))
    if meta is not None and (tmp / ADAPTER_CONFIG).is_file():
        (tmp / BASE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    fsync_tree(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)
    return dest


# LoRA targets the attention query and value projections by default (as the LoRA paper and the
# course's lab do); keyed by the model_type in the model's config.
DEFAULT_LORA_TARGETS = {
    "t5": ["q", "v"], "mt5": ["q", "v"], "gpt2": ["c_attn"], "llama": ["q_proj", "v_proj"],
    "mistral": ["q_proj", "v_proj"], "qwen2": ["q_proj", "v_proj"], "gpt_neox": ["query_key_value"],
    "bart": ["q_proj", "v_proj"], "opt": ["q_proj", "v_proj"], "phi": ["q_proj", "v_proj"],
}
