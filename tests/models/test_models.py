import time
from pathlib import Path

import pytest
import torch
from pydantic import ValidationError

from llmcycle.core.errors import UserError
from llmcycle.models.hub import ModelConfig, auto_class, context_window, count_parameters, load_config, load_tokenizer, meta_model, model_kind, resolve_model_path
from llmcycle.models.load import load_model
from tiny import make_gpt2, make_t5, make_tokenizer


@pytest.fixture(scope="module")
def t5(tmp_path_factory):
    return make_t5(tmp_path_factory.mktemp("models") / "t5")


@pytest.fixture(scope="module")
def gpt2(tmp_path_factory):
    return make_gpt2(tmp_path_factory.mktemp("models") / "gpt2")


@pytest.fixture
def offline(monkeypatch):
    # huggingface_hub reads HF_HUB_OFFLINE when imported; the constant is what its HTTP layer and
    # transformers' is_offline_mode() consult at call time, so patch it as well as the environment.
    import huggingface_hub.constants

    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)


def test_resolve_model_path(tmp_path, t5):
    (tmp_path / "models/mine").mkdir(parents=True)
    assert resolve_model_path("models/mine", tmp_path) == str((tmp_path / "models/mine").resolve())
    assert resolve_model_path(str(t5), tmp_path) == str(t5.resolve())
    assert resolve_model_path("google/flan-t5-base", tmp_path) == "google/flan-t5-base"
    assert resolve_model_path("gpt2", tmp_path) == "gpt2"
    with pytest.raises(UserError, match=r"model folder not found: \./models/nope"):
        resolve_model_path("./models/nope", tmp_path)


def test_resolve_run_reference(tmp_path, t5):
    class Store:
        def resolve_model(self, ref):
            if ref != "finetune/base":
                raise UserError(f"no run {ref}")
            return t5

    assert resolve_model_path("run:finetune/base", tmp_path, Store()) == str(t5.resolve())
    with pytest.raises(UserError, match="no run abc"):
        resolve_model_path("run:abc", tmp_path, Store())
    with pytest.raises(UserError, match="refers to a run, but no run store"):
        resolve_model_path("run:abc", tmp_path)


def test_kind_and_auto_class(t5, gpt2):
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    c5, cg = load_config(str(t5)), load_config(str(gpt2))
    assert (model_kind(c5), model_kind(cg)) == ("seq2seq", "causal")
    assert auto_class(c5) is AutoModelForSeq2SeqLM and auto_class(cg) is AutoModelForCausalLM


def test_load_model_defaults(t5, gpt2):
    model, tok = load_model(str(t5))
    assert type(model).__name__ == "T5ForConditionalGeneration" and not model.training
    assert next(model.parameters()).dtype == torch.float32 and next(model.parameters()).device.type == "cpu"
    assert tok.pad_token == "<pad>"
    model, tok = load_model(str(gpt2), device="cpu")
    assert type(model).__name__ == "GPT2LMHeadModel"
    assert tok.pad_token == tok.eos_token == "</s>"  # causal tokenizer saved without pad gets pad = eos
    out = model.generate(**tok(["the cat"], return_tensors="pt"), max_new_tokens=3, do_sample=False,
                         pad_token_id=tok.pad_token_id)
    assert out.shape[1] > 2


def test_load_model_bfloat16(gpt2):
    model, _ = load_model(str(gpt2), dtype="bfloat16")
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_missing_tokenizer(tmp_path):
    folder = make_t5(tmp_path / "notok", tokenizer=False)
    with pytest.raises(UserError, match=rf"^model folder {folder} has no tokenizer \(no tokenizer.json, "
                                        r".*save one there with tokenizer.save_pretrained"):
        load_model(str(folder))


def test_missing_config(tmp_path):
    folder = make_tokenizer(tmp_path / "tokonly")
    with pytest.raises(UserError, match=rf"^model folder {folder} has no config.json"):
        load_model(str(folder))


def test_missing_weights(tmp_path, t5):
    import shutil

    folder = tmp_path / "noweights"
    shutil.copytree(t5, folder)
    (folder / "model.safetensors").unlink()
    with pytest.raises(UserError, match=rf"model folder {folder} has a config but its weights could not"):
        load_model(str(folder))


def test_offline_hub_error_is_fast_and_clear(offline):
    name = "llmcycle-test/no-such-model"
    start = time.monotonic()
    for load in (load_config, load_tokenizer, load_model):
        with pytest.raises(UserError) as e:
            load(name)
        msg = str(e.value)
        assert msg.startswith(f"model '{name}' is not a local folder and is not in the Hugging Face cache (HF_HOME=")
        assert "offline mode is on (HF_HUB_OFFLINE=1)" in msg
        assert f"huggingface-cli download {name}" in msg and "unset HF_HUB_OFFLINE" in msg
    assert time.monotonic() - start < 10


def test_context_window(t5, gpt2):
    from transformers import AutoTokenizer, LlamaConfig

    c5, cg = load_config(str(t5)), load_config(str(gpt2))
    tok5 = AutoTokenizer.from_pretrained(str(t5))
    assert context_window(cg, None) == 128  # GPT-2's n_positions
    assert context_window(cg, None, override=64) == 64
    assert context_window(LlamaConfig(max_position_embeddings=4096), None) == 4096
    assert tok5.model_max_length > 1_000_000
    assert context_window(c5, tok5) == 512  # T5 names no limit and the tokenizer's is a sentinel
    tok5.model_max_length = 256
    assert context_window(c5, tok5) == 256
    assert context_window(c5, None) == 512


def test_count_parameters_by_hand(gpt2):
    model, _ = load_model(str(gpt2))
    cfg = model.config
    d, v, p, L = cfg.n_embd, cfg.vocab_size, cfg.n_positions, cfg.n_layer
    per_layer = (2 * d) + (d * 3 * d + 3 * d) + (d * d + d) + (2 * d) + (d * 4 * d + 4 * d) + (4 * d * d + d)
    expected = v * d + p * d + L * per_layer + 2 * d  # lm_head is tied to the token embedding
    assert count_parameters(model) == (expected, expected)
    for prm in model.transformer.wte.parameters():
        prm.requires_grad = False
    assert count_parameters(model) == (expected, expected - v * d)


def test_meta_model_matches_real(t5, gpt2):
    for folder in (t5, gpt2):
        model, _ = load_model(str(folder))
        meta = meta_model(model.config)
        assert next(meta.parameters()).device.type == "meta"
        assert count_parameters(meta) == count_parameters(model)


def test_model_config_validation():
    assert ModelConfig(name="x").dtype == "auto"
    for bad in ({"name": "x", "dtype": "float8"}, {"name": "x", "device": "tpu"},
                {"name": "x", "context_window": 0}, {"name": "x", "nmae": "y"}, {}):
        with pytest.raises(ValidationError):
            ModelConfig(**bad)
    assert all(f.description for f in ModelConfig.model_fields.values())


def test_cuda_unavailable_is_user_error(gpt2):
    if torch.cuda.is_available():
        pytest.skip("a GPU is present")
    with pytest.raises(UserError, match="model.device is cuda but no CUDA GPU is available"):
        load_model(str(gpt2), device="cuda")


def test_tiny_builders_are_reusable(tmp_path):
    folder = make_tokenizer(tmp_path / "tok", kind="causal", texts=["hello there", "general kenobi"])
    assert isinstance(folder, Path) and (folder / "tokenizer.json").exists()
    tok = load_tokenizer(str(folder))
    text = "unseen words, ünïcode & 123"
    assert tok.decode(tok(text).input_ids, skip_special_tokens=True) == text


def test_an_uncached_hub_id_fails_at_once_when_the_hub_cannot_be_reached(monkeypatch):
    import time

    import huggingface_hub.constants

    from llmcycle.models import hub as models
    from llmcycle.models.hub import load_config, load_tokenizer

    monkeypatch.setenv("HF_HUB_OFFLINE", "0")
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
    monkeypatch.setenv("HF_ENDPOINT", "http://127.0.0.1:9")  # the discard port: nothing listens there
    monkeypatch.setattr(models, "_HUB_REACHABLE", {})
    for load in (load_config, load_tokenizer):
        started = time.perf_counter()
        with pytest.raises(UserError) as info:
            load("someone/no-such-model")
        assert time.perf_counter() - started < 10  # huggingface_hub alone retries for ~26 s
        msg = str(info.value)
        assert msg.startswith("model 'someone/no-such-model' is not a local folder, not in the Hugging Face cache")
        assert "http://127.0.0.1:9" in msg and "cannot be reached" in msg and "\n" not in msg
