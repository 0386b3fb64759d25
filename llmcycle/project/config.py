"""The project file, `llmcycle.yaml`: load it, apply `--set` overrides, validate it with typed models.

Every stage section is optional. A stage section maps variant names to that stage's config (each
variant becomes a run), so the override key `pretrain.tiny.lr` is exactly the YAML path. Errors name
the dotted key and its line in the file: unknown keys come with the nearest valid key; wrong types or
ranges with what was expected and what was given.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import Field, ValidationError, create_model

from llmcycle.augment.config import AugmentConfig
from llmcycle.core.configbase import PROJECT_FILE, Section, describe_error
from llmcycle.core.errors import UserError, suggest
from llmcycle.core.store import RunStore
from llmcycle.data.records import DataConfig
from llmcycle.evaluation.settings import EvaluateConfig
from llmcycle.models.hub import ModelConfig
from llmcycle.stages import registry

TASKS = ("summarization", "qa", "classification", "generation")


class ProjectInfo(Section):
    name: str = Field("llmcycle-project", description="A name for the use case.")
    task: Literal["summarization", "qa", "classification", "generation"] = Field(
        "summarization", description="The task; it picks the headline metric and default prompts.")


# The project file's sections: these shared ones, then one per stage in lifecycle order (each stage
# says its section's type in its Stage; stages/registry.py lists them).
SHARED_SECTIONS = {
    "project": (ProjectInfo, Field(default_factory=ProjectInfo,
                                   description="The use case: its name and its task.")),
    "data": (DataConfig | None, Field(None, description="The task's data: where the train and eval records "
                                      "are, and which fields hold the input and the reference.")),
    "model": (ModelConfig | None, Field(None, description="The base model every stage works on unless a "
                                        "variant names its own.")),
    "evaluate": (EvaluateConfig | None, Field(None, description="How every evaluating stage prompts, "
                                              "generates and scores.")),
    "augment": (AugmentConfig | None, Field(None, description="What `llmcycle serve` answers chat "
                                            "completions with besides the model: RAG, PAL.")),
}
ProjectConfig = create_model(
    "ProjectConfig", __base__=Section,
    **SHARED_SECTIONS,
    **{s.name: (s.section, Field(default_factory=dict, description=s.summary) if s.default == {}
                else Field(None, description=s.summary)) for s in registry.STAGES})


class Project:
    """A validated project: its config, the folder it lives in, and the raw (resolved) dict."""

    def __init__(self, config: ProjectConfig, path: Path, raw: dict):
        self.config = config
        self.path = path
        self.dir = path.parent
        self.raw = raw

    def store(self):
        return RunStore.for_project(self.dir)


# -- YAML with YAML 1.2 numbers ------------------------------------------------------------------
class _Loader(yaml.SafeLoader):
    """PyYAML follows YAML 1.1, where `1e-5` (no dot) is a string; YAML 1.2 and users say it's a
    number. Re-register the float resolver with the 1.2 pattern."""


_FLOAT = re.compile(r"""^(?:[-+]?(?:[0-9][0-9_]*)\.[0-9_]*(?:[eE][-+]?[0-9]+)?
    |[-+]?(?:[0-9][0-9_]*)(?:[eE][-+]?[0-9]+)
    |\.[0-9_]+(?:[eE][-+]?[0-9]+)?
    |[-+]?\.(?:inf|Inf|INF)
    |\.(?:nan|NaN|NAN))$""", re.X)
_Loader.yaml_implicit_resolvers = {k: [r for r in v if r[0] != "tag:yaml.org,2002:float"]
                                   for k, v in _Loader.yaml_implicit_resolvers.copy().items()}
_Loader.add_implicit_resolver("tag:yaml.org,2002:float", _FLOAT, list("-+0123456789."))


def parse_yaml(text: str, source: str) -> tuple[Any, dict[str, int]]:
    """The document and a map from dotted key path to its 1-based line number."""
    try:
        data = yaml.load(text, Loader=_Loader)
        node = yaml.compose(text, Loader=_Loader)
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f"{source}:{mark.line + 1}" if mark else source
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise UserError(f"{where}: invalid YAML: {problem}") from None
    lines: dict[str, int] = {}

    def walk(n, prefix):
        if isinstance(n, yaml.MappingNode):
            for key, value in n.value:
                path = f"{prefix}.{key.value}" if prefix else str(key.value)
                if path in lines and key.value != "<<":  # PyYAML keeps the last value silently
                    raise UserError(f"{source}:{key.start_mark.line + 1}: duplicate key '{path}' (first on "
                                    f"line {lines[path]}); keep one of them")
                lines[path] = key.start_mark.line + 1
                walk(value, path)
        elif isinstance(n, yaml.SequenceNode):
            for i, item in enumerate(n.value):
                lines[f"{prefix}.{i}"] = item.start_mark.line + 1
                walk(item, f"{prefix}.{i}")

    walk(node, "")
    return data, lines


def parse_value(text: str) -> Any:
    """An override's value, parsed like YAML (so `2e-4` is a number and `[q, v]` a list)."""
    try:
        return yaml.load(text, Loader=_Loader) if text.strip() else ""
    except yaml.YAMLError:
        return text


def apply_overrides(data: dict, overrides: list[str]) -> dict:
    """Apply `a.b.c=value` overrides in place; intermediate mappings are created as needed."""
    for item in overrides:
        if "=" not in item:
            raise UserError(f"--set '{item}': expected KEY=VALUE, e.g. --set pretrain.tiny.lr=2e-4")
        key, value = item.split("=", 1)
        parts = key.strip().split(".")
        if not all(parts):
            raise UserError(f"--set '{item}': empty part in key '{key}'")
        node = data
        for i, part in enumerate(parts[:-1]):
            child = node.get(part)
            if child is None:
                child = node[part] = {}
            if not isinstance(child, dict):
                raise UserError(f"--set '{item}': '{'.'.join(parts[:i + 1])}' is not a section")
            node = child
        node[parts[-1]] = parse_value(value)
    return data


# -- validation errors -> one line ----------------------------------------------------------------
def _unwrap(ann):
    """`X | None` -> X."""
    from typing import get_args

    args = [a for a in get_args(ann) if a is not type(None)]
    return args[0] if type(None) in get_args(ann) and len(args) == 1 else ann


def _alternatives(ann) -> dict[str, type] | None:
    """{tag: class} of a discriminated union (`Annotated[A | B, Field(discriminator=...)]`), else None."""
    from typing import Annotated, get_args, get_origin

    if get_origin(ann) is not Annotated:
        return None
    union, *meta = get_args(ann)
    key = next((m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)), None)
    if key is None:
        return None
    out = {}
    for cls in get_args(union):
        for tag in get_args(cls.model_fields[key].annotation):
            out[str(tag)] = cls
    return out


def _walk(loc: tuple) -> tuple[tuple, type | None, dict[str, type] | None]:
    """Follow pydantic's error `loc` through the config classes: (the loc without the union tags a
    discriminated union adds, e.g. ('align', 'v', 'ppo', 'lr') -> ('align', 'v', 'lr'); the Section class
    owning the last key, or None; the union's {tag: class} when that owner is one of its alternatives)."""
    from typing import get_args, get_origin

    clean: list = []
    ann, owner, alternatives = ProjectConfig, None, None
    for part in loc:
        union = _alternatives(ann)
        if union is not None and part in union:  # the tag: not a key of the file
            ann, alternatives = union[part], union
            continue
        clean.append(part)
        if isinstance(ann, type) and issubclass(ann, Section):
            owner = ann
            field = ann.model_fields.get(part)
            ann = _unwrap(field.annotation) if field is not None else None
            if alternatives and owner not in alternatives.values():  # a nested section of a variant
                alternatives = None
        elif get_origin(ann) is dict:  # a map of variants: this level is a free name
            owner, alternatives, ann = None, None, _unwrap(get_args(ann)[1])
        else:
            owner, alternatives, ann = None, None, None
    return tuple(clean), owner, alternatives


def _choices_text(tags: list[str]) -> str:
    quoted = [f"'{t}'" for t in tags]
    return quoted[0] if len(quoted) == 1 else ", ".join(quoted[:-1]) + " or " + quoted[-1]


def format_validation_error(exc: ValidationError, source: str, lines: dict[str, int]) -> str:
    # a misspelt key also makes its correct spelling "missing": name the misspelling, which says both
    err = next((e for e in exc.errors() if e["type"] == "extra_forbidden"), exc.errors()[0])
    raw = tuple(str(p) for p in err["loc"] if not (isinstance(p, str) and "[" in p))
    loc, owner, alternatives = _walk(raw)
    if err["type"] in ("union_tag_invalid", "union_tag_not_found"):  # the variant's `method` picks its class
        loc += (str(err.get("ctx", {}).get("discriminator", "method")).strip("'"),)
    dotted = ".".join(loc)
    line = None
    for n in range(len(loc), 0, -1):
        line = lines.get(".".join(loc[:n]))
        if line:
            break
    where = f"{source}:{line}" if line else source
    more = f" (and {len(exc.errors()) - 1} more problem(s))" if len(exc.errors()) > 1 else ""
    if err["type"] == "extra_forbidden":
        valid = list(owner.model_fields) if owner else []
        hint = suggest(loc[-1], valid)
        others = [tag for tag, cls in (alternatives or {}).items() if loc[-1] in cls.model_fields]
        if others and owner is not None:  # a key of another method: say whose it is
            mine = next(tag for tag, cls in alternatives.items() if cls is owner)
            return (f"{where}: key '{dotted}': '{loc[-1]}' applies to method {' / '.join(others)}, not "
                    f"{mine}{hint}{more}")
        if not hint and valid:
            hint = f" (valid keys: {', '.join(valid)})"
        return f"{where}: unknown key '{dotted}'{hint}{more}"
    if err["type"] == "union_tag_invalid":
        tags = [t.strip().strip("'") for t in str(err["ctx"]["expected_tags"]).split(",")]
        return f"{where}: key '{dotted}': expected one of {_choices_text(tags)}, got {err['ctx']['tag']!r}{more}"
    if err["type"] == "union_tag_not_found":
        return f"{where}: key '{dotted}': is required but missing{more}"
    if err["type"] == "model_attributes_type":  # a variant that is not a mapping
        err = {**err, "type": "model_type"}
    return f"{where}: key '{dotted}': {describe_error(err)}{more}"


def validate(data: Any, source: str = PROJECT_FILE, lines: dict[str, int] | None = None) -> ProjectConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise UserError(f"{source}: the project file must be a mapping of sections, got {type(data).__name__}")
    try:
        return ProjectConfig.model_validate(data)
    except ValidationError as exc:
        raise UserError(format_validation_error(exc, source, lines or {})) from None


def load_project(path: str | Path = PROJECT_FILE, overrides: list[str] | None = None) -> Project:
    """Read, override and validate a project file."""
    path = Path(path)
    if path.is_dir():
        path = path / PROJECT_FILE
    if not path.exists():
        raise UserError(f"project file not found: {path} (create one with `llmcycle init DIR`, "
                        "or pass -p PATH)")
    try:
        text = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise UserError(f"{path}: cannot read the project file: {exc}") from None
    data, lines = parse_yaml(text, str(path))
    data = {} if data is None else data
    if not isinstance(data, dict):
        raise UserError(f"{path}: the project file must be a mapping of sections")
    if not data and not overrides:
        raise UserError(f"{path}: the project file is empty; it needs a `project:` section (name, task) and "
                        "`data:` (train, eval) at least (`llmcycle init DIR` writes a commented one)")
    apply_overrides(data, overrides or [])
    config = validate(data, str(path), lines)
    return Project(config, path.resolve(), data)
