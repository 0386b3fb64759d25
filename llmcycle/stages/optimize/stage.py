"""Optimize for deployment: quantize, distill, prune or export a model, then measure what it costs.

    llmcycle optimize [--variant V]          (or as a stage of `llmcycle run`)

Settings come from `optimize: {VARIANT: ...}` in llmcycle.yaml (one class per method below); `method` picks
what a variant does to its `source` (run:STAGE/VARIANT, a folder or a Hub id; default the project's
model; LoRA adapters are merged first):

  quantize  int8_dynamic: int8 Linear weights, activations quantized on the fly, CPU only;
            bnb_int8 / bnb_nf4: bitsandbytes 8-bit / 4-bit on a CUDA GPU (llmcycle/stages/optimize/quantize.py).
  distill   a smaller student trained on the teacher's softened logits and the references (or the
            teacher's own outputs) (llmcycle/stages/optimize/distill.py).
  prune     magnitude pruning, unstructured or of whole attention heads / FFN channels, with an
            optional short recovery fine-tune (llmcycle/stages/optimize/prune.py).
  export    a plain Hugging Face folder (adapters merged), and ONNX through `optimum` when installed.

Every variant saves its model to artifacts/model (so `eval`, `serve` and `run:optimize/VARIANT` load
it), then reloads it from disk exactly as they would and records, next to the harness's quality
metrics: size on disk (`size_mb`: its weight files), peak memory of loading + evaluating
(`peak_memory_mb`; the optimizing itself is `optimize_peak_memory_mb`), per-request latency
(`latency_p50_ms` / `latency_p95_ms`: the first `latency_samples` eval prompts generated alone, batch 1)
and throughput (the batched eval's `examples_per_s` and `completion_tokens_per_s`). The source is
measured the same way, so each run shows before -> after: `source_size_mb` (its weight files on disk,
an adapter's base included; `size_ratio` = size_mb / source_size_mb) and `source_latency_p50_ms` /
`source_latency_p95_ms` (the same prompts, generation settings, number of samples and device). A
figure that cannot be measured here (a base on no local disk, latency_samples 0) is None, never a
guess. Runs are short and keep no checkpoints: --resume starts the variant over in the same run folder.
"""
from __future__ import annotations

import time
from pathlib import Path
from typing import Annotated, Literal, Union

from pydantic import Field, model_validator

from llmcycle.core.configbase import Section
from llmcycle.core.errors import UserError
from llmcycle.core.memory import peak_mb, reset_peak
from llmcycle.data.prompting import check_template
from llmcycle.data.records import load_splits
from llmcycle.evaluation import harness
from llmcycle.evaluation.evaluate import score_on_project
from llmcycle.evaluation.success import local_folder
from llmcycle.evaluation.settings import (
    eval_examples,
    project_system,
    project_template,
    settings,
)
from llmcycle.models.folders import (
    load_source,
    parameter_count,
    save_folder,
    source_facts,
    weights_mb,
)
from llmcycle.models.generation import Generator
from llmcycle.models.hub import ADAPTER_CONFIG, adapter_base, check_bitsandbytes, model_kind, resolve_device
from llmcycle.models.load import load_model
from llmcycle.stages.contract import Stage, own_model, section_variants
from llmcycle.stages.optimize import distill, prune
from llmcycle.stages.optimize.quantize import quantize

ONNX_INSTALL = "pip install 'optimum[onnxruntime]'"


class StudentConfig(Section):
    """The student's shape for `method: distill`; unset dimensions are the teacher's."""

    preset: Literal["tiny", "small", "base"] | None = Field(
        None, description="pretrain's preset dims for the teacher's architecture (t5: t5-small/base "
        "shapes; gpt2: gpt2/gpt2-medium shapes); explicit dimensions below override it")
    ratio: float = Field(0.5, gt=0, le=1, description="share of the teacher's layers the student keeps "
                         "(rounded up) when neither n_layers nor preset is given")
    n_layers: int | None = Field(None, ge=1, description="layers (t5: in the encoder and in the decoder each)")
    d_model: int | None = Field(None, ge=1, description="hidden size")
    n_heads: int | None = Field(None, ge=1, description="attention heads")
    d_ff: int | None = Field(None, ge=1, description="feed-forward inner size")


class _Variant(Section):
    """What every variant of the `optimize:` section has; each method's class narrows `method` to its own
    name, which picks the class (OptimizeVariant below)."""

    method: str = Field(description="the method")
    source: str | None = Field(None, description="the model to optimize: run:STAGE/VARIANT, a local folder "
                               "or a Hub id; default: the project's model (LoRA adapters are merged first)")
    latency_samples: int = Field(16, ge=0, description="eval prompts generated one at a time (batch 1) "
                                 "for the p50/p95 per-request latency; 0 = skip")


class _Training(Section):
    """The training loop of distill and of prune's recovery."""

    lr: float = Field(5e-4, gt=0, description="peak learning rate (AdamW, linear decay)")
    batch_size: int = Field(8, ge=1, description="training examples per step")
    seed: int = Field(42, description="seed for student init, data order and dropout")
    log_every: int = Field(10, ge=1, description="log the training loss every N steps")


class QuantizeConfig(_Variant):
    """`method: quantize`: int8 / 4-bit weights."""

    method: Literal["quantize"] = Field(description="quantize: int8 / 4-bit weights")
    scheme: Literal["int8_dynamic", "bnb_int8", "bnb_nf4"] = Field(
        "int8_dynamic", description="int8_dynamic: int8 Linear weights, activations quantized on the fly, "
        "CPU; bnb_int8 / bnb_nf4: bitsandbytes 8-bit / 4-bit NF4, needs a CUDA GPU and bitsandbytes")
    per_channel: bool = Field(True, description="int8_dynamic: one scale per output row (more accurate) "
                              "instead of one per matrix")


class DistillConfig(_Training, _Variant):
    """`method: distill`: a smaller student trained on the teacher's softened logits."""

    method: Literal["distill"] = Field(description="distill: train a smaller student on the teacher")
    student: StudentConfig = Field(default_factory=StudentConfig, description="the student's shape")
    init: Literal["auto", "teacher", "random"] = Field(
        "auto", description="teacher: start from the teacher's embeddings and evenly spaced layers (needs "
        "the same width); random: fresh weights; auto: teacher when the widths match, else random")
    temperature: float = Field(2.0, gt=0, description="softens both distributions in the KL term")
    alpha: float = Field(0.5, ge=0, le=1, description="loss = alpha * KL(teacher || student) * T^2 "
                         "+ (1 - alpha) * cross-entropy on the targets")
    targets: Literal["references", "teacher"] = Field(
        "references", description="what the cross-entropy term learns: the data's references, or the "
        "teacher's greedy outputs for the training prompts (generated first)")
    max_steps: int = Field(200, ge=1, description="optimizer steps for the student")


class PruneConfig(_Training, _Variant):
    """`method: prune`: magnitude pruning, with an optional recovery fine-tune."""

    method: Literal["prune"] = Field(description="prune: remove weights, heads or FFN channels")
    structure: Literal["unstructured", "heads", "ffn"] = Field(
        "unstructured", description="unstructured: the smallest weights of every Linear layer; heads: "
        "whole attention heads; ffn: whole feed-forward channels (t5 and gpt2)")
    sparsity: float = Field(0.5, ge=0, lt=1, description="share of weights (unstructured) or of heads / "
                            "channels per layer (structured) to remove")
    scope: Literal["layer", "global"] = Field(
        "layer", description="unstructured: the sparsity in every layer, or over all layers together")
    recovery_steps: int = Field(0, ge=0, description="fine-tuning steps after pruning (pruned weights stay "
                                "zero); 0 = none")

    @model_validator(mode="after")
    def _scope_is_unstructured(self):
        if "scope" in self.model_fields_set and self.structure != "unstructured":
            raise ValueError("'scope' applies to unstructured pruning only")
        return self


class ExportConfig(_Variant):
    """`method: export`: a merged Hugging Face folder, or ONNX."""

    method: Literal["export"] = Field(description="export: merged Hugging Face folder or ONNX")
    format: Literal["hf", "onnx"] = Field("hf", description="hf: a Hugging Face folder; onnx: also an ONNX "
                                          "export in artifacts/onnx (needs optimum[onnxruntime])")


# One variant of the `optimize:` section of llmcycle.yaml: its `method` picks the class.
OptimizeVariant = Annotated[Union[QuantizeConfig, DistillConfig, PruneConfig, ExportConfig],
                            Field(discriminator="method")]
OptimizeConfig = QuantizeConfig | DistillConfig | PruneConfig | ExportConfig


# ------------------------------------------------------------------------------------------- export
def export(cfg: ExportConfig, source_path: str, dest: Path, opts: dict, info: dict, onnx_dir: Path) -> dict:
    """A merged Hugging Face folder; with format onnx, also an ONNX export of it through optimum."""

    model, tok, merged = load_source(source_path, dtype=opts.get("dtype", "auto"), device="cpu",
                                     trust_remote_code=opts.get("trust_remote_code", False))
    facts = {**source_facts(model, merged), "format": cfg.format}
    save_folder(model, tok, dest, info)
    if cfg.format == "onnx":  # the graphs are exported from the merged folder, which is what is evaluated
        from optimum.exporters.onnx import main_export

        seq2seq = model_kind(model.config) == "seq2seq"
        main_export(str(dest), output=str(onnx_dir),
                    task="text2text-generation-with-past" if seq2seq else "text-generation-with-past")
        facts.update(onnx_dir=str(onnx_dir),
                     onnx_mb=round(sum(f.stat().st_size for f in onnx_dir.rglob("*") if f.is_file()) / 2**20, 3))
    return facts


def check_requirements(cfg: OptimizeConfig, variant: str) -> None:
    """Missing hardware or packages, found before anything is loaded."""
    import importlib.util

    if cfg.method == "quantize" and cfg.scheme != "int8_dynamic":
        check_bitsandbytes(f"optimize.{variant}: scheme {cfg.scheme}")
    if cfg.method == "export" and cfg.format == "onnx" and importlib.util.find_spec("optimum") is None:
        raise UserError(f"optimize.{variant}: format onnx needs the optimum package: {ONNX_INSTALL}")


# --------------------------------------------------------------------------------------- the stage
def run(project, variant: str, run, *, resume: bool = False, progress: bool = True) -> dict:
    """Stage entry point: optimize `optimize.<variant>`'s source, save it, reload it from disk as
    `eval` / `serve` would, and evaluate it with the project's prompt, recording size, memory,
    latency and throughput next to quality."""
    import gc

    t_start = time.perf_counter()
    cfg = project.config.optimize[variant]
    opts = project.config.model.model_dump() if project.config.model is not None else {}
    ref, source_path, source_run, examples, template, train = _inputs(project, variant, cfg)
    device = "cpu" if cfg.method == "quantize" and cfg.scheme == "int8_dynamic" else opts.get("device", "auto")
    reset_peak(resolve_device(device))
    dest = run.artifacts / "model"
    info = {"stage": "optimize", "variant": variant, "method": cfg.method, "source": ref,
            "source_path": source_path, "source_run": source_run, "config": cfg.model_dump()}
    if cfg.method == "quantize":
        facts = quantize(cfg, source_path, dest, opts, info)
    elif cfg.method == "export":
        facts = export(cfg, source_path, dest, opts, info, run.artifacts / "onnx")
    else:
        module = distill if cfg.method == "distill" else prune
        facts = module.optimize(cfg, source_path, dest, train, template, info=info, opts=opts,
                                gen_cfg=settings(project).generation, task=project.config.project.task,
                                log=run.log, progress=progress, system=project_system(project))
    facts["optimize_peak_memory_mb"] = round(peak_mb(resolve_device(device)), 1)
    facts["optimize_s"] = round(time.perf_counter() - t_start, 3)
    gc.collect()  # the source and working copies are gone; what follows is what deployment costs

    reset_peak(resolve_device(device))
    measured, parameters, prompts = _evaluate_saved(project, variant, cfg, run, dest, device, opts, examples,
                                                    template, progress)
    peak = round(peak_mb(resolve_device(device)), 1)  # the optimized model's, before the source is loaded
    size = weights_mb(dest)
    before = _measure_source(cfg, source_path, device, opts, prompts, settings(project).generation)
    source_size = before.pop("source_size_mb")
    summary = {**measured, **facts, **before,
               "peak_memory_mb": peak,
               "size_mb": round(size, 3),
               "source_size_mb": round(source_size, 3) if source_size is not None else None,
               "size_ratio": round(size / source_size, 4) if source_size else None,
               "parameters": facts.get("parameters") or parameters,
               "method": cfg.method, "source": ref, "source_path": source_path, "parent": source_run,
               "model_dir": str(dest), "wall_s": round(time.perf_counter() - t_start, 3)}
    run.finish(summary)
    return summary


def _inputs(project, variant: str, cfg):
    """(source reference, its path, the run that made it, eval examples, template, training examples
    or None), each checked before any work starts."""
    mcfg = project.config.model
    ref = cfg.source or (mcfg.name if mcfg is not None else None)
    if ref is None:
        raise UserError(f"optimize.{variant}: nothing to optimize: set optimize.{variant}.source or the "
                        "project's model.name")
    check_requirements(cfg, variant)
    source_path, source_run = harness.resolve(ref, project)
    examples = eval_examples(project, limit=settings(project).limit)  # refuses an eval set without targets
    template = project_template(project)
    check_template(template, "evaluate.template", examples[0])
    train = None
    if cfg.method == "distill" or (cfg.method == "prune" and cfg.recovery_steps):
        train = load_splits(project.config.data, project.dir).train
        if not train:
            raise UserError(f"optimize.{variant}: {cfg.method} trains on data.train, which is empty")
    return ref, source_path, source_run, examples, template, train


def _evaluate_saved(project, variant: str, cfg, run, dest, device: str, opts: dict, examples, template,
                    progress: bool) -> tuple[dict, int, list[str]]:
    """The saved folder loaded as `eval` and `serve` will load it, then scored with the project's prompt
    and timed request by request: (quality and latency figures, its parameter count, the prompts)."""
    ev = settings(project)
    model, tok = load_model(str(dest), dtype=opts.get("dtype", "auto"), device=device,
                            trust_remote_code=opts.get("trust_remote_code", False))
    loaded = harness.LoadedModel(f"optimize/{variant}", str(dest), model, tok,
                                 Generator(model, tok, opts.get("context_window")), run.id)
    metrics, rows, fitted = score_on_project(project, loaded, examples, template=template, progress=progress,
                                             label=f"eval optimize.{variant}")
    latency = harness.request_latency(loaded.generator, fitted.prompts, ev.generation, cfg.latency_samples)
    harness.write_predictions(run, rows)
    return {**metrics, **latency}, parameter_count(model), fitted.prompts


def _measure_source(cfg, source_path: str, device: str, opts: dict, prompts: list[str], gen_cfg) -> dict:
    """The source's size and latency measured exactly as the optimized model's (weight files on disk;
    harness.request_latency with the same prompts, generation settings, samples and device, loaded as
    `serve` loads it), so the summary shows before -> after."""
    import gc

    figures = {"source_size_mb": _weights_on_disk(source_path), "source_latency_p50_ms": None,
               "source_latency_p95_ms": None}
    if cfg.latency_samples and prompts:
        gc.collect()  # the optimized model's memory goes back first
        model, tok = load_model(source_path, dtype=opts.get("dtype", "auto"), device=device,
                                trust_remote_code=opts.get("trust_remote_code", False))
        latency = harness.request_latency(Generator(model, tok, opts.get("context_window")), prompts, gen_cfg,
                                          cfg.latency_samples)
        figures.update({f"source_{k}": latency[k] for k in ("latency_p50_ms", "latency_p95_ms")})
        del model
        gc.collect()
    return figures


def _weights_on_disk(path: str) -> float | None:
    """MB of a model's weight files as `size_mb` counts them (an adapter's base included); None when
    they are not on this disk (a base that is a Hub id not in the cache)."""
    folder = local_folder(path)
    base = local_folder(adapter_base(folder)) if folder and (folder / ADAPTER_CONFIG).is_file() else folder
    if folder is None or base is None:
        return None
    return weights_mb(folder) + (weights_mb(base) if base != folder else 0)


STAGE = Stage(name="optimize", section=dict[str, OptimizeVariant], run=run, variants=section_variants("optimize"),
              model_of=own_model("source"), evaluates=True,
              summary="quantize, distill, prune or export a model and measure what it costs")
