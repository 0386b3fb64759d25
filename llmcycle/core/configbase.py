"""The base every project-file section derives from: unknown keys are errors, types are checked."""
from __future__ import annotations

from pydantic import BaseModel, ConfigDict

PROJECT_FILE = "llmcycle.yaml"  # the project file's name (`--project DIR` looks for it there)


class Section(BaseModel):
    """A section of llmcycle.yaml. Unknown keys are rejected (with the nearest valid key suggested by
    llmcycle.project.config); values are validated, not silently coerced into something else."""

    model_config = ConfigDict(extra="forbid", validate_assignment=True, protected_namespaces=())


def describe_error(err: dict) -> str:
    """One pydantic validation error in words: what was expected and what was given (used by the
    project file, generation settings and the server's request checks alike)."""
    kind, ctx = err["type"], err.get("ctx") or {}
    given = err.get("input")
    given_text = repr(given) if not isinstance(given, dict) else "a mapping"
    expected = {
        "float_parsing": "a number", "float_type": "a number", "int_parsing": "an integer",
        "int_type": "an integer", "int_from_float": "an integer", "bool_parsing": "true or false",
        "bool_type": "true or false", "string_type": "a string", "dict_type": "a mapping",
        "model_type": "a mapping", "list_type": "a list",
    }.get(kind)
    if kind in ("greater_than", "greater_than_equal", "less_than", "less_than_equal"):
        op = {"greater_than": ">", "greater_than_equal": ">=", "less_than": "<",
              "less_than_equal": "<="}[kind]
        bound = next(iter(ctx.values()))
        bound = f"{bound:g}" if isinstance(bound, (int, float)) else bound
        expected = f"a value {op} {bound}"
    elif kind == "literal_error":
        expected = "one of " + str(ctx.get("expected", ""))
    elif kind == "missing":
        return "is required but missing"
    elif expected is None:
        return err["msg"].replace("Value error, ", "")
    return f"expected {expected}, got {given_text}"
