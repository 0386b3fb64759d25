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
from pathlib import Path

import llmcycle
from llmcycle.core import ranks
from llmcycle.core.errors import UserError, suggest
from llmcycle.data.records import fingerprint
from llmcycle.stages import registry


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
    """Variant name -> its resolved config (as a dict) for a stage; empty when not configured. A chooser
    variant (select's `best`) also gets the current run of each alternative, by content."""
    spec = registry.get(stage)
    out = spec.variants(project)
    if spec.chooser and spec.chooser in out:
        out[spec.chooser]["candidate_runs"] = _candidate_runs(project, stage, out, spec.chooser)
    return out


def _candidate_runs(project, stage: str, configs: dict, chooser: str) -> dict:
    """For each alternative, its completed run with the current config and inputs (or None)."""
    store = project.store()
    out = {}
    for name, config in configs.items():
        if name != chooser:
            cached = store.find_cached(stage, name, content_hash(project, stage, name, config))
            out[name] = cached.id if cached else None
    return out


def _data_identity(project) -> dict:
    data = project.config.data
    if data is None:
        return {}
    out = {"config": data.model_dump()}
    for key in ("train", "eval"):
        source = getattr(data, key)
        if source:
            out[key] = fingerprint(source, project.dir)
    return out


def _model_identity(project, name: str | None = None) -> dict:
    """A model reference by value: a run reference resolves to the run it currently points at, a
    local folder to a fingerprint of its files. `name` overrides the project's model name."""
    model = project.config.model
    if model is None and name is None:
        return {}
    out = model.model_dump() if model is not None else {}
    name = name or model.name
    out["name"] = name
    if name.startswith("run:"):
        try:
            out["resolved"] = project.store().get(name[4:]).id
        except UserError:
            out["resolved"] = None
    elif (project.dir / name).exists():
        out["resolved"] = fingerprint(name, project.dir)  # a local folder: by content
    return out


def _stage_model_name(project, stage: str, config: dict) -> str | None:
    """The model a stage variant works on (the stage's model_of), or None."""
    model_of = registry.get(stage).model_of
    return model_of(project, config) if model_of else None


def model_parent(project, name: str | None) -> str | None:
    """The run that produced the model, when it is referenced as `run:...`."""
    if not name or not name.startswith("run:"):
        return None
    return _model_identity(project, name).get("resolved")


def content_hash(project, stage: str, variant: str, config: dict) -> str:
    """Identity of a stage variant's work: its config, the data it reads and the code version."""
    inputs = {"stage": stage, "variant": variant, "config": config, "task": project.config.project.task,
              "data": _data_identity(project), "llmcycle": llmcycle.__version__}
    spec = registry.get(stage)
    if spec.model_of is not None:
        name = spec.model_of(project, config)
        model = project.config.model
        if name or model is None:
            inputs["model"] = _model_identity(project, name)
        else:  # a warm start, or a chooser: no model to name, but the project's options (dtype, window) count
            inputs["model"] = {k: v for k, v in model.model_dump().items() if k != "name"}
    if spec.evaluates:
        inputs["evaluate"] = project.config.evaluate.model_dump() if project.config.evaluate else None
    inputs.update(spec.inputs(project, config, lambda ref: _model_identity(project, ref)))
    blob = json.dumps(inputs, sort_keys=True, default=str).encode()
    return hashlib.sha256(blob).hexdigest()[:16]


# -- several processes (torchrun) ---------------------------------------------------------------
def is_main_process() -> bool:
    """Rank 0 of a torchrun launch, or a plain single process: the one that writes the run store."""
    return ranks.is_main()


def _distributed() -> bool:
    return ranks.world_size() > 1


def _share_from_main(value):
    """Rank 0's value on every rank (the run folder, the skip decision), so all ranks agree."""
    dist = ranks.ensure_group()
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


class FollowerRun:
    """What a non-zero rank holds instead of a Run: the same folder (to read checkpoints from),
    but it never writes the run's records — rank 0 does."""

    def __init__(self, run_id: str, run_dir: str):
        self.id, self.dir = run_id, Path(run_dir)

    @property
    def artifacts(self) -> Path:
        return self.dir / "artifacts"

    def log(self, metrics: dict) -> None:
        pass

    def finish(self, summary: dict) -> None:
        pass

    def rewind(self, step: int) -> None:
        pass


def execute(project, stage: str, variant: str, *, force: bool = False, resume: bool = False,
            progress: bool = True) -> Outcome:
    """Run one variant of one stage, unless an identical completed run exists (and not forced)."""
    if _distributed():
        return _execute_distributed(project, stage, variant, force=force, resume=resume,
                                    progress=progress)
    return _execute(project, stage, variant, force=force, resume=resume, progress=progress)


def _execute_distributed(project, stage, variant, *, force, resume, progress) -> Outcome:
    """Under torchrun: rank 0 records the run as usual; the others run the same stage code against
    rank 0's run folder without writing to the store. Rank 0 tells them which folder, or that the
    variant was skipped, or that it failed before starting (so nobody waits forever)."""
    if is_main_process():
        announced = []

        def announce(run) -> None:
            announced.append(True)
            _share_from_main(("run", run.id, str(run.dir)))

        try:
            outcome = _execute(project, stage, variant, force=force, resume=resume,
                               progress=progress, on_start=announce)
        except BaseException as exc:
            if not announced:
                _share_from_main(("error", f"{type(exc).__name__}: {exc}", None))
            raise
        if not announced:
            _share_from_main(("skipped", outcome.run_id, None))
        return outcome
    kind, value, run_dir = _share_from_main(None)
    if kind == "error":
        raise UserError(f"rank 0 stopped before {stage}.{variant} started: {value}")
    if kind == "skipped":
        return Outcome(stage, variant, "skipped", value, {})
    summary = registry.get(stage).run(project, variant, FollowerRun(value, run_dir), resume=resume, progress=False)
    return Outcome(stage, variant, "completed", value, summary)


def _execute(project, stage: str, variant: str, *, force: bool, resume: bool, progress: bool,
             on_start=None) -> Outcome:
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
    spec = registry.get(stage)
    if spec.model_of is not None and spec.check_model_first:
        _check_model_reference(project, stage, variant, config)
    parent = model_parent(project, _stage_model_name(project, stage, config))
    with store.start(stage, variant, config, parent=parent, content_hash=digest,
                     resume_ref=resume_ref, project_dir=project.dir) as run:
        if on_start:
            on_start(run)
        summary = spec.run(project, variant, run, resume=resume, progress=progress)
    return Outcome(stage, variant, "completed", run.id, summary)


def _check_model_reference(project, stage: str, variant: str, config: dict) -> None:
    """A `run:` model that does not resolve stops the stage before a run is recorded, naming the key
    that refers to it (e.g. `model.name: run:select/best` before any select run)."""
    name = _stage_model_name(project, stage, config)
    if not name or not name.startswith("run:"):
        return
    try:
        project.store().get(name[4:])
    except UserError as exc:
        key = next((f"{stage}.{variant}.{k}" for k, v in config.items()
                    if v == name), "model.name")
        raise UserError(f"{key}: {name}: {exc}") from None


def plan_stages(only: list[str] | None = None, start: str | None = None) -> list[str]:
    """The stages `llmcycle run` walks, honouring --only and --from."""
    for name in (only or []) + ([start] if start else []):
        registry.get(name)  # an unknown name is an error naming the stages
    stages = list(registry.NAMES)
    if start:
        stages = stages[stages.index(start):]
    if only:
        stages = [s for s in stages if s in only]
    return stages


def run_all(project, *, only=None, start=None, force=False, progress=True, on_outcome=None) -> list[Outcome]:
    """Every configured variant of every selected stage, in lifecycle order. A failed alternative
    (a select candidate) is recorded as such and the rest go on; any other failure stops the walk."""
    outcomes = []
    for stage in plan_stages(only, start):
        for variant in variants(project, stage):
            outcome = execute_variant(project, stage, variant, force=force, progress=progress)
            outcomes.append(outcome)
            if on_outcome:
                on_outcome(outcome)
    return outcomes


def execute_variant(project, stage: str, variant: str, *, force: bool = False, progress: bool = True) -> Outcome:
    """`execute`, except that an alternative that fails once its run started becomes a failed Outcome (the
    run is recorded failed with the reason) instead of stopping the other alternatives."""
    spec = registry.get(stage)
    if not spec.alternatives or variant == spec.chooser or _distributed():
        return execute(project, stage, variant, force=force, progress=progress)
    started = []
    try:
        return _execute(project, stage, variant, force=force, resume=False, progress=progress,
                        on_start=lambda run: started.append(run.id))
    except Exception as exc:  # noqa: BLE001 - recorded in the run and reported; the others go on
        if not started:
            raise  # not the candidate's failure: nothing was recorded, so nothing may be hidden
        return Outcome(stage, variant, "failed", started[0],
                       {"error": str(exc) if isinstance(exc, UserError) else f"{type(exc).__name__}: {exc}"})
