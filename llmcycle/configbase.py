"""The base every project-file section derives from: unknown keys are errors, types are checked."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict


class Section(BaseModel):
    """A section of llmcycle.yaml. Unknown keys are rejected (with the nearest valid key suggested by
    llmcycle.config); values are validated, not silently coerced into something else."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())
