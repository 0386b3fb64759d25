"""Loading models and tokenizers from a Hub id, a local folder or a model produced by an earlier run.

torch and transformers are imported inside the functions: importing them takes seconds, and commands
such as `llmcycle --help` or config validation must not pay for it.
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Literal

from pydantic import Field

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError

INFO_FILE = "llmcycle_optimize.json"  # what was done to make the folder (for people and lineage)
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "spiece.model", "tokenizer.model",
                   "sentencepiece.bpe.model", "vocab.json", "vocab.txt", "merges.txt")
INT8_MARKER = "llmcycle_quantization.json"  # written by llmcycle.stages.optimize.quantize (int8_dynamic)
WEIGHT_FILES = "model.safetensors / pytorch_model.bin (or their sharded index)"
_TRUE = ("1", "ON", "YES", "TRUE")


class ModelConfig(Section):
    name: str = Field(description="The model: a Hugging Face Hub id (google/flan-t5-base), a local folder "
                      "saved with save_pretrained, or run:RUN_ID / run:STAGE/VARIANT for a model produced "
                      "by an earlier run.")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="Weight dtype; auto = float32 on CPU, bfloat16 on a GPU that supports it.")
    device: Literal["auto", "cpu", "cuda", "mps"] = Field(
        "auto", description="Where the model runs; auto = cuda if available, else mps, else cpu.")
    context_window: int | None = Field(None, ge=1, description="Maximum tokens the model reads; overrides "
                                       "what the model's config says.")
    trust_remote_code: bool = Field(False, description="Allow model code shipped with a Hub model to run "
                                    "(only for models you trust).")


def hub_offline() -> bool:
    """Whether Hub access is off, from the environment or huggingface_hub's constant (read at its import)."""
    env = os.environ.get("HF_HUB_OFFLINE") or os.environ.get("TRANSFORMERS_OFFLINE") or ""
    if env.upper() in _TRUE:
        return True
    try:
        import huggingface_hub.constants as c
    except ImportError:
        return False
    return bool(c.HF_HUB_OFFLINE)


def _hf_home() -> str:
    try:
        import huggingface_hub.constants as c

        return c.HF_HOME
    except ImportError:
        return os.environ.get("HF_HOME", "~/.cache/huggingface")


def _looks_like_path(name: str) -> bool:
    # Hub ids are NAME or ORG/NAME; anything else that does not exist is a mistyped local path.
    return (name.startswith(("/", "./", "../", "~")) or "\\" in name or name.count("/") > 1
            or name in (".", ".."))


def resolve_model_path(name: str, base_dir: Path, store=None) -> str:
    """An absolute folder for local models and run:... references; a Hub id unchanged."""
    if name.startswith("run:"):
        if store is None:
            raise UserError(f"model '{name}' refers to a run, but no run store is available here")
        target = store.resolve_model(name[4:])
        return str(Path(target).resolve()) if isinstance(target, Path) else target  # a folder, or a Hub id
    path = Path(name).expanduser()
    if not path.is_absolute():
        path = Path(base_dir) / path
    if path.exists():
        return str(path.resolve())
    if _looks_like_path(name):
        raise UserError(f"model folder not found: {name} (looked at {path})")
    return name


def _hub_error(name: str, err: Exception) -> UserError:
    home = _hf_home()
    if hub_offline():
        return UserError(
            f"model '{name}' is not a local folder and is not in the Hugging Face cache (HF_HOME={home}); "
            f"offline mode is on (HF_HUB_OFFLINE=1). Fix: pass a local path, or download it once where the Hub "
            f"is reachable (huggingface-cli download {name}) and point HF_HOME at that cache, or unset "
            f"HF_HUB_OFFLINE.")
    detail = str(err).strip().splitlines()[0] if str(err).strip() else type(err).__name__
    return UserError(
        f"model '{name}' is not a local folder and could not be loaded from the Hugging Face Hub or its cache "
        f"(HF_HOME={home}): {detail}; offline mode is off "
        f"(HF_HUB_OFFLINE={os.environ.get('HF_HUB_OFFLINE', 'unset')}). Fix: check the name and "
        f"your network (and `huggingface-cli login` for gated models), or pass a local path.")


_HUB_REACHABLE: dict[str, bool] = {}


def _hub_reachable() -> bool:
    """Whether the Hub's host accepts a connection within 3 s (asked once per process)."""
    import socket
    from urllib.parse import urlparse

    url = urlparse(os.environ.get("HF_ENDPOINT") or "https://huggingface.co")
    host, port = url.hostname or "huggingface.co", url.port or (80 if url.scheme == "http" else 443)
    if host not in _HUB_REACHABLE:
        try:
            socket.create_connection((host, port), timeout=3).close()
            _HUB_REACHABLE[host] = True
        except OSError:
            _HUB_REACHABLE[host] = False
    return _HUB_REACHABLE[host]


def _check_hub_or_cache(name: str) -> None:
    """A Hub id that is neither cached nor reachable fails at once: huggingface_hub would retry for
    about 26 s before giving the same answer."""
    if os.path.isdir(name) or hub_offline():
        return  # a folder; or offline, where transformers answers from the cache alone, at once
    try:
        from huggingface_hub import try_to_load_from_cache

        if isinstance(try_to_load_from_cache(name, "config.json"), str):
            return
    except Exception:  # noqa: BLE001 - not a valid repo id: transformers gives the clearer error
        return
    if not _hub_reachable():
        raise UserError(
            f"model '{name}' is not a local folder, not in the Hugging Face cache (HF_HOME={_hf_home()}), and "
            f"the Hub ({os.environ.get('HF_ENDPOINT') or 'https://huggingface.co'}) cannot be reached. Fix: "
            "check the name (a run reference is run:STAGE/VARIANT), pass a local path, or fill the cache "
            "where the Hub is reachable.")


def _check_folder(path: str, needs_tokenizer: bool) -> None:
    folder = Path(path)
    if not folder.is_dir():
        return
    if not needs_tokenizer and not (folder / "config.json").exists():
        raise UserError(f"model folder {folder} has no config.json; save the model there with "
                        f"model.save_pretrained({folder})")
    if needs_tokenizer and not any((folder / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"model folder {folder} has no tokenizer (no tokenizer.json, tokenizer_config.json, "
                        f"spiece.model or vocab files); save one there with tokenizer.save_pretrained({folder})")


ADAPTER_CONFIG = "adapter_config.json"  # what PEFT writes; marks an adapter folder


BASE_FILE = "llmcycle_base.json"  # which base an adapter folder belongs to


def adapter_base(path: Path) -> str | None:
    """The base model an adapter folder belongs to: llmcycle_base.json's base_relative (a base inside
    the same project, relative to the adapter folder, so a moved project still finds it), else its
    base_path, else what peft wrote in adapter_config.json."""
    path = Path(path)
    meta = json.loads((path / BASE_FILE).read_text()) if (path / BASE_FILE).is_file() else {}
    if meta.get("base_relative") and (path / meta["base_relative"]).is_dir():
        return str((path / meta["base_relative"]).resolve())
    if meta.get("base_path"):
        return meta["base_path"]
    if (path / ADAPTER_CONFIG).is_file():
        try:
            return json.loads((path / ADAPTER_CONFIG).read_text())["base_model_name_or_path"]
        except (OSError, ValueError, KeyError) as e:
            raise UserError(f"adapter folder {path}: adapter_config.json is unreadable: {e}") from None
    return None


def load_config(name_or_path: str, trust_remote_code: bool = False):
    """The transformers config of a model folder or Hub id (for adapters, their base model's)."""
    from transformers import AutoConfig

    base = adapter_base(name_or_path)
    if base is not None:
        return load_config(base, trust_remote_code)
    _check_folder(name_or_path, needs_tokenizer=False)
    _check_hub_or_cache(name_or_path)
    try:
        return AutoConfig.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:  # includes huggingface_hub's HFValidationError and offline errors
        if os.path.isdir(name_or_path):
            raise UserError(f"model folder {name_or_path}: config.json could not be read: {e}") from None
        raise _hub_error(name_or_path, e) from None


def load_tokenizer(name_or_path: str, trust_remote_code: bool = False):
    """The tokenizer of a model folder or Hub id. A missing pad token becomes eos (GPT-style tokenizers
    ship without one, and batching needs padding; the attention mask hides the padded positions)."""
    from transformers import AutoTokenizer

    _check_folder(name_or_path, needs_tokenizer=True)
    _check_hub_or_cache(name_or_path)
    try:
        tok = AutoTokenizer.from_pretrained(name_or_path, trust_remote_code=trust_remote_code)
    except (OSError, ValueError) as e:
        if os.path.isdir(name_or_path):
            raise UserError(f"model folder {name_or_path}: the tokenizer could not be loaded: {e}") from None
        raise _hub_error(name_or_path, e) from None
    if tok.pad_token is None and tok.eos_token is not None:
        tok.pad_token = tok.eos_token
    return tok


def model_kind(config) -> str:
    """'seq2seq' for encoder-decoder models (T5, BART), 'causal' for decoder-only ones (GPT-2, Llama)."""
    return "seq2seq" if getattr(config, "is_encoder_decoder", False) else "causal"


def auto_class(config):
    """The Auto class that builds a generating model for this config, chosen from the config itself
    (a fine-tuned model's folder name says nothing about its architecture)."""
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    return AutoModelForSeq2SeqLM if model_kind(config) == "seq2seq" else AutoModelForCausalLM


def resolve_device(device: str = "auto") -> str:
    import torch

    mps = getattr(torch.backends, "mps", None)
    has_mps = bool(mps and mps.is_available())
    if device == "auto":
        return "cuda" if torch.cuda.is_available() else "mps" if has_mps else "cpu"
    if device == "cuda" and not torch.cuda.is_available():
        raise UserError("model.device is cuda but no CUDA GPU is available; use device: auto or cpu")
    if device == "mps" and not has_mps:
        raise UserError("model.device is mps but Apple MPS is not available; use device: auto or cpu")
    return device


def resolve_dtype(dtype: str, device: str):
    """The torch dtype for `dtype` on `device`. auto: bfloat16 on GPUs that support it (half the memory,
    float32's range), float32 elsewhere (half precision on CPU is slow and float16 overflows in training)."""
    import torch

    if dtype == "auto":
        if device == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    return {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}[dtype]


def load_plain(name_or_path: str, dtype: str = "auto", device: str = "auto", trust_remote_code: bool = False):
    """(model, tokenizer) of a Hugging Face model folder or Hub id: the model in eval mode on the
    device. A bitsandbytes folder (quantization_config in config.json) is placed on the GPU while
    loading. Adapter and int8 folders load through llmcycle.models.load.load_model."""
    config = load_config(name_or_path, trust_remote_code)
    tokenizer = load_tokenizer(name_or_path, trust_remote_code)
    dev = resolve_device(device)
    torch_dtype = resolve_dtype(dtype, dev)
    placement = {}
    quantization = getattr(config, "quantization_config", None)
    if quantization is not None:
        method = quantization.get("quant_method") if isinstance(quantization, dict) else \
            getattr(quantization, "quant_method", None)
        if str(method).endswith("bitsandbytes"):
            check_bitsandbytes(f"model {name_or_path} (quantized with bitsandbytes)")
        # quantized weights are placed while loading; moving them afterwards is refused
        placement = {"device_map": {"": dev}}
    try:
        model = auto_class(config).from_pretrained(name_or_path, config=config, dtype=torch_dtype,
                                                   trust_remote_code=trust_remote_code, **placement)
    except (OSError, ValueError) as e:
        if os.path.isdir(name_or_path):
            raise UserError(f"model folder {name_or_path} has a config but its weights could not be loaded "
                            f"(expected {WEIGHT_FILES}): {e}") from None
        raise _hub_error(name_or_path, e) from None
    if not placement:
        model.to(dev)
    model.eval()
    return model, tokenizer


def context_window(config, tokenizer=None, override: int | None = None) -> int:
    """How many tokens the model can read: the override, the config's position limit, the tokenizer's
    model_max_length, or 512."""
    if override:
        return int(override)
    for attr in ("max_position_embeddings", "n_positions", "n_ctx"):
        value = getattr(config, attr, None)
        if isinstance(value, int) and value > 0:
            return value
    limit = getattr(tokenizer, "model_max_length", None) if tokenizer is not None else None
    # Tokenizers without a known limit report a huge sentinel (int(1e30)); ignore that.
    if isinstance(limit, int) and 0 < limit < 1_000_000:
        return limit
    # T5's relative position buckets have no hard limit, so its config names none; FLAN-T5 was trained on
    # 512-token inputs and quality drops beyond that, so 512 is the safe default.
    return 512


def decoder_prefix(model_or_config) -> list[int]:
    """The tokens an encoder-decoder's decoder reads before its first output: the start token, then the
    forced first token where the model has one (BART's forced BOS; a warm start's, llmcycle/models/warm_start.py).
    Training, scoring and every decoding loop feed this same prefix, and the first output is predicted
    after all of it, as `generate` does; for T5 it is the start token alone."""
    config = getattr(model_or_config, "config", model_or_config)
    start = config.decoder_start_token_id if config.decoder_start_token_id is not None else config.pad_token_id
    forced = getattr(getattr(model_or_config, "generation_config", None), "forced_bos_token_id", None)
    if forced is None:
        forced = getattr(config, "forced_bos_token_id", None)
    return [int(start)] + ([int(forced)] if forced is not None else [])


def count_parameters(model) -> tuple[int, int]:
    """(total, trainable) parameter counts; tied weights (shared embeddings) count once."""
    total = trainable = 0
    for p in model.parameters():
        total += p.numel()
        if p.requires_grad:
            trainable += p.numel()
    return total, trainable


def meta_model(config, trust_remote_code: bool = False):
    """The model built on the meta device: shapes without memory, for counting parameters of a model
    without loading (or downloading) its weights."""
    import torch

    with torch.device("meta"):
        return auto_class(config).from_config(config, trust_remote_code=trust_remote_code)


def check_bitsandbytes(what: str) -> None:
    import importlib.util

    import torch

    lacking = [name for name, ok in (("a CUDA GPU", torch.cuda.is_available()),
                                     ("bitsandbytes", importlib.util.find_spec("bitsandbytes") is not None)) if not ok]
    if lacking:
        raise UserError(f"{what} needs a CUDA GPU and the bitsandbytes package (pip install bitsandbytes); "
                        f"missing here: {' and '.join(lacking)} (int8_dynamic quantizes on the CPU)")
