"""Optimizing for deployment (llmcycle/stages/optimize/stage.py, distill.py, prune.py) on tiny models: int8 size and
round trip, distillation's loss and student, pruning's exact sparsity and removed shapes, merged export,
and the errors."""
import json
from pathlib import Path

import pytest
import torch

from llmcycle.project.config import load_project
from llmcycle.core.errors import UserError
from llmcycle.stages.optimize.stage import DistillConfig
from test_tune import examples, make_project as tune_project
from tiny import make_gpt2, make_t5


def make_project(root: Path, optimize: dict, arch="t5") -> Path:
    return tune_project(root, arch, extra="optimize: " + json.dumps(optimize) + "\n")


def execute(path: Path, variant: str):
    from llmcycle.project import lifecycle

    return lifecycle.execute(load_project(path), "optimize", variant, progress=False)


def logits(model, tok, texts=("the quick brown fox", "red is here number 3")):
    batch = tok(list(texts), return_tensors="pt", padding=True)
    with torch.no_grad():
        if model.config.is_encoder_decoder:
            return model(**batch, decoder_input_ids=torch.tensor([[0, 5, 9, 7]] * len(texts))).logits
        return model(**batch).logits


def generations(model, tok):
    from llmcycle.models.generation import GenerationConfig, Generator

    results = Generator(model, tok).generate([e.input for e in examples(4)], GenerationConfig(max_new_tokens=6))
    return [r.token_ids for r in results]


def teacher(arch: str, layers: int = 4, heads: int = 2):
    """An in-memory tiny teacher with more layers / heads than tests/tiny.py's, and its tokenizer."""
    from transformers import GPT2Config, GPT2LMHeadModel, T5Config, T5ForConditionalGeneration

    from llmcycle.models.hub import load_tokenizer

    torch.manual_seed(0)
    folder = (make_t5 if arch == "t5" else make_gpt2)(Path(__import__("tempfile").mkdtemp()) / arch)
    tok = load_tokenizer(str(folder))
    if arch == "t5":
        config = T5Config(vocab_size=len(tok), d_model=16, d_kv=4, d_ff=32, num_layers=layers,
                          num_decoder_layers=layers, num_heads=heads, relative_attention_num_buckets=8,
                          dropout_rate=0.0, pad_token_id=0, eos_token_id=1, decoder_start_token_id=0)
        return T5ForConditionalGeneration(config).eval(), tok
    config = GPT2Config(vocab_size=len(tok), n_embd=16, n_inner=32, n_layer=layers, n_head=heads, n_positions=128,
                        resid_pdrop=0.0, embd_pdrop=0.0, attn_pdrop=0.0, bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(config).eval(), tok


# -- configuration errors ---------------------------------------------------------------------------
@pytest.mark.parametrize("variant,message", [
    ({"method": "prune", "sparsity": 1.0}, r"key 'optimize.p.sparsity': expected a value < 1, got 1.0"),
    ({"method": "prune", "sparsity": -0.1}, r"key 'optimize.p.sparsity': expected a value >= 0, got -0.1"),
    ({"method": "quantize", "sparsity": 0.5}, r"'sparsity' applies to method prune, not quantize"),
    ({"method": "prune", "sparsty": 0.5}, r"unknown key 'optimize.p.sparsty' \(did you mean 'sparsity'\?\)"),
    ({"method": "distill", "student": {"n_layer": 1}},
     r"unknown key 'optimize.p.student.n_layer' \(did you mean 'n_layers'"),
    ({"sparsity": 0.5}, r"key 'optimize.p.method': is required"),
    # one class per method: its own keys only, the nearest of them suggested
    ({"method": "quantize", "lr": 1e-3}, r"key 'optimize.p.lr': 'lr' applies to method distill / prune, not quantize"),
    ({"method": "export", "formt": "hf"}, r"unknown key 'optimize.p.formt' \(did you mean 'format'\?\)"),
    ({"method": "shrink"}, r"key 'optimize.p.method': expected one of 'quantize', 'distill', 'prune' or 'export', "
                           r"got 'shrink'"),
    ({"method": "prune", "structure": "heads", "scope": "global"}, r"'scope' applies to unstructured pruning only"),
])
def test_config_errors_name_the_key(tmp_path, variant, message):
    path = make_project(tmp_path, {"p": variant})
    with pytest.raises(UserError, match=message):
        load_project(path)


def test_optimizing_a_run_that_does_not_exist_is_refused(tmp_path):
    path = make_project(tmp_path, {"q": {"method": "quantize", "source": "run:tune/nope"}})
    with pytest.raises(UserError, match=r"no completed run of stage 'tune' variant 'nope' in .*runs"):
        execute(path, "q")


# -- int8 dynamic quantization ------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_int8_quarter_size_close_outputs_and_identical_reload(tmp_path, arch):
    from safetensors import safe_open
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear
    from transformers.pytorch_utils import Conv1D

    from llmcycle.models.load import load_model
    from llmcycle.models.folders import load_source
    from llmcycle.models.int8 import QUANT_WEIGHTS, conv1d_to_linear, quantize_int8, save_int8

    source = (make_t5 if arch == "t5" else make_gpt2)(tmp_path / "fp32")
    fp32, tok = load_model(str(source))
    linear_fp32_bytes = sum(m.weight.numel() * 4 for m in fp32.modules() if isinstance(m, (torch.nn.Linear, Conv1D)))
    model, tok, _ = load_source(str(source))
    swapped = conv1d_to_linear(model)  # GPT-2's Conv1D projections become Linear layers first
    assert swapped == (0 if arch == "t5" else 2 * 4)
    quantized = quantize_int8(model)
    save_int8(quantized, tok, tmp_path / "int8", {"conv1d_as_linear": swapped})

    with safe_open(str(tmp_path / "int8" / QUANT_WEIGHTS), "pt") as f:
        int8_bytes = sum(f.get_tensor(k).numel() for k in f.keys() if k.endswith(".weight.int8"))
    assert int8_bytes * 4 == linear_fp32_bytes  # one byte per Linear weight instead of four
    assert (tmp_path / "int8" / QUANT_WEIGHTS).stat().st_size < (source / "model.safetensors").stat().st_size

    reference, q = logits(fp32, tok), logits(quantized, tok)
    assert torch.nn.functional.cosine_similarity(q.flatten(), reference.flatten(), dim=0) > 0.999
    assert (q - reference).abs().max() < 0.05 * reference.abs().max()

    reloaded, _ = load_model(str(tmp_path / "int8"))
    n_linear = sum(isinstance(m, (torch.nn.Linear, Conv1D)) for m in fp32.modules())
    assert sum(isinstance(m, DynamicLinear) for m in reloaded.modules()) == n_linear
    assert torch.equal(logits(reloaded, tok), q)
    assert generations(reloaded, tok) == generations(quantized, tok)


def test_int8_stage_records_deployment_figures_and_eval_loads_it(tmp_path):
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from llmcycle.evaluation import harness
    from llmcycle.models.load import load_model

    path = make_project(tmp_path, {"int8": {"method": "quantize", "latency_samples": 4},
                                   "again": {"method": "prune", "source": "run:optimize/int8"}})
    out = execute(path, "int8")
    s = out.summary
    assert s["method"] == "quantize" and s["quantized_layers"] == 2 * 6 + 2 * 10 + 1  # q k v o wi wo, + cross, + head
    assert 0 < s["size_mb"] < s["source_size_mb"] and s["size_ratio"] < 1
    assert s["latency_samples"] == 4 and 0 < s["latency_p50_ms"] <= s["latency_p95_ms"]
    assert s["examples_per_s"] > 0 and s["completion_tokens_per_s"] > 0 and s["peak_memory_mb"] > 0
    assert s["headline"] == "rougeL" and s["n_examples"] == 6
    assert s["parameters"] == s["source_parameters"]

    rec = load_project(path).store().get(out.run_id)
    assert len((rec.artifacts / "predictions.jsonl").read_text().splitlines()) == 6

    loaded = harness.load("run:optimize/int8", load_project(path))  # what `eval` and `serve` do
    assert any(isinstance(m, DynamicLinear) for m in loaded.model.modules())
    with pytest.raises(UserError, match="runs on the CPU only"):
        load_model(s["model_dir"], device="cuda")
    with pytest.raises(UserError, match=r"source .*optimize-int8-.*/artifacts/model is already quantized"):
        execute(path, "again")


def test_source_is_timed_and_sized_exactly_as_the_optimized_model(tmp_path, monkeypatch):
    """Before -> after: the source's p95 comes from the same harness call with the same prompts, generation
    settings and samples, and its size from its weight files, as the optimized model's."""
    from torch.ao.nn.quantized.dynamic import Linear as DynamicLinear

    from llmcycle.evaluation import harness
    from llmcycle.models.folders import weights_mb

    calls = []
    real = harness.request_latency

    def spy(generator, prompts, gen_cfg, n):
        calls.append((generator.model, list(prompts), gen_cfg, n))
        return real(generator, prompts, gen_cfg, n)

    monkeypatch.setattr(harness, "request_latency", spy)
    path = make_project(tmp_path, {"int8": {"method": "quantize", "latency_samples": 3}})
    s = execute(path, "int8").summary
    (optimized, *after), (source, *before) = calls
    assert after == before and after[2] == 3 and len(after[0]) == s["n_examples"]
    assert any(isinstance(m, DynamicLinear) for m in optimized.modules())
    assert not any(isinstance(m, DynamicLinear) for m in source.modules())  # the fp32 source, as served
    assert 0 < s["source_latency_p50_ms"] <= s["source_latency_p95_ms"]
    weights = (tmp_path / "base" / "model.safetensors").stat().st_size / 2**20  # the only weight file
    assert s["source_size_mb"] == round(weights, 3)
    assert s["size_ratio"] == round(weights_mb(Path(s["model_dir"])) / weights, 4)
    assert s["source_tensor_mb"] > 0  # the in-memory figure keeps its own name


@pytest.mark.skipif(torch.cuda.is_available(), reason="this machine has a GPU")
def test_bitsandbytes_schemes_need_cuda(tmp_path):
    from llmcycle.models.load import load_model

    path = make_project(tmp_path, {"nf4": {"method": "quantize", "scheme": "bnb_nf4"}})
    with pytest.raises(UserError, match=r"scheme bnb_nf4 needs a CUDA GPU and the bitsandbytes package .*"
                                        r"missing here: a CUDA GPU"):
        execute(path, "nf4")
    assert not list(tmp_path.glob("runs/*/artifacts/model"))
    folder = make_t5(tmp_path / "bnb")  # a folder saved from a bitsandbytes model says so in its config
    config = json.loads((folder / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "bitsandbytes", "load_in_8bit": True}
    (folder / "config.json").write_text(json.dumps(config))
    with pytest.raises(UserError, match="quantized with bitsandbytes.*needs a CUDA GPU"):
        load_model(str(folder))


# -- distillation ----------------------------------------------------------------------------------------
def test_kl_term_equals_the_hand_computed_value():
    """Teacher logits (0, ln 3) -> p = (1/4, 3/4); student (0, 0) -> q = (1/2, 1/2).
    KL(p || q) = 1/4 ln(1/2) + 3/4 ln(3/2) = 0.130812. At T = 2 the teacher's logits are doubled so
    that p is the same, and the term is scaled by T^2 = 4. CE of q on target 1 is ln 2."""
    import math

    from llmcycle.stages.optimize.distill import distill_loss

    student = torch.zeros(1, 2, 2)
    targets = torch.tensor([[1, -100]])  # the second position is not scored
    kl = 0.25 * math.log(0.5) + 0.75 * math.log(1.5)
    loss, parts = distill_loss(student, torch.tensor([[[0.0, math.log(3)], [9.0, -9.0]]]), targets, 1.0, 1.0)
    assert parts["kl"] == pytest.approx(kl, abs=1e-6) and float(loss) == pytest.approx(kl, abs=1e-6)
    loss, parts = distill_loss(student, torch.tensor([[[0.0, 2 * math.log(3)], [9.0, -9.0]]]), targets, 2.0, 0.25)
    assert parts["kl"] == pytest.approx(4 * kl, abs=1e-6) and parts["ce"] == pytest.approx(math.log(2), abs=1e-6)
    assert float(loss) == pytest.approx(0.25 * 4 * kl + 0.75 * math.log(2), abs=1e-6)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_answer_cross_entropy_equals_tunes_loss(tmp_path, arch):
    from llmcycle.stages.optimize.distill import cross_entropy_loss, training_features
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import collate
    from llmcycle.training.loop import sum_loss

    model, tok = load_model(str((make_t5 if arch == "t5" else make_gpt2)(tmp_path / "m")))
    kind = "seq2seq" if arch == "t5" else "causal"
    batch = collate(training_features(examples(4), "{input} ->", model, tok, kind, 128).features, tok.pad_token_id)
    with torch.no_grad():
        total, n = sum_loss(model, batch, kind)
    with torch.no_grad():
        loss, _ = cross_entropy_loss(kind)(model, batch)
    assert float(loss) == pytest.approx(float(total) / n, rel=1e-5)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_student_is_smaller_and_starts_from_evenly_spaced_teacher_layers(arch):
    from llmcycle.stages.optimize.distill import build_student

    big, _ = teacher(arch, layers=4)
    student, init = build_student(big, DistillConfig(method="distill"))  # default: half the layers
    assert sum(p.numel() for p in student.parameters()) < sum(p.numel() for p in big.parameters())
    t, s = big.state_dict(), student.state_dict()
    stacks = ["encoder.block", "decoder.block"] if arch == "t5" else ["transformer.h"]
    assert init == "teacher layers " + "; ".join(f"{stack}: [0, 3]" for stack in stacks)
    for stack in stacks:
        for key in [k for k in s if k.startswith(f"{stack}.1.")]:
            assert torch.equal(s[key], t[key.replace(f"{stack}.1.", f"{stack}.3.")]), key
    # a narrower student cannot copy the teacher's layers: fresh weights (and init: teacher refuses)
    narrow = DistillConfig(method="distill", student={"d_model": 8, "d_ff": 16})
    assert build_student(big, narrow)[1] == "random"
    with pytest.raises(UserError, match="init: teacher needs the student's width"):
        build_student(big, DistillConfig(method="distill", init="teacher", student={"d_model": 8, "d_ff": 16}))


def test_student_not_smaller_than_the_teacher_is_refused():
    from llmcycle.stages.optimize.distill import build_student

    big, _ = teacher("t5", layers=2)
    with pytest.raises(UserError, match=r"the student \([\d,]+ parameters\) is not smaller than the teacher"):
        build_student(big, DistillConfig(method="distill", student={"n_layers": 2}))
    with pytest.raises(UserError, match="not smaller"):
        build_student(big, DistillConfig(method="distill", student={"n_layers": 1, "d_model": 64}))


def test_distillation_loss_falls():
    from llmcycle.training.loop import answer_logits
    from llmcycle.stages.optimize.distill import build_student, distill_loss, fit_steps, training_features

    big, tok = teacher("t5", layers=2)
    student, _ = build_student(big, DistillConfig(method="distill", init="random", student={"n_layers": 1}))
    features = training_features(examples(32), "{input} ->", big, tok, "seq2seq", 512).features

    def loss_fn(model, batch):
        with torch.no_grad():
            t_logits, _ = answer_logits(big, batch, "seq2seq")
        s_logits, targets = answer_logits(model, batch, "seq2seq")
        return distill_loss(s_logits, t_logits, targets, 2.0, 0.5)

    stats = fit_steps(student, features, tok.pad_token_id, loss_fn, steps=40, lr=1e-2, batch_size=8, seed=0,
                      log_every=10, progress=False)
    history = stats["loss_history"]
    assert len(history) == 4 and history[-1] < 0.7 * history[0], history
    assert stats["final_kl"] > 0 and stats["final_ce"] > 0


def test_distill_stage_saves_a_smaller_model_that_loads_without_llmcycle(tmp_path):
    from transformers import AutoModelForCausalLM

    path = make_project(tmp_path, {"d": {"method": "distill", "max_steps": 6, "batch_size": 4, "targets": "teacher",
                                         "latency_samples": 2, "student": {"n_layers": 1}}}, arch="gpt2")
    out = execute(path, "d")
    s = out.summary
    assert s["parameters"] < s["source_parameters"] and s["student"]["n_layers"] == [1]
    assert s["student_init"].startswith("teacher layers") and s["targets"] == "teacher" and s["steps"] == 6
    assert s["size_mb"] < s["source_size_mb"] and s["train_examples"] == 30
    plain = AutoModelForCausalLM.from_pretrained(s["model_dir"])
    assert plain.config.n_layer == 1
    rec = load_project(path).store().get(out.run_id)
    assert [m["step"] for m in rec.metrics()] == [6] and "kl" in rec.metrics()[0]


# -- pruning -----------------------------------------------------------------------------------------
@pytest.mark.parametrize("scope", ["layer", "global"])
def test_unstructured_sparsity_is_exactly_the_target(tmp_path, scope):
    from llmcycle.models.load import load_model
    from llmcycle.stages.optimize.prune import make_permanent, prune_unstructured

    model, _ = load_model(str(make_t5(tmp_path / "m")))
    layers = prune_unstructured(model, 0.3, scope)
    assert len(layers) == 2 * 6 + 2 * 10  # every Linear but the (tied) output layer
    make_permanent(model)
    zeros = [int((m.weight == 0).sum()) for _, m in layers]
    sizes = [m.weight.numel() for _, m in layers]
    if scope == "layer":
        assert zeros == [round(0.3 * n) for n in sizes]
    else:
        assert sum(zeros) == round(0.3 * sum(sizes)) and len(set(z / n for z, n in zip(zeros, sizes))) > 1
    assert not any(hasattr(m, "weight_orig") for _, m in layers)


def test_recovery_fine_tune_changes_weights_but_pruned_ones_stay_zero(tmp_path):
    from llmcycle.stages.optimize.distill import cross_entropy_loss, fit_steps, training_features
    from llmcycle.models.load import load_model
    from llmcycle.stages.optimize.prune import make_permanent, prune_unstructured

    model, tok = load_model(str(make_t5(tmp_path / "m")))
    layers = prune_unstructured(model, 0.5)
    before = {name: m.weight.detach().clone() for name, m in layers}
    features = training_features(examples(16), "{input} ->", model, tok, "seq2seq", 512).features
    fit_steps(model, features, tok.pad_token_id, cross_entropy_loss("seq2seq"), steps=4, lr=1e-2, batch_size=4,
              seed=0, progress=False)
    make_permanent(model)
    for name, m in layers:
        pruned = before[name] == 0
        assert (m.weight[pruned] == 0).all(), name
        assert (m.weight[~pruned] != before[name][~pruned]).float().mean() > 0.9, name


def _zero_head(attn, head: int):
    d = attn.key_value_proj_dim
    with torch.no_grad():
        for lin in (attn.q, attn.k, attn.v):
            lin.weight[head * d:(head + 1) * d] = 0
        attn.o.weight[:, head * d:(head + 1) * d] = 0


def test_t5_head_removal_removes_the_weakest_heads_and_keeps_the_outputs(tmp_path):
    from llmcycle.models.load import load_model
    from llmcycle.models.folders import save_folder
    from llmcycle.stages.optimize.prune import _t5_attentions, remove_t5_heads

    model, tok = teacher("t5", layers=2, heads=4)
    for name, attn in _t5_attentions(model):  # head 2 contributes nothing anywhere; cross-attention 1 too
        _zero_head(attn, 1 if "EncDecAttention" in name else 2)
    expected = logits(model, tok)
    facts = remove_t5_heads(model, 0.25)
    assert facts["heads_after"] == 3 and model.config.num_heads == 3
    assert set(facts["removed_heads"]["encoder self-attention"]) == {2}
    assert facts["removed_heads"]["decoder.block.1.layer.1.EncDecAttention"] == [1]
    attn = model.encoder.block[0].layer[0].SelfAttention
    assert attn.q.weight.shape == (12, 16) and attn.o.weight.shape == (16, 12)
    assert attn.relative_attention_bias.weight.shape == (8, 3)
    assert torch.allclose(logits(model, tok), expected, atol=1e-5)
    save_folder(model, tok, tmp_path / "pruned", {})
    reloaded, _ = load_model(str(tmp_path / "pruned"))
    assert torch.allclose(logits(reloaded, tok), expected, atol=1e-5)


@pytest.mark.parametrize("arch", ["t5", "gpt2"])
def test_ffn_channel_removal_removes_the_weakest_channels(tmp_path, arch):
    from llmcycle.models.load import load_model
    from llmcycle.models.folders import save_folder
    from llmcycle.stages.optimize.prune import remove_ffn_channels

    model, tok = teacher(arch, layers=2)
    mlps = [b.layer[-1].DenseReluDense for b in [*model.encoder.block, *model.decoder.block]] if arch == "t5" \
        else [b.mlp for b in model.transformer.h]
    with torch.no_grad():  # channels 0..7 of every layer carry nothing
        for m in mlps:
            (m.wo.weight[:, :8] if arch == "t5" else m.c_proj.weight[:8]).zero_()
    before = {id(m): (m.wi.weight[8:] if arch == "t5" else m.c_fc.weight[:, 8:]).clone() for m in mlps}
    expected = logits(model, tok)
    facts = remove_ffn_channels(model, 0.25)  # 8 of 32
    assert facts["channels_after"] == 24 and (model.config.d_ff if arch == "t5" else model.config.n_inner) == 24
    for m in mlps:  # exactly the dead channels went; the others kept their weights
        kept = m.wi.weight if arch == "t5" else m.c_fc.weight
        assert torch.equal(kept, before[id(m)])
        out = m.wo.weight if arch == "t5" else m.c_proj.weight.t()  # Conv1D weights are (in, out)
        assert out.shape == (16, 24)
    assert torch.allclose(logits(model, tok), expected, atol=1e-5)
    save_folder(model, tok, tmp_path / "pruned", {})
    assert torch.allclose(logits(load_model(str(tmp_path / "pruned"))[0], tok), expected, atol=1e-5)


def test_gpt2_heads_are_zeroed_not_removed():
    from llmcycle.stages.optimize.prune import make_permanent, zero_gpt2_heads

    model, _ = teacher("gpt2", layers=2, heads=4)
    facts = zero_gpt2_heads(model, 0.5)
    make_permanent(model)
    assert facts["structure_removed"] is False and facts["heads_after"] == 2
    for i, block in enumerate(model.transformer.h):
        gone = facts["zeroed_heads"][f"transformer.h.{i}.attn"]
        assert len(gone) == 2 and block.attn.c_attn.weight.shape == (16, 48)
        for h in gone:
            for part in range(3):
                assert (block.attn.c_attn.weight[:, part * 16 + h * 4: part * 16 + h * 4 + 4] == 0).all()
            assert (block.attn.c_proj.weight[h * 4:(h + 1) * 4] == 0).all()
        assert int((block.attn.c_proj.weight == 0).sum()) == 2 * 4 * 16


def test_prune_stage_with_recovery_saves_a_smaller_model(tmp_path):
    path = make_project(tmp_path, {"heads": {"method": "prune", "structure": "heads", "sparsity": 0.5,
                                             "recovery_steps": 3, "batch_size": 4, "latency_samples": 2}})
    s = execute(path, "heads").summary
    assert s["heads_after"] == 1 and s["structure_removed"] and s["recovery_steps"] == 3
    assert s["parameters"] < s["source_parameters"] and s["size_mb"] < s["source_size_mb"]
    with pytest.raises(UserError, match="structured pruning .* supports t5 and gpt2"):
        from transformers import LlamaConfig, LlamaForCausalLM

        from llmcycle.stages.optimize.prune import prune_structured

        prune_structured(LlamaForCausalLM(LlamaConfig(vocab_size=32, hidden_size=8, intermediate_size=16,
                                                      num_hidden_layers=1, num_attention_heads=2)), "ffn", 0.5)


# -- export ---------------------------------------------------------------------------------------------
def test_export_merges_lora_into_a_folder_that_loads_without_peft(tmp_path):
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForSeq2SeqLM

    from llmcycle.models.adapters import save_model
    from llmcycle.models.load import load_model

    path = make_project(tmp_path, {"hf": {"method": "export", "source": "adapter", "latency_samples": 0}})
    base, tok = load_model(str(tmp_path / "base"))
    lora = get_peft_model(base, LoraConfig(r=4, lora_alpha=8, target_modules=["q", "v"]))
    torch.manual_seed(1)
    with torch.no_grad():
        for name, p in lora.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)  # untrained LoRA B is zero: make the adapter change the model
    save_model(lora, tok, tmp_path / "adapter", {"base_path": str(tmp_path / "base")})

    s = execute(path, "hf").summary
    assert s["merged_adapter"] is True and not (Path(s["model_dir"]) / "adapter_config.json").exists()
    # an adapter source's size is what serving it loads: its weights and its base's; latency_samples 0: unmeasured
    on_disk = sum(f.stat().st_size for d in ("adapter", "base") for f in (tmp_path / d).glob("*.safetensors"))
    assert s["source_size_mb"] == round(on_disk / 2**20, 3) and s["source_latency_p95_ms"] is None
    merged = AutoModelForSeq2SeqLM.from_pretrained(s["model_dir"]).eval()  # transformers alone
    adapted, _ = load_model(str(tmp_path / "adapter"))
    plain_base, _ = load_model(str(tmp_path / "base"))
    assert not torch.allclose(logits(adapted, tok), logits(plain_base, tok), atol=1e-3)
    assert torch.allclose(logits(merged, tok), logits(adapted, tok), atol=1e-5)
    assert generations(merged, tok) == generations(adapted, tok)


def test_onnx_export_without_optimum_names_the_install_command(tmp_path):
    import importlib.util

    if importlib.util.find_spec("optimum") is not None:
        pytest.skip("optimum is installed")
    path = make_project(tmp_path, {"onnx": {"method": "export", "format": "onnx"}})
    with pytest.raises(UserError, match=r"format onnx needs the optimum package: pip install 'optimum\[onnxruntime\]'"):
        execute(path, "onnx")
