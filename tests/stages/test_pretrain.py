"""Tests for llmcycle.stages.pretrain.stage / llmcycle.stages.pretrain.data, on tiny models so each runs in seconds."""
from __future__ import annotations

import json
import random
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from pydantic import ValidationError

from llmcycle.core.errors import UserError
from llmcycle.stages.pretrain.stage import PretrainConfig, train
from llmcycle.models.scratch import count_parameters
from llmcycle.models.scratch import preset_dims
from llmcycle.stages.pretrain.data import (
    IGNORE, PretrainDataset, collate, corrupted_lengths, load_corpus, random_spans_noise_mask, raw_length_for,
    denoise, sentinel_ids, span_corrupt, train_tokenizer, useful_tokens,
)

ANIMALS = ["cat", "dog", "bird", "fish", "horse", "mouse", "goat"]
PLACES = ["mat", "sofa", "roof", "table", "garden"]


def corpus(n: int = 240, varied: bool = False) -> list[str]:
    """A repetitive corpus a tiny model can learn quickly; `varied` gives documents of different lengths."""
    rnd = random.Random(1)
    docs = []
    for i in range(n):
        k = rnd.randint(1, 6) if varied else 2
        docs.append(" ".join(
            f"the {ANIMALS[(i + j) % 7]} sat on the {PLACES[(i + 2 * j) % 5]} and looked at the {ANIMALS[(i + j + 3) % 7]} ."
            for j in range(k)))
    return docs


def tiny(**kw) -> PretrainConfig:
    base = dict(d_model=32, n_layers=2, n_heads=4, d_ff=64, vocab_size=300, seq_len=32, batch_size=8,
                max_steps=10, warmup_steps=5, lr=3e-3, log_every=5, checkpoint_every=100)
    base.update(kw)
    return PretrainConfig(**base)


# ------------------------------------------------------------------------------------------ config
def test_config_needs_a_length_and_rejects_unknown_keys():
    with pytest.raises(ValidationError, match="max_steps or pretrain.epochs"):
        PretrainConfig()
    with pytest.raises(ValidationError, match="exactly one"):
        PretrainConfig(max_steps=5, epochs=1)
    with pytest.raises(ValidationError):
        PretrainConfig(max_steps=5, d_modle=32)
    assert all(f.description for f in PretrainConfig.model_fields.values())


def test_presets_and_overrides():
    assert preset_dims(PretrainConfig(size="small", max_steps=1)) == {
        "d_model": 512, "n_layers": 6, "n_heads": 8, "d_ff": 2048, "d_kv": 64}
    d = preset_dims(PretrainConfig(architecture="gpt", size="small", d_model=256, n_heads=4, max_steps=1))
    assert d == {"d_model": 256, "n_layers": 12, "n_heads": 4, "d_ff": 1024}


def test_preset_parameter_counts_match_published_models():
    # t5-small / t5-base with T5Config defaults (tied embeddings, relu FFN) and vocab 32128
    assert count_parameters(PretrainConfig(size="small", max_steps=1), 32128) == 60_506_624
    assert count_parameters(PretrainConfig(size="base", max_steps=1), 32128) == 222_903_552
    # gpt2 (124M) has 1024 positions
    gpt2 = PretrainConfig(architecture="gpt", size="small", seq_len=1024, max_steps=1)
    assert count_parameters(gpt2, 50257) == 124_439_808


# --------------------------------------------------------------------------------------- tokenizer
def test_t5_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(corpus(), tiny(), tmp_path / "tok")
    assert (tok.pad_token_id, tok.eos_token_id, tok.unk_token_id) == (0, 1, 2)
    # sentinels sit after the learned pieces, as in T5's vocabulary
    first = tok.convert_tokens_to_ids("<extra_id_0>")
    assert first > 2 and sentinel_ids(tok) == list(range(first, first + 100)) and len(tok) == first + 100
    text = "the cat sat on the roof and looked at the dog ."
    ids = tok(text)["input_ids"]
    assert ids[-1] == tok.eos_token_id  # post-processor appends </s>
    assert tok.decode(ids, skip_special_tokens=True) == text
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text)["input_ids"] == ids
    assert again.model_max_length == 32 and again.pad_token == "<pad>"
    assert again.convert_ids_to_tokens(first) == "<extra_id_0>"


def test_t5_tokenizer_is_the_same_in_every_process(tmp_path):
    import subprocess
    import sys

    code = ("import sys; sys.path[:0] = %r; from test_pretrain import corpus, tiny;"
            "from llmcycle.stages.pretrain.data import train_tokenizer;"
            "print(train_tokenizer(corpus(), tiny()).backend_tokenizer.to_str())"
            ) % [str(Path(__file__).parent), str(Path(__file__).parents[1])]  # this folder, and tests/ (tiny.py)
    outs = {subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
            for _ in range(2)}
    assert len(outs) == 1


def test_gpt_tokenizer_round_trip_and_reload(tmp_path):
    from transformers import AutoTokenizer

    tok = train_tokenizer(corpus(), tiny(architecture="gpt"), tmp_path / "tok")
    text = "the goat sat\non the table, ünïcode ok"  # byte-level: any text round-trips exactly
    ids = tok(text)["input_ids"]
    assert tok.decode(ids) == text
    again = AutoTokenizer.from_pretrained(tmp_path / "tok")
    assert again(text)["input_ids"] == ids
    assert again.eos_token == again.bos_token == "<|endoftext|>" and again.pad_token == "<pad>"


# --------------------------------------------------------------------------------- span corruption
@pytest.mark.parametrize("seq_len", [16, 32, 100, 256, 512])
def test_span_corruption_invariants(seq_len):
    raw, tgt_len = raw_length_for(seq_len, 0.15, 3.0)
    assert corrupted_lengths(raw, 0.15, 3.0)[0] == seq_len
    sentinels = list(range(1000, 1100))
    for seed in range(20):
        rng = np.random.default_rng(seed)
        block = rng.integers(10, 900, size=raw)
        mask = random_spans_noise_mask(raw, 0.15, 3.0, np.random.default_rng(seed))
        assert mask.sum() == round(raw * 0.15) and not mask[0]
        inp, tgt = span_corrupt(block, 0.15, 3.0, sentinels, 1, np.random.default_rng(seed))
        assert len(inp) == seq_len and len(tgt) == tgt_len
        assert inp[-1] == 1 and tgt[-1] == 1
        used = [t for t in inp if t >= 1000]
        assert used == sentinels[:len(used)] and [t for t in tgt if t >= 1000] == used  # in order
        # put each span back where its sentinel stands: the original block comes back
        spans, cur = {}, None
        for t in tgt[:-1]:
            if t >= 1000:
                cur = t
                spans[cur] = []
            else:
                spans[cur].append(t)
        rebuilt = [x for t in inp[:-1] for x in (spans[t] if t >= 1000 else [t])]
        assert rebuilt == block.tolist()


def test_too_many_spans_for_the_sentinels():
    with pytest.raises(UserError, match="sentinel"):
        raw_length_for(4000, 0.15, 3.0)
    assert raw_length_for(4000, 0.15, 3.0, sentinel_per_span=False)[0] > 4000  # one mask token: no limit


@pytest.mark.parametrize("seq_len", [16, 100, 256])
def test_denoising_masks_spans_and_targets_the_whole_block(seq_len):
    raw, _ = raw_length_for(seq_len, 0.3, 3.0)
    for seed in range(20):
        block = np.random.default_rng(seed).integers(10, 900, size=raw)
        inp, tgt = denoise(block, 0.3, 3.0, 1000, 1, np.random.default_rng(seed))
        span_inp, _ = span_corrupt(block, 0.3, 3.0, list(range(1000, 1100)), 1, np.random.default_rng(seed))
        assert len(inp) == seq_len and inp == [1000 if t >= 1000 else t for t in span_inp]  # same spans
        assert tgt == [*block.tolist(), 1]  # the decoder writes the original text back
        mask = random_spans_noise_mask(raw, 0.3, 3.0, np.random.default_rng(seed))
        kept = [t for t in inp[:-1] if t != 1000]
        assert kept == block[~mask].tolist() and inp.count(1000) == int((np.diff(mask.astype(int)) == 1).sum())


def test_denoising_dataset_and_config(tmp_path):
    cfg = tiny(objective="denoising", noise_density=0.3)
    tok = train_tokenizer(corpus(varied=True), cfg)
    data = PretrainDataset(cfg, tok, corpus(varied=True))
    batch = data.batch(data.order(0)[:4], 0)
    assert batch["input_ids"].shape == (4, 32) and batch["labels"].shape[1] == data.target_len == data.raw_len + 1
    for r, i in enumerate(data.order(0)[:4]):
        assert batch["labels"][r].tolist() == [*data.items[i].tolist(), tok.eos_token_id]
    with pytest.raises(ValueError, match="needs architecture t5"):
        tiny(architecture="gpt", objective="denoising")


# ---------------------------------------------------------------------------------------- batching
@pytest.mark.parametrize("arch", ["t5", "gpt"])
def test_packed_batches_have_no_padding(tmp_path, arch):
    cfg = tiny(architecture=arch)
    tok = train_tokenizer(corpus(varied=True), cfg)
    data = PretrainDataset(cfg, tok, corpus(varied=True))
    for epoch in (0, 1):
        order = data.order(epoch)
        batch = data.batch(order[:8], epoch)
        assert batch["input_ids"].shape == (8, 32)
        assert not (batch["input_ids"] == tok.pad_token_id).any()
        assert batch["attention_mask"].all() and not (batch["labels"] == IGNORE).any()
        assert batch["labels"].shape[1] == data.target_len
        assert useful_tokens(batch, arch) == batch["input_ids"].numel() + (batch["labels"].numel() if arch == "t5" else 0)
    if arch == "t5":  # fresh noise each epoch, same noise for the same (epoch, index)
        assert data.example(0, 0) == data.example(0, 0) and data.example(0, 0) != data.example(0, 1)


@pytest.mark.parametrize("arch", ["t5", "gpt"])
def test_padded_batches_mask_labels(arch):
    cfg = tiny(architecture=arch, packing=False, seq_len=64)
    tok = train_tokenizer(corpus(varied=True), cfg)
    data = PretrainDataset(cfg, tok, corpus(varied=True))
    batch = data.batch(range(8), 0)
    examples = [data.example(i, 0) for i in range(8)]
    assert len({len(x) for x, _ in examples}) > 1  # documents differ in length
    assert batch["input_ids"].shape[1] == max(len(x) for x, _ in examples) <= 64
    pad = batch["attention_mask"] == 0
    assert pad.any() and (batch["input_ids"][pad] == tok.pad_token_id).all()
    if arch == "gpt":
        assert ((batch["labels"] == IGNORE) == pad).all()
    for r, (x, y) in enumerate(examples):
        assert (batch["labels"][r, len(y):] == IGNORE).all() and (batch["labels"][r, :len(y)] != IGNORE).all()
    expected = sum(len(x) for x, _ in examples) + (sum(len(y) for _, y in examples) if arch == "t5" else 0)
    assert useful_tokens(batch, arch) == expected


def test_collate_pads_to_longest():
    b = collate([([5, 6, 7], [8, 1]), ([5], [9, 9, 1])], "t5", 0)
    assert b["input_ids"].tolist() == [[5, 6, 7], [5, 0, 0]]
    assert b["labels"].tolist() == [[8, 1, IGNORE], [9, 9, 1]]


# ---------------------------------------------------------------------------------------- training
@pytest.mark.parametrize("arch,objective", [("t5", "span_corruption"), ("t5", "denoising"), ("gpt", "span_corruption")])
def test_loss_decreases_and_model_reloads(tmp_path, arch, objective):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM, AutoTokenizer

    logs = []
    summary = train(tiny(architecture=arch, objective=objective, max_steps=60, log_every=10, lr=1e-2), corpus(), tmp_path,
                    log=logs.append, progress=False)
    assert [m["step"] for m in logs] == [10, 20, 30, 40, 50, 60]
    losses = [m["loss"] for m in logs]
    assert losses[-1] < 0.65 * losses[0] and losses[-1] < min(losses[:3]), losses
    assert summary["steps"] == 60 and summary["final_loss"] == logs[-1]["loss"]
    assert summary["useful_tokens"] == summary["tokens_seen"] > 0  # packed: nothing wasted
    assert summary["parameters"] > 0 and summary["useful_tokens_per_s"] > 0

    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    model = auto.from_pretrained(summary["model_dir"])
    tok = AutoTokenizer.from_pretrained(summary["model_dir"])
    prompt = "the cat sat on the <extra_id_0> and looked" if arch == "t5" else "the cat sat on the"
    enc = tok(prompt, return_tensors="pt")
    out = model.generate(**enc, max_new_tokens=8, do_sample=False)
    assert out.shape[1] > (1 if arch == "t5" else enc["input_ids"].shape[1])
    assert isinstance(tok.decode(out[0], skip_special_tokens=True), str)


def test_epochs_count_steps_and_padding_is_reported(tmp_path):
    cfg = tiny(packing=False, max_steps=None, epochs=1.5, batch_size=16, seq_len=64)
    summary = train(cfg, corpus(n=100, varied=True), tmp_path, progress=False)
    assert summary["total_steps"] == summary["steps"] == 11  # ceil(1.5 * ceil(100 / 16))
    assert 0 < summary["padding_fraction"] < 1
    assert summary["useful_tokens"] < summary["tokens_seen"]


class Crash(Exception):
    pass


@pytest.mark.parametrize("arch", ["t5", "gpt"])
def test_resume_after_crash_equals_uninterrupted_run(tmp_path, arch):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    cfg = tiny(architecture=arch, max_steps=14, log_every=3, checkpoint_every=4, batch_size=16)
    texts = corpus(n=120)  # t5 packed: a few batches per epoch, so the run crosses epochs
    full_logs, part_logs = [], []
    train(cfg, texts, tmp_path / "full", log=full_logs.append, progress=False)

    def crash_at_9(m):
        part_logs.append(m)
        if m["step"] == 9:  # after the step-8 checkpoint, mid log window
            raise Crash

    with pytest.raises(Crash):
        train(cfg, texts, tmp_path / "part", log=crash_at_9, progress=False)
    assert sorted(p.name for p in (tmp_path / "part/checkpoints").iterdir()) == ["step-4", "step-8"]
    part_logs.clear()
    rewound = []
    started = time.perf_counter()
    summary = train(cfg.model_copy(update={"checkpoint_every": 5}), texts, tmp_path / "part", resume=True,
                    log=part_logs.append, progress=False, on_resume=rewound.append)  # checkpoint_every may change
    session = time.perf_counter() - started
    assert summary["resumed_from"]["checkpoint"] == "checkpoints/step-8" and summary["steps"] == 14
    assert summary["resumed_from"]["step"] == 8 and rewound == [8]
    # the summary covers the whole run: every token, and the first session's time up to step 8 too
    assert summary["tokens_seen"] == part_logs[-1]["tokens"] == full_logs[-1]["tokens"]
    assert summary["wall_s"] > session
    assert [m["step"] for m in part_logs] == [9, 12, 14]
    assert part_logs[-1]["loss"] == pytest.approx(full_logs[-1]["loss"], abs=1e-6)
    assert part_logs[0]["loss"] == pytest.approx(full_logs[2]["loss"], abs=1e-6)

    auto = AutoModelForSeq2SeqLM if arch == "t5" else AutoModelForCausalLM
    a = auto.from_pretrained(tmp_path / "full/model").state_dict()
    b = auto.from_pretrained(tmp_path / "part/model").state_dict()
    assert a.keys() == b.keys()
    for k in a:
        assert torch.allclose(a[k], b[k], atol=1e-6), k
    # the last two checkpoints are kept
    assert sorted(p.name for p in (tmp_path / "part/checkpoints").iterdir()) == ["step-10", "step-14"]


def _run_with_checkpoints(tmp_path, **kw):
    cfg = tiny(max_steps=4, checkpoint_every=2, **kw)
    train(cfg, corpus(), tmp_path, progress=False)
    return cfg, tmp_path / "checkpoints/step-4"


def test_resume_missing_marker_is_a_user_error(tmp_path):
    cfg, ckpt = _run_with_checkpoints(tmp_path)
    (ckpt / "COMPLETE").unlink()
    with pytest.raises(UserError, match=r"corrupt checkpoint .*step-4: no COMPLETE marker"):
        train(cfg, corpus(), tmp_path, resume=True, progress=False)


def test_resume_unreadable_weights_is_a_user_error(tmp_path):
    cfg, ckpt = _run_with_checkpoints(tmp_path)
    (ckpt / "model/model.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(UserError, match=r"corrupt checkpoint .*step-4: "):
        train(cfg, corpus(), tmp_path, resume=True, progress=False)
    (ckpt / "model/model.safetensors").unlink()
    (ckpt / "state.json").write_text("{")
    with pytest.raises(UserError, match=r"corrupt checkpoint .*step-4: "):
        train(cfg, corpus(), tmp_path, resume=True, progress=False)


def test_resume_with_changed_settings_lists_them(tmp_path):
    cfg, _ = _run_with_checkpoints(tmp_path)
    changed = cfg.model_copy(update={"lr": 0.01, "seed": 3, "log_every": 1})
    with pytest.raises(UserError) as err:
        train(changed, corpus(), tmp_path, resume=True, progress=False)
    msg = str(err.value)
    assert "lr: 0.003 → 0.01" in msg and "seed: 0 → 3" in msg and "log_every" not in msg
    with pytest.raises(UserError, match="training data"):
        train(cfg, corpus()[:-1], tmp_path, resume=True, progress=False)


def test_resume_without_checkpoint_starts_fresh_and_temp_dirs_are_ignored(tmp_path):
    (tmp_path / "checkpoints/.tmp-step-2-999").mkdir(parents=True)  # a save cut short by a crash
    summary = train(tiny(max_steps=3), corpus(), tmp_path, resume=True, progress=False)
    assert summary["resumed_from"] is None and summary["steps"] == 3
    assert not (tmp_path / "checkpoints/.tmp-step-2-999").exists()


def test_empty_texts_is_a_user_error(tmp_path):
    with pytest.raises(UserError, match="no training texts"):
        train(tiny(), ["", "  "], tmp_path, progress=False)


def test_corpus_files(tmp_path):
    (tmp_path / "a.txt").write_text("first doc\n\nsecond doc\n")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "third"}) + "\n")
    assert load_corpus(["a.txt", "b.jsonl"], tmp_path) == ["first doc", "second doc", "third"]
    (tmp_path / "c.jsonl").write_text('{"body": 1}\n')
    with pytest.raises(UserError, match="c.jsonl:1"):
        load_corpus(["c.jsonl"], tmp_path)
    with pytest.raises(UserError, match="not found"):
        load_corpus(["missing.txt"], tmp_path)
    (tmp_path / "big.txt").write_text("\n".join(corpus()))
    summary = train(tiny(max_steps=2, corpus=["big.txt"]), ["one more document"], tmp_path / "w",
                    progress=False, project_dir=tmp_path)
    assert summary["steps"] == 2
