"""Models built from scratch: the size presets and the T5 / GPT-2 configs pretrain trains and
scope plans for."""
from __future__ import annotations

from llmcycle.core.errors import UserError

# Dims per (architecture, size). t5 small/base are the published t5-small/t5-base shapes, gpt
# small/base are gpt2/gpt2-medium; tiny is for smoke tests and CPU experiments.
PRESETS: dict[str, dict[str, dict[str, int]]] = {
    "t5": {
        "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
        "small": {"d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 2048},
        "base": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
    },
    "gpt": {
        "tiny": {"d_model": 64, "n_layers": 2, "n_heads": 4, "d_ff": 256},
        "small": {"d_model": 768, "n_layers": 12, "n_heads": 12, "d_ff": 3072},
        "base": {"d_model": 1024, "n_layers": 24, "n_heads": 16, "d_ff": 4096},
    },
}


# ------------------------------------------------------------------------------------------ model
def preset_dims(cfg) -> dict[str, int]:
    """The model shape: the preset for (architecture, size) with explicit d_model/n_layers/n_heads/
    d_ff taking precedence. d_kv (t5 per-head size) is d_model // n_heads, as in all T5 presets."""
    dims = dict(PRESETS[cfg.architecture][cfg.size])
    for key in ("d_model", "n_layers", "n_heads", "d_ff"):
        if getattr(cfg, key) is not None:
            dims[key] = getattr(cfg, key)
    if cfg.architecture == "gpt":
        if cfg.d_model is not None and cfg.d_ff is None:
            dims["d_ff"] = 4 * dims["d_model"]  # GPT-2's rule when only the width is overridden
        if dims["d_model"] % dims["n_heads"]:
            raise UserError(f"pretrain: d_model {dims['d_model']} must be divisible by n_heads {dims['n_heads']} for gpt")
    else:
        dims["d_kv"] = max(1, dims["d_model"] // dims["n_heads"])
    return dims


def _model_config(cfg, vocab_size: int, pad_id: int, eos_id: int, bos_id: int | None):
    from transformers import GPT2Config, T5Config

    d = preset_dims(cfg)
    dropout = getattr(cfg, "dropout", 0.1)  # both families' default
    if cfg.architecture == "t5":
        # T5 starts decoding from the pad token; other settings are T5Config defaults (relu FFN,
        # tied input/output embeddings), i.e. the original t5-small/base architecture.
        return T5Config(
            vocab_size=vocab_size, d_model=d["d_model"], d_kv=d["d_kv"], d_ff=d["d_ff"],
            num_layers=d["n_layers"], num_decoder_layers=d["n_layers"], num_heads=d["n_heads"],
            pad_token_id=pad_id, eos_token_id=eos_id, decoder_start_token_id=pad_id, dropout_rate=dropout,
        )
    return GPT2Config(
        vocab_size=vocab_size, n_positions=cfg.seq_len, n_embd=d["d_model"], n_layer=d["n_layers"],
        n_head=d["n_heads"], n_inner=d["d_ff"], bos_token_id=bos_id, eos_token_id=eos_id, pad_token_id=pad_id,
        resid_pdrop=dropout, embd_pdrop=dropout, attn_pdrop=dropout,
    )


def build_model_config(cfg, tokenizer):
    """A transformers T5Config / GPT2Config for `cfg` whose vocabulary and special ids match `tokenizer`."""
    return _model_config(cfg, len(tokenizer), tokenizer.pad_token_id, tokenizer.eos_token_id, tokenizer.bos_token_id)


def model_class(arch: str):
    from transformers import GPT2LMHeadModel, T5ForConditionalGeneration

    return T5ForConditionalGeneration if arch == "t5" else GPT2LMHeadModel


def count_parameters(cfg, vocab_size: int | None = None) -> int:
    """Parameters of the model `cfg` describes (tied weights counted once), built on the meta device
    so that even the base presets cost no memory or time."""
    import torch

    config = _model_config(cfg, vocab_size or cfg.vocab_size, 0, 1, 1)
    with torch.device("meta"):
        model = model_class(cfg.architecture)(config)
    return sum(p.numel() for p in model.parameters())


def planned_model_config(cfg):
    """The model config `cfg` will produce, before any tokenizer exists (for `llmcycle scope`)."""
    return _model_config(cfg, cfg.vocab_size, 0, 1, 1)
