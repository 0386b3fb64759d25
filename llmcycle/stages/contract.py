"""The Stage contract: what every lifecycle stage tells the rest of the tool about itself.

The project file, the lifecycle runner, the CLI, the report and the dashboard read stages only through
this object (listed in lifecycle order in stages/registry.py); none of them names a stage's own keys.
A stage module defines one `STAGE = Stage(...)`; adding a stage is a new module or folder under
stages/ plus one line in the registry (ARCHITECTURE.md walks through an example).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Callable

Identify = Callable[[str], dict]  # a model reference -> its identity (the run it points at, or a fingerprint)


@dataclass(frozen=True)
class Stage:
    name: str  # the stage's CLI command, project-file section and run-store stage name
    section: Any  # the pydantic type of its section in llmcycle.yaml (e.g. dict[str, TuneConfig])
    run: Callable[..., dict]  # run(project, variant, run, *, resume, progress) -> summary (calls run.finish)
    variants: Callable[[Any], dict[str, dict]]  # project -> {variant name: its resolved config}
    summary: str  # one line, for `llmcycle --help` and the docs
    # the model a variant works on (its parent run when it is `run:...`); None: the stage uses no model
    model_of: Callable[[Any, dict], str | None] | None = None
    # what else goes into a variant's content hash besides config, data, task, model and code version
    inputs: Callable[[Any, dict, Identify], dict] = field(default=lambda project, config, identify: {})
    evaluates: bool = False  # it evaluates with the project's `evaluate:` settings (so they are an input)
    check_model_first: bool = True  # a `run:` model that does not resolve stops it before a run is made
    alternatives: bool = False  # variants are alternatives: one that fails is recorded, the others go on
    chooser: str | None = None  # the variant that chooses among the alternatives (sees their current runs)

    @property
    def default(self):
        """The section's value when the project file leaves it out."""
        return {} if getattr(self.section, "__origin__", None) is dict else None


def section_variants(name: str) -> Callable[[Any], dict[str, dict]]:
    """Variants of a `name: {VARIANT: {...}}` section: each variant's settings as a dict."""
    def variants(project) -> dict[str, dict]:
        return {variant: cfg.model_dump() for variant, cfg in getattr(project.config, name).items()}
    return variants


def own_model(*keys: str) -> Callable[[Any, dict], str | None]:
    """The first of `keys` a variant sets (its own base, policy or source), else the project's model."""
    def model_of(project, config: dict) -> str | None:
        for key in keys:
            if config.get(key):
                return config[key]
        return project.config.model.name if project.config.model else None
    return model_of
