"""`llmcycle run`: carry the project through its configured stages in lifecycle order.

Each variant of each stage becomes a run in the run store. A stage variant whose config and inputs are
unchanged since its last completed run (same content hash) is skipped unless forced, so re-running the
project only redoes what changed. Stage modules never import each other; this module calls each
stage's `run(...)` and hands results on through the store.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass

import llmcycle
from llmcycle.errors import UserError, suggest

# The lifecycle's order. Stages not built yet are absent, not stubbed.
STAGES = ("scope", "pretrain", "prompt")
# Stages that evaluate the project's model: its identity is one of their inputs, and the run that
# produced it (if any) is their parent.
USES_MODEL = ("scope", "prompt")


@dataclass
class Outcome:
    stage: str
    variant: str
    status: str  # completed | skipped | failed
    run_id: str | None
    summary: dict

    def to_dict(self) -> dict:
        return {"stage": self.stage, "variant": self.variant, "status": self.status,
                "run_id": self.run_id, "summary": self.summary}


def variants(project, stage: str) -> dict[str, dict]:
    """Variant name -> its resolved config (as a dict) for a stage; empty when not configured."""
    cfg = project.config
    if stage == "scope":
        # Scoping needs something to scope: a use case, data or a model.
        if cfg.scope is None and cfg.data is None and cfg.model is None:
            return {}
        return {"plan": {"scope": cfg.scope.model_dump() if cfg.scope else None}}
    if stage == "prompt":
        from llmcycle.prompt import variant_grid

        return variant_grid(project)
    section = getattr(cfg, stage)
    return {name: v.model_dump() for name, v in section.items()}


def _data_identity(project) -> dict:
    from llmcycle.data import fingerprint

    data = project.config.data
    if data is None:
        return {}
    out = {"config": data.model_dump()}
    for key in ("train", "eval"):
        source = getattr(data, key)
        if source:
            out[key] = fingerprint(source, project.dir)
    return out


def _model_identity(project) -> dict:
    """A model reference by value: a run reference resolves to the run it currently points at."""
    model = project.config.model
    if model is None:
        return {}
    out = model.model_dump()
    if model.name.startswith("run:"):
        try:
            out["resolved"] = project.store().get(model.name[4:]).id
        except UserError:
            out["resolved"] = None
    elif (project.dir / model.name).exists():
        from llmcycle.data import fingerprint

        out["resolved"] = fingerprint(model.name, project.dir)  # a local folder: by content
    return out


def model_parent(project) -> str | None:
    """The run that produced the project's model, when it is `run:...`."""
    identity = _model_identity(project)
    return identity.get("resolved") if project.config.model.name.startswith("run:") else None


def content_hash(project, stage: str, variant: str, config: dict) -> str:
    """Identity of a stage variant's work: its config, the data it reads and the code version."""
    inputs = {"stage": stage, "variant": variant, "config": config, "task": project.config.project.task,
              "data": _data_identity(project), "llmcycle": llmcycle.__version__}
    if stage in USES_MODEL:
        inputs["model"] = _model_identity(project)
    if stage == "prompt":
        inputs["evaluate"] = project.config.evaluate.model_dump() if project.config.evaluate else None
    if config.get("corpus"):  # extra pretraining text files count as inputs too
        from llmcycle.data import fingerprint

        inputs["corpus"] = [fingerprint(path, project.dir) for path in config["corpus"]]
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


def _stage_module(stage: str):
    import importlib

    return importlib.import_module(f"llmcycle.{stage}")


def execute(project, stage: str, variant: str, *, force: bool = False, resume: bool = False,
            progress: bool = True) -> Outcome:
    """Run one variant of one stage, unless an identical completed run exists (and not forced)."""
    store = project.store()
    config = variants(project, stage).get(variant)
    if config is None:
        known = list(variants(project, stage))
        raise UserError(f"{stage} has no variant '{variant}'{suggest(variant, known)}"
                        + (f" (variants: {', '.join(known)})" if known else ""))
    digest = content_hash(project, stage, variant, config)
    if not force and not resume:
        cached = store.find_cached(stage, variant, digest)
        if cached is not None:
            return Outcome(stage, variant, "skipped", cached.id, cached.summary())
    resume_ref = None
    if resume:
        unfinished = store.latest_unfinished(stage, variant)
        if unfinished is None:
            raise UserError(f"nothing to resume for {stage}.{variant}: no failed or incomplete run "
                            f"in {store.root}")
        resume_ref = unfinished.id
    module = _stage_module(stage)
    parent = model_parent(project) if stage in USES_MODEL and project.config.model else None
    with store.start(stage, variant, config, parent=parent, content_hash=digest,
                     resume_ref=resume_ref, project_dir=project.dir) as run:
        summary = module.run(project, variant, run, resume=resume, progress=progress)
    return Outcome(stage, variant, "completed", run.id, summary)


def plan_stages(only: list[str] | None = None, start: str | None = None) -> list[str]:
    """The stages `llmcycle run` walks, honouring --only and --from."""
    for name in (only or []) + ([start] if start else []):
        if name not in STAGES:
            raise UserError(f"unknown stage '{name}'{suggest(name, STAGES)} "
                            f"(stages: {', '.join(STAGES)})")
    stages = list(STAGES)
    if start:
        stages = stages[stages.index(start):]
    if only:
        stages = [s for s in stages if s in only]
    return stages


def run_all(project, *, only=None, start=None, force=False, progress=True, on_outcome=None) -> list[Outcome]:
    """Every configured variant of every selected stage, in lifecycle order."""
    outcomes = []
    for stage in plan_stages(only, start):
        for variant in variants(project, stage):
            outcome = execute(project, stage, variant, force=force, progress=progress)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    return outcomes
