"""Fine-tuning (llmcycle/stages/tune.py, training/loop.py) on tiny models: formatting, what each method trains,
learning, bad input, validation and early stopping, kill -9 + resume, merging."""
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from llmcycle.project.config import load_project
from llmcycle.data.records import Example
from llmcycle.core.errors import UserError
from llmcycle.training.finetune import TuneConfig, load_base, wrap
from llmcycle.models.hub import adapter_base
from llmcycle.models.load import load_model
from llmcycle.training.loop import fit
from tiny import make_gpt2, make_t5

WORDS = ["red", "blue", "green", "grey", "cat", "dog"]


def examples(n=24, offset=0):
    """A learnable task: the answer is the first word of the input."""
    return [Example(f"{WORDS[i % 6]} is here number {i}", [WORDS[i % 6]], {}, f"row {i}")
            for i in range(offset, offset + n)]


def make_project(root: Path, arch="t5", tune: dict | None = None, n=36, extra="") -> Path:
    root.mkdir(parents=True, exist_ok=True)
    if not (root / "base" / "config.json").exists():
        (make_t5 if arch == "t5" else make_gpt2)(root / "base")
    rows = [{"text": e.input, "summary": e.targets[0]} for e in examples(n)]
    (root / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    tune = tune or {"v": {"max_steps": 20}}
    text = ("project: {name: tiny, task: summarization}\n"
            "data: {train: train.jsonl, input: text, target: summary, eval_size: 6}\n"
            "model: {name: base}\n"
            'evaluate: {template: "{input} ->", generation: {max_new_tokens: 4}}\n' + extra)
    (root / "llmcycle.yaml").write_text(text + "tune: " + json.dumps(tune) + "\n")
    return root / "llmcycle.yaml"


def project(path: Path, overrides=None):
    return load_project(path, overrides)


def execute(path: Path, variant="v", **kw):
    from llmcycle.project import lifecycle

    return lifecycle.execute(project(path), "tune", variant, progress=False, **kw)


def train(tmp_path, arch, steps=8, **cfg):
    """fit() straight on the tiny base; returns (trained, the base folder)."""
    base = tmp_path / "base"
    if not (base / "config.json").exists():
        (make_t5 if arch == "t5" else make_gpt2)(base)
    cfg = TuneConfig(**{"max_steps": steps, "lr": 1e-2, "batch_size": 4, **cfg})
    return fit(cfg, str(base), examples(), examples(4, 100), "{input} ->", tmp_path / "work", progress=False), base


# -- formatting --------------------------------------------------------------------------------
def test_causal_labels_mask_the_prompt_end_with_eos_and_padding_is_ignored(tmp_path):
    from llmcycle.models.generation import Generator
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import IGNORE, collate, encode_examples

    model, tok = load_model(str(make_gpt2(tmp_path / "g")))
    exs = examples(2)
    prompts = [f"{e.input} ->" for e in exs]
    feats = encode_examples(exs, prompts, tok, "causal", 128, end_id=tok.eos_token_id).features
    gen_ids = Generator(model, tok).encode(prompts)
    for f, p_ids in zip(feats, gen_ids):
        n = len(p_ids)
        assert f["input_ids"][:n] == p_ids  # what training sees is what inference sends
        assert f["labels"][:n] == [IGNORE] * n
        assert f["labels"][n:] == f["input_ids"][n:] and f["labels"][-1] == tok.eos_token_id
    feats[1]["input_ids"] = feats[1]["input_ids"] + [5, 6]  # make the rows differ in length
    feats[1]["labels"] = feats[1]["labels"] + [5, 6]
    batch = collate(feats, tok.pad_token_id)
    short = len(feats[0]["input_ids"])
    assert (batch["labels"][0, short:] == IGNORE).all() and (batch["attention_mask"][0, short:] == 0).all()


@pytest.mark.parametrize("arch,multiple", [("t5", (64, 16)), ("gpt2", (64, 64))])
def test_padding_to_a_multiple_rounds_widths_and_leaves_the_loss_alone(tmp_path, arch, multiple):
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import collate, encode_examples
    from llmcycle.training.loop import sum_loss

    kind = "seq2seq" if arch == "t5" else "causal"
    model, tok = load_model(str((make_t5 if arch == "t5" else make_gpt2)(tmp_path / arch)))
    exs = examples(5)
    feats = encode_examples(exs, [f"{e.input} ->" for e in exs], tok, kind, 128, end_id=tok.eos_token_id).features
    tight, padded = collate(feats, tok.pad_token_id), collate(feats, tok.pad_token_id, multiple)
    assert padded["input_ids"].shape[1] == multiple[0] and padded["labels"].shape[1] == multiple[1]
    assert tight["input_ids"].shape[1] < multiple[0]
    with torch.no_grad():
        (a, n_a), (b, n_b) = sum_loss(model.eval(), tight, kind), sum_loss(model, padded, kind)
    assert n_a == n_b and torch.allclose(a, b, rtol=1e-5)


def test_seq2seq_labels_end_with_eos_and_prompt_matches_generation(tmp_path):
    from llmcycle.models.generation import Generator
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import encode_examples

    model, tok = load_model(str(make_t5(tmp_path / "t")))
    exs = examples(3)
    prompts = [f"{e.input} ->" for e in exs]
    feats = encode_examples(exs, prompts, tok, "seq2seq", 512, end_id=tok.eos_token_id).features
    assert [f["input_ids"] for f in feats] == Generator(model, tok).encode(prompts)
    for f, e in zip(feats, exs):
        assert f["labels"][-1] == tok.eos_token_id
        assert tok.decode(f["labels"], skip_special_tokens=True) == e.targets[0]


def test_chat_template_prompt_matches_generation(tmp_path):
    from llmcycle.models.generation import Generator
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import IGNORE, encode_examples

    model, tok = load_model(str(make_gpt2(tmp_path / "g")))
    tok.chat_template = "{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}<|assistant|>"
    exs = examples(2)
    prompts = [f"{e.input} ->" for e in exs]
    feats = encode_examples(exs, prompts, tok, "causal", 128, end_id=tok.eos_token_id).features
    for f, p_ids in zip(feats, Generator(model, tok).encode(prompts)):
        assert tok.decode(p_ids).startswith("<|user|>")
        assert f["input_ids"][:len(p_ids)] == p_ids and f["labels"][len(p_ids) - 1] == IGNORE


# -- what each method trains ---------------------------------------------------------------------
def _initial(base, arch, **cfg):
    """The model fit() starts from (same seed, same wrapping)."""
    cfg = TuneConfig(max_steps=1, **cfg)
    model, _ = load_base(str(base), cfg)
    torch.manual_seed(cfg.seed)
    return wrap(cfg, model, "seq2seq" if arch == "t5" else "causal")


def _changes(before, after):
    a = {k: v.detach() for k, v in before.named_parameters()}
    b = {k: v.detach() for k, v in after.named_parameters()}
    assert a.keys() == b.keys()
    trainable = {k for k, v in after.named_parameters() if v.requires_grad}
    changed = {k for k in a if not torch.equal(a[k], b[k])}
    return trainable, changed, set(a)


def test_lora_trains_every_adapter_weight_and_nothing_else(tmp_path):
    trained, base = train(tmp_path, "t5", steps=6)
    trainable, changed, names = _changes(_initial(base, "t5"), trained.model)
    assert trainable and all("lora_" in k for k in trainable)
    assert changed == trainable
    # hand count: r * (in + out) per adapted layer (T5 q and v: d_model 16 -> heads*d_kv 16)
    inner = trained.model.base_model.model
    layers = [m for n, m in inner.named_modules() if n.rsplit(".", 1)[-1] in ("q", "v")]
    assert len(layers) == 2 * 2 + 2 * 2 * 2  # encoder self-attn; decoder self- and cross-attn
    lora = sum(8 * (m.in_features + m.out_features) for m in layers)
    base_total = sum(p.numel() for p in load_base(str(base), TuneConfig(max_steps=1))[0].parameters())
    s = trained.summary
    assert s["trainable_params"] == lora and s["total_params"] == base_total + lora
    assert s["trainable_pct"] == pytest.approx(100 * lora / (base_total + lora))


def test_prompt_tuning_trains_only_the_soft_prompt(tmp_path):
    trained, base = train(tmp_path, "gpt2", steps=4, method="prompt_tuning", num_virtual_tokens=5)
    trainable, changed, _ = _changes(_initial(base, "gpt2", method="prompt_tuning", num_virtual_tokens=5),
                                     trained.model)
    assert trainable == changed and len(trainable) == 1 and "prompt_encoder" in next(iter(trainable))
    assert trained.summary["trainable_params"] == 5 * 16
    assert trained.window == 128 - 5


def test_full_fine_tuning_changes_every_weight(tmp_path):
    trained, base = train(tmp_path, "gpt2", steps=4, method="full")
    trainable, changed, names = _changes(_initial(base, "gpt2", method="full"), trained.model)
    assert trainable == changed == names and trained.summary["trainable_pct"] == 100.0


@pytest.mark.parametrize("arch,method,lr", [("t5", "lora", 3e-2), ("gpt2", "full", 1e-2)])
def test_loss_decreases_on_a_learnable_task(tmp_path, arch, method, lr):
    logged = []
    base = tmp_path / "base"
    (make_t5 if arch == "t5" else make_gpt2)(base)
    cfg = TuneConfig(method=method, max_steps=60, lr=lr, batch_size=8, log_every=10, dropout=0.0)
    fit(cfg, str(base), examples(48), examples(4, 100), "{input} ->", tmp_path / "w", log=logged.append,
        progress=False)
    losses = [r["loss"] for r in logged]
    assert len(losses) == 6 and losses[-1] < 0.7 * losses[0], losses


# -- bad input ---------------------------------------------------------------------------------
def test_missing_target_module_lists_the_models_layers(tmp_path):
    with pytest.raises(UserError, match=r"target_modules \['qkv'\] not found .*: q, k, v, o, wi, wo, lm_head"):
        train(tmp_path, "t5", target_modules=["q", "qkv"])


def test_quantized_base_needs_gpu_and_bitsandbytes(tmp_path):
    from llmcycle.training.finetune import check_quantization

    if torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    with pytest.raises(UserError, match="bits: 4 \\(QLoRA\\) needs a CUDA GPU .*missing here: a CUDA GPU"):
        check_quantization(TuneConfig(max_steps=1, bits=4))
    path = make_project(tmp_path, tune={"v": {"max_steps": 5, "bits": 4}})
    with pytest.raises(UserError, match="QLoRA"):
        execute(path)
    assert not list(tmp_path.glob("runs/*/artifacts/checkpoints"))


def test_training_set_empty_after_skipping_overlong_examples(tmp_path):
    path = make_project(tmp_path)
    proj = project(path, ["model.context_window=4"])
    from llmcycle.project import lifecycle

    with pytest.raises(UserError, match="all 30 training examples are longer than the context window of 4"):
        lifecycle.execute(proj, "tune", "v", progress=False)
    with pytest.raises(UserError, match="nothing is truncated"):
        fit(TuneConfig(max_steps=1, on_overflow="refuse"), str(tmp_path / "base"), examples(2), examples(1),
            "{input} ->", tmp_path / "w", progress=False, context_window=4)


def test_eval_set_without_targets_is_refused_before_training(tmp_path):
    path = make_project(tmp_path)
    (tmp_path / "eval.jsonl").write_text(json.dumps({"text": "no answer here"}) + "\n")
    proj = project(path, ["data.eval=eval.jsonl"])
    from llmcycle.project import lifecycle

    with pytest.raises(UserError, match="target field 'summary' missing"):
        lifecycle.execute(proj, "tune", "v", progress=False)
    assert not list(tmp_path.glob("runs/*/artifacts/checkpoints"))


# -- validation, best checkpoint, early stopping ---------------------------------------------------
def test_validation_logs_loss_and_headline_and_keeps_the_best(tmp_path):
    path = make_project(tmp_path, tune={"v": {"max_steps": 12, "lr": 1e-2, "batch_size": 4, "eval_every": 4,
                                              "eval_samples": 4, "checkpoint_every": 4}})
    out = execute(path)
    rec = project(path).store().get(out.run_id)
    vals = [m for m in rec.metrics() if "val_loss" in m]
    assert [m["step"] for m in vals] == [4, 8, 12]
    assert all(m["headline"] == "rougeL" and 0 <= m["rougeL"] <= 1 and m["val_loss"] > 0 for m in vals)
    best = rec.artifacts / "checkpoints" / "best"
    state = json.loads((best / "state.json").read_text())
    assert (best / "COMPLETE").is_file() and state["step"] == out.summary["best_step"]
    assert out.summary["best_headline"] == max(m["rougeL"] for m in vals)
    assert sorted(p.name for p in (rec.artifacts / "checkpoints").iterdir()) == ["best", "step-12", "step-8"]
    assert (rec.artifacts / "predictions.jsonl").exists() and out.summary["n_examples"] == 6


def test_early_stopping_when_the_metric_stops_improving(tmp_path, monkeypatch):
    from llmcycle.evaluation import harness

    def flat(loaded, prompts, exs, task, gen_cfg, **kw):  # a metric that never improves
        return {"headline": "rougeL", "headline_value": 0.5, "rougeL": 0.5, "n_examples": len(prompts)}, []

    monkeypatch.setattr(harness, "evaluate", flat)
    path = make_project(tmp_path, tune={"v": {"max_steps": 40, "batch_size": 4, "eval_every": 3,
                                              "early_stopping_patience": 1}})
    s = execute(path).summary
    assert s["stopped_early"] and s["stopped_at"] == 6 and s["steps"] == 6 and s["best_step"] == 3


# -- kill -9 and resume (through the CLI) -------------------------------------------------------------
def _adapter(model_dir: Path):
    from safetensors.torch import load_file

    return load_file(str(model_dir / "adapter_model.safetensors"))


def tune_command(path: Path, resume=False, sets=()):
    return [sys.executable, "-m", "llmcycle", "tune", "-p", str(path), "--json", *(["--resume"] if resume else []),
            *[a for s in sets for a in ("--set", s)]]


def test_kill_9_then_resume_matches_an_uninterrupted_run(tmp_path):
    tune = {"v": {"max_steps": 120, "lr": 0.0001, "batch_size": 4, "checkpoint_every": 20, "log_every": 10,
                  "eval_every": 40, "eval_samples": 3}}

    def run(cmd, check=True):
        proc = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
        assert not check or proc.returncode == 0, proc.stderr
        return proc

    straight = make_project(tmp_path / "straight", tune=tune)
    done = json.loads(run(tune_command(straight)).stdout)[0]["summary"]

    path = make_project(tmp_path / "killed", tune=tune)
    proc = subprocess.Popen(tune_command(path), stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline:
        if list((tmp_path / "killed" / "runs").glob("tune-*/artifacts/checkpoints/step-*/COMPLETE")):
            break
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    runs = project(path).store().list("tune")
    assert [r.status for r in runs] == ["incomplete"], "the run must be killed mid-way"

    # the project is moved before it is resumed: nothing may point back into the old folder
    shutil.copytree(tmp_path / "killed", tmp_path / "moved")
    shutil.rmtree(tmp_path / "killed")
    path = tmp_path / "moved" / "llmcycle.yaml"
    changed = run(tune_command(path, resume=True, sets=["tune.v.lr=0.0002"]), check=False)
    assert changed.returncode == 2 and "lr: 0.0001 → 0.0002" in changed.stderr, changed.stderr
    assert project(path).store().get(runs[0].id).status == "incomplete", "a refused resume changes nothing"

    resumed = json.loads(run(tune_command(path, resume=True)).stdout)[0]
    assert resumed["run_id"] == runs[0].id
    assert resumed["summary"]["steps"] == 120 and resumed["summary"]["best_step"] == done["best_step"]
    assert resumed["summary"]["final_train_loss"] == pytest.approx(done["final_train_loss"], abs=1e-5)
    a, b = _adapter(Path(done["model_dir"])), _adapter(Path(resumed["summary"]["model_dir"]))
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-6), name
    rec = project(path).store().get(runs[0].id)
    assert rec.status == "completed"

    # bookkeeping of the whole run: where it resumed, each step logged once, times over both sessions
    at = rec.meta["resumed_from"]["step"]
    assert at % 20 == 0 and 0 < at < 120
    assert resumed["summary"]["resumed_from"] == {"step": at, "checkpoint": f"checkpoints/step-{at}",
                                                  "checkpoint_time": pytest.approx(rec.created, abs=300)}
    train_steps = [m["step"] for m in rec.metrics() if "loss" in m]
    assert train_steps == list(range(10, 121, 10))
    assert [m["step"] for m in rec.metrics() if "val_loss" in m] == [40, 80, 120]
    assert resumed["summary"]["train_wall_s"] > rec.finished - rec.meta["resumed_from"]["time"]

    # what was recorded resolves in the new folder: relative paths, the adapter's base found
    shown = run([sys.executable, "-m", "llmcycle", "runs", "show", rec.id, "-p", str(path), "--json"]).stdout
    shown_fields = {k: v for k, v in json.loads(shown).items() if k != "command"}  # the command as typed
    assert "killed" not in json.dumps(shown_fields)
    assert shown_fields["summary"]["model_dir"] == f"runs/{rec.id}/artifacts/model"
    base_file = json.loads((rec.artifacts / "model" / "llmcycle_base.json").read_text())
    assert base_file["base_relative"] == "../../../../base"
    shutil.copytree(tmp_path / "moved", tmp_path / "again")  # the adapter finds its base in the copy
    shutil.rmtree(tmp_path / "moved")
    adapter = tmp_path / "again" / json.loads(shown)["summary"]["model_dir"]
    assert adapter_base(adapter) == str((tmp_path / "again" / "base").resolve())
    model, _ = load_model(adapter, device="cpu")
    assert model.peft_config["default"].r > 0


def test_corrupt_checkpoint_is_named(tmp_path):
    cfg = dict(max_steps=4, checkpoint_every=2)
    train(tmp_path, "t5", **cfg)
    newest = tmp_path / "work" / "checkpoints" / "step-4"
    (newest / "model" / "adapter_model.safetensors").write_bytes(b"garbage")
    with pytest.raises(UserError, match=f"corrupt checkpoint {newest}"):
        fit(TuneConfig(lr=1e-2, batch_size=4, **cfg), str(tmp_path / "base"), examples(), examples(4, 100),
            "{input} ->", tmp_path / "work", resume=True, progress=False)


def test_resume_with_changed_config_lists_the_differences(tmp_path):
    train(tmp_path, "t5", steps=2)
    with pytest.raises(UserError, match="lr: 0.01 → 0.02; r: 8 → 4"):
        fit(TuneConfig(max_steps=2, lr=2e-2, r=4, batch_size=4), str(tmp_path / "base"), examples(),
            examples(4, 100), "{input} ->", tmp_path / "work", resume=True, progress=False)


# -- merge ------------------------------------------------------------------------------------------
def test_merged_model_equals_the_adapter(tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from llmcycle.models.generation import GenerationConfig, Generator

    path = make_project(tmp_path, arch="gpt2", tune={"v": {"max_steps": 15, "lr": 3e-2, "batch_size": 4,
                                                           "merge": True, "dropout": 0.0}})
    s = execute(path).summary
    adapter, tok = load_model(s["model_dir"], device="cpu")
    merged = AutoModelForCausalLM.from_pretrained(s["merged_dir"]).eval()
    assert not (Path(s["merged_dir"]) / "adapter_config.json").exists()
    prompts = [f"{e.input} ->" for e in examples(4, 50)]
    cfg = GenerationConfig(max_new_tokens=6)
    a = [r.token_ids for r in Generator(adapter, tok).generate(prompts, cfg)]
    b = [r.token_ids for r in Generator(merged, AutoTokenizer.from_pretrained(s["merged_dir"])).generate(prompts, cfg)]
    assert a == b
    ids = tok(prompts[0], return_tensors="pt")["input_ids"]
    with torch.no_grad():
        diff = (adapter(input_ids=ids).logits - merged(input_ids=ids).logits).abs().max().item()
    base_diff = (AutoModelForCausalLM.from_pretrained(tmp_path / "base")(input_ids=ids).logits
                 - merged(input_ids=ids).logits).abs().max().item()
    assert diff < 1e-4 and base_diff > 1e-3  # equal to the adapter, and the adapter did change the model


def test_peak_memory_is_measured_per_piece_of_work():
    """A second, smaller allocation after a reset reports its own peak, not the process's."""
    import numpy as np

    from llmcycle.core.memory import peak_mb, reset_peak

    if not reset_peak():
        pytest.skip("this platform cannot reset the peak RSS")
    big = np.ones(400 * 2**20 // 8)  # 400 MiB
    high = peak_mb()
    del big
    assert reset_peak()
    low = peak_mb()
    assert high - low > 300


@pytest.mark.parametrize("arch,method", [("t5", "lora"), ("t5", "full"), ("gpt2", "full"), ("gpt2", "prompt_tuning")])
def test_gradient_checkpointing_gives_the_same_training(tmp_path, monkeypatch, arch, method):
    """Recomputing activations (and the vocabulary logits, chunk by chunk) and keeping large blocks
    off the heap change memory, not results: same loss, same weights (dropout 0)."""
    import torch

    import llmcycle.core.memory

    off_heap = []
    real = llmcycle.core.memory.large_blocks_off_the_heap
    monkeypatch.setattr(llmcycle.core.memory, "large_blocks_off_the_heap", lambda: off_heap.append(1) or real())
    plain, _ = train(tmp_path / "a", arch, steps=4, method=method, dropout=0.0)
    assert off_heap == []  # a run that did not choose memory over speed keeps malloc's default
    ckpt, _ = train(tmp_path / "b", arch, steps=4, method=method, dropout=0.0, gradient_checkpointing=True)
    assert off_heap == [1]
    assert ckpt.summary["chunked_loss"] and not plain.summary["chunked_loss"]
    assert ckpt.summary["final_train_loss"] == pytest.approx(plain.summary["final_train_loss"], rel=1e-5)
    a = {k: v for k, v in plain.model.named_parameters() if v.requires_grad}
    b = {k: v for k, v in ckpt.model.named_parameters() if v.requires_grad}
    assert a.keys() == b.keys()
    for name in a:
        assert torch.allclose(a[name], b[name], atol=1e-5), name


def test_seq2seq_summed_loss_equals_the_models_own_loss(tmp_path):
    """sum_loss builds the decoder inputs itself (no second loss); it must match transformers' loss."""
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import collate, encode_examples
    from llmcycle.training.loop import sum_loss

    model, tok = load_model(str(make_t5(tmp_path / "t5")))
    exs = examples(6)
    feats = encode_examples(exs, [e.input for e in exs], tok, "seq2seq", 128, end_id=tok.eos_token_id).features
    batch = collate(feats, tok.pad_token_id)
    total, n = sum_loss(model, batch, "seq2seq")
    assert float(total) / n == pytest.approx(float(model(**batch).loss), rel=1e-5)


@pytest.mark.parametrize("arch,method", [("t5", "full"), ("gpt2", "lora")])
def test_chunked_loss_equals_the_plain_loss_and_projects_scored_tokens_only(tmp_path, monkeypatch, arch, method):
    """sum_loss_chunked: same summed loss and gradients as sum_loss; the vocabulary projection sees
    only scored positions (no padding, no causal prompt), at most a chunk's worth of rows at a time."""
    import llmcycle.training.loop as loop
    from llmcycle.training.batches import collate, encode_examples

    model, tok = load_base(str((make_t5 if arch == "t5" else make_gpt2)(tmp_path / "base")),
                           TuneConfig(method=method, max_steps=1))
    model = wrap(TuneConfig(method=method, max_steps=1, dropout=0.0), model, "seq2seq" if arch == "t5" else "causal")
    kind = "seq2seq" if arch == "t5" else "causal"
    exs = examples(6)
    exs[0] = Example("a much longer input so that the rows are padded to different widths", ["red blue green"], {}, "x")
    batch = collate(encode_examples(exs, [f"{e.input} ->" for e in exs], tok, kind, 128, end_id=tok.eos_token_id).features, tok.pad_token_id)
    head = model.get_output_embeddings()
    vocab = head.weight.shape[0]
    monkeypatch.setattr(loop, "HEAD_CHUNK_ELEMENTS", vocab * 3)  # 3 rows per chunk: several chunks
    rows = []
    real = loop._head_cross_entropy
    monkeypatch.setattr(loop, "_head_cross_entropy", lambda w, b, h, t: rows.append(h.shape[0]) or real(w, b, h, t))
    model.train()

    plain, n_plain = loop.sum_loss(model, batch, kind)
    plain.backward()
    grads = {k: p.grad.clone() for k, p in model.named_parameters() if p.requires_grad}
    model.zero_grad(set_to_none=True)
    chunked, n_chunked = loop.sum_loss_chunked(model, batch, kind, head)
    chunked.backward()

    assert n_chunked == n_plain and chunked.item() == pytest.approx(plain.item(), rel=1e-5)
    assert "forward" not in vars(head)  # the head is itself again
    forward_rows, recomputed = rows[:len(rows) // 2], rows[len(rows) // 2:]  # backward recomputes each chunk
    assert recomputed == forward_rows[::-1] and max(rows) <= 3 and sum(forward_rows) == n_plain
    for k, p in model.named_parameters():
        if p.requires_grad:
            assert torch.allclose(p.grad, grads[k], atol=1e-6, rtol=1e-4), k


def test_chunked_loss_is_not_used_when_the_model_changes_logits_after_the_head(tmp_path, monkeypatch):
    """A model that rescales its logits after the head (as soft-capping models do) fails the check:
    training falls back to the plain loss and still matches training without checkpointing."""
    import llmcycle.training.loop as loop
    from llmcycle.training.batches import collate, encode_examples

    model, tok = load_base(str(make_gpt2(tmp_path / "base")), TuneConfig(method="full", max_steps=1))
    exs = examples(4)
    batch = collate(encode_examples(exs, [f"{e.input} ->" for e in exs], tok, "causal", 128, end_id=tok.eos_token_id).features, tok.pad_token_id)
    assert loop.chunkable_head(model, model, batch, "causal") is model.get_output_embeddings()
    real_forward = type(model).forward

    def capped(self, *a, **k):
        out = real_forward(self, *a, **k)
        out.logits = 2.0 * torch.tanh(out.logits / 2.0)
        return out

    monkeypatch.setattr(type(model), "forward", capped)
    assert loop.chunkable_head(model, model, batch, "causal") is None
    assert "forward" not in vars(model.get_output_embeddings())


# -- giving freed memory back (llmcycle/core/memory.py, training/loop.py) ----------------------------
def _rss_mib() -> float:
    return int(next(l for l in Path("/proc/self/status").read_text().splitlines() if l.startswith("VmRSS")).split()[1]) / 1024


def test_release_free_memory_hands_the_heaps_free_pages_back():
    """Freed heap blocks below the top stay resident under glibc until malloc_trim returns them."""
    import ctypes
    import platform

    from llmcycle.core.memory import release_free_memory

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        assert release_free_memory() is False  # nothing to call: a no-op, never an error
        pytest.skip("malloc_trim is glibc's")
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
    libc.free.argtypes = [ctypes.c_void_p]
    assert release_free_memory()
    blocks = [libc.malloc(64 * 1024) for _ in range(1600)]  # 100 MiB of heap blocks (below mmap size)
    for b in blocks:
        ctypes.memset(b, 1, 64 * 1024)  # touched: resident
    keep = libc.malloc(64 * 1024)  # a live block above them, so free() cannot shrink the heap's top
    for b in blocks:
        libc.free(b)
    before = _rss_mib()
    assert release_free_memory()
    after = _rss_mib()
    libc.free(keep)
    assert before - after > 80, (before, after)


_FREED_RSS_DROP = """
import ctypes, sys
from llmcycle.core.memory import large_blocks_off_the_heap
def rss():
    return int(next(l for l in open("/proc/self/status") if l.startswith("VmRSS")).split()[1]) / 1024
if sys.argv[1] == "on":
    assert large_blocks_off_the_heap()
libc = ctypes.CDLL("libc.so.6")
libc.malloc.restype, libc.malloc.argtypes = ctypes.c_void_p, [ctypes.c_size_t]
libc.free.argtypes = [ctypes.c_void_p]
size = 2 << 20
libc.free(libc.malloc(size))  # glibc now raises its mmap threshold past 2 MiB (unless fixed)
blocks = [libc.malloc(size) for _ in range(50)]  # 100 MiB
for b in blocks:
    ctypes.memset(b, 1, size)
keep = libc.malloc(4096)  # a live block on top: the heap cannot shrink from its end
before = rss()
for b in blocks:
    libc.free(b)
print(before - rss())
"""


def test_large_blocks_off_the_heap_returns_freed_activations_at_once():
    """With the threshold fixed at 1 MiB, freeing 2 MiB blocks returns their memory immediately;
    with glibc's default (raised after the first large free) the same blocks stay resident."""
    import platform

    if platform.system() != "Linux" or platform.libc_ver()[0] != "glibc":
        pytest.skip("mallopt's M_MMAP_THRESHOLD is glibc's")
    drop = {mode: float(subprocess.run([sys.executable, "-c", _FREED_RSS_DROP, mode], capture_output=True,
                                       text=True, check=True).stdout) for mode in ("on", "off")}
    assert drop["on"] > 90 and drop["off"] < 20, drop


def test_backward_phase_hooks_fire_once_per_phase_and_leave_gradients_alone(tmp_path):
    """Seq2seq: once when the gradient reaches the output head, once at the encoder's output; never
    under no_grad; gradients identical to a model without the hooks."""
    from llmcycle.models.load import load_model
    from llmcycle.training.batches import collate, encode_examples
    from llmcycle.training.loop import release_between_backward_phases, sum_loss

    base = make_t5(tmp_path / "t5")
    grads, calls = [], []
    for hooked in (False, True):
        model, tok = load_model(str(base))
        model.train()
        torch.manual_seed(0)  # the same dropout masks in both runs
        if hooked:
            handles = release_between_backward_phases(model, lambda: calls.append(1))
            assert len(handles) == 2
        exs = examples(6)
        batch = collate(encode_examples(exs, [e.input for e in exs], tok, "seq2seq", 128, end_id=tok.eos_token_id).features,
                        tok.pad_token_id)
        with torch.no_grad():
            sum_loss(model, batch, "seq2seq")
        assert calls == []
        s, _ = sum_loss(model, batch, "seq2seq")
        assert calls == []  # the forward only registers; releasing happens inside backward
        s.backward()
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
    assert len(calls) == 2
    assert grads[0].keys() == grads[1].keys()
    for name in grads[0]:
        assert torch.equal(grads[0][name], grads[1][name]), name


@pytest.mark.parametrize("arch,method,checkpointing,per_step", [("t5", "lora", True, 3), ("gpt2", "full", False, 2)])
def test_releasing_free_memory_leaves_training_unchanged(tmp_path, monkeypatch, arch, method, checkpointing, per_step):
    """fit on CPU releases free heap memory after loading, after each forward, inside backward (output
    head; encoder) and after each validation, and trains bit for bit as without it; the trained model
    keeps no hooks."""
    import llmcycle.core.memory

    calls = []
    real = llmcycle.core.memory.release_free_memory
    monkeypatch.setattr(llmcycle.core.memory, "release_free_memory", lambda: calls.append(1) or real())
    from llmcycle.training import loop

    assert not loop.worth_releasing(load_base(str(make_t5(tmp_path / "t5")), TuneConfig(max_steps=1))[0].config,
                                    "seq2seq", [{"input_ids": [1] * 20, "labels": [1] * 5}], 4)  # a few kB
    monkeypatch.setattr(loop, "RELEASE_MIN_ACTIVATION_MB", 0.0)  # these tiny models: release anyway
    kw = dict(steps=4, method=method, gradient_checkpointing=checkpointing, eval_every=2)
    released, _ = train(tmp_path / "a", arch, **kw)
    assert len(calls) == 1 + 4 * per_step + 2  # two validations: once each, their no_grad passes never
    n = len(calls)
    released.model.eval()
    with torch.enable_grad():  # a forward + backward on the returned model: no hooks left to call
        ids = torch.tensor([[5, 6, 7]])
        kw_ = {"decoder_input_ids": ids} if arch == "t5" else {}
        released.model(input_ids=ids, **kw_).logits.sum().backward()
    assert len(calls) == n
    monkeypatch.setattr(llmcycle.core.memory, "release_free_memory", lambda: False)
    plain, _ = train(tmp_path / "b", arch, **kw)
    assert released.summary["final_train_loss"] == plain.summary["final_train_loss"]
    a, b = dict(released.model.named_parameters()), dict(plain.model.named_parameters())
    assert a.keys() == b.keys()
    for name in a:
        assert torch.equal(a[name], b[name]), name


def test_resuming_full_tuning_keeps_gradient_checkpointing_and_loads_the_weights(tmp_path):
    from llmcycle.training.loop import _load_weights

    model, _ = load_base(str(make_t5(tmp_path / "base")), TuneConfig(method="full", max_steps=1))
    model.activation_checkpointing_enable(activation_checkpointing_kwargs={"use_reentrant": False})
    saved, _ = load_base(str(make_t5(tmp_path / "other", seed=1)), TuneConfig(method="full", max_steps=1))
    saved.save_pretrained(tmp_path / "ckpt" / "model")
    assert not torch.equal(model.lm_head.weight, saved.lm_head.weight)
    resumed = _load_weights(model, tmp_path / "ckpt", "full", torch.float32)
    assert resumed is model and resumed.is_gradient_checkpointing
    assert all(torch.equal(a, b) for a, b in zip(resumed.state_dict().values(), saved.state_dict().values()))
