"""What LoRA adapts (llmcycle/training/finetune.py): PEFT's all-linear shorthand, and a warm-started
encoder-decoder, whose new cross-attention trains fully while the pretrained base stays frozen."""
import logging

import pytest
import torch

from llmcycle.core.errors import UserError
from llmcycle.training.finetune import TuneConfig, load_base, wrap
from test_tune import examples, make_project
from tiny import make_bert, make_gpt2, make_t5


def _plain(name: str) -> str:
    """A PEFT parameter or module name as the unwrapped model names it."""
    for part in ("base_model.model.", ".base_layer", ".original_module", ".modules_to_save.default", ".token_adapter"):
        name = name.replace(part, "")
    return name


def _linear_layers(model) -> set[str]:
    from transformers.pytorch_utils import Conv1D

    return {n for n, m in model.named_modules() if isinstance(m, (torch.nn.Linear, Conv1D))}


# -- all-linear ---------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["t5", "gpt2"])
@pytest.mark.parametrize("spelling", [["all-linear"], "all-linear"])
def test_all_linear_adapts_every_linear_layer_but_the_output_head(tmp_path, arch, spelling):
    base = (make_t5 if arch == "t5" else make_gpt2)(tmp_path / arch)
    cfg = TuneConfig(max_steps=1, target_modules=spelling)
    assert cfg.target_modules == ["all-linear"]  # both spellings are one config (and one content hash)
    plain, _ = load_base(str(base), cfg)
    expected = _linear_layers(plain) - {"lm_head"}
    assert "lm_head" in _linear_layers(plain) and len(expected) == (2 * 6 + 2 * 10 if arch == "t5" else 2 * 4)
    model = wrap(cfg, plain, "seq2seq" if arch == "t5" else "causal")
    adapted = {_plain(n) for n, m in model.named_modules() if hasattr(m, "lora_A") and n.endswith(tuple(expected))}
    assert adapted == expected
    assert {_plain(n).rsplit(".lora_", 1)[0] for n, p in model.named_parameters() if p.requires_grad} == expected


@pytest.mark.parametrize("value,message", [
    ('"all-linear, q"', r"key 'tune.v.target_modules': expected a list of module names \(e.g. \[q, v\]\) or "
                        r"all-linear, got 'all-linear, q'"),
    ('["all-linear", "q"]', r"key 'tune.v.target_modules': all-linear already names every Linear layer: give it "
                            r"alone"),
])
def test_all_linear_config_errors_name_the_key(tmp_path, value, message):
    from llmcycle.project.config import load_project

    path = make_project(tmp_path, tune={"v": {"max_steps": 1}})
    path.write_text(path.read_text().replace('tune: {"v": {"max_steps": 1}}',
                                             f'tune: {{"v": {{"max_steps": 1, "target_modules": {value}}}}}'))
    with pytest.raises(UserError, match=message):
        load_project(path)


# -- a warm-started encoder-decoder ---------------------------------------------------------------------
def _warm_start(tmp_path):
    from llmcycle.models.warm_start import WarmStartConfig, build

    tagged = [e.__class__(f"#Person1#: {e.input}", e.targets, {}, e.where) for e in examples(24)]
    build(WarmStartConfig(encoder=str(make_bert(tmp_path / "bert", texts=[e.input for e in tagged])),
                          decoder_layers=1), tmp_path / "ws", texts=[e.input for e in tagged])
    return tmp_path / "ws", tagged


def _fit(tmp_path, folder, data, **cfg):
    from llmcycle.training.loop import fit

    cfg = TuneConfig(**{"method": "lora", "max_steps": 4, "lr": 1e-2, "batch_size": 4, **cfg})
    return fit(cfg, str(folder), data, data[:4], "{input} ->", tmp_path / "w", progress=False).model


def test_lora_on_a_warm_start_trains_the_new_cross_attention_and_freezes_the_pretrained_weights(tmp_path):
    from transformers import AutoModelForSeq2SeqLM

    folder, data = _warm_start(tmp_path)
    before = dict(AutoModelForSeq2SeqLM.from_pretrained(folder).named_parameters())
    model = _fit(tmp_path, folder, data)
    after = {n: p for n, p in model.named_parameters() if "lora_" not in n and "trainable_tokens" not in n}
    trained = {_plain(n): p for n, p in after.items() if p.requires_grad}
    frozen = {_plain(n): p for n, p in after.items() if not p.requires_grad}
    cross = {n for n in before if ".encoder_attn." in n}
    assert cross and set(trained) == cross  # the whole new cross-attention, and nothing else of the base
    assert all(not torch.equal(trained[n], before[n]) for n in cross), "a cross-attention weight did not train"
    assert set(frozen) == set(before) and all(torch.equal(frozen[n], before[n]) for n in frozen)


def test_targets_inside_what_the_warm_start_added_are_dropped_with_a_warning(tmp_path, caplog):
    folder, data = _warm_start(tmp_path)
    with caplog.at_level(logging.WARNING, logger="llmcycle.training.finetune"):
        model = _fit(tmp_path, folder, data, max_steps=1, target_modules=["q_proj", "encoder_attn.k_proj"])
    [record] = [r for r in caplog.records if "warm start" in r.getMessage()]
    assert "['encoder_attn.k_proj']" in record.getMessage() and "(encoder_attn)" in record.getMessage()
    adapted = {n for n, m in model.named_modules() if hasattr(m, "lora_A")}
    assert adapted and all(n.endswith("q_proj") and "encoder_attn" not in n for n in adapted)

    caplog.clear()  # the default targets name pretrained layers: nothing to warn about
    with caplog.at_level(logging.WARNING, logger="llmcycle.training.finetune"):
        _fit(tmp_path, folder, data, max_steps=1)
    assert not [r for r in caplog.records if "warm start" in r.getMessage()]
    with pytest.raises(UserError, match=r"target_modules \['encoder_attn'\] name only layers the warm start added"):
        _fit(tmp_path, folder, data, max_steps=1, target_modules=["encoder_attn"])
