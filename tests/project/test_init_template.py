"""`llmcycle init`'s project file is generated from the config classes: every key of every section is in
it (set, or commented out) with its description, and it validates for every task, each commented-out
section too once uncommented."""
import re

import pytest

from llmcycle.project.config import TASKS, ProjectConfig, load_project, parse_value
from llmcycle.project.init_template import WIDTH, kind_of, models_of, render


def _reachable() -> dict[type, list[tuple]]:
    """Every config class reachable from ProjectConfig -> the key paths it sits at ('*': a variant name)."""
    found: dict[type, list[tuple]] = {}

    def walk(cls, path):
        if path in found.setdefault(cls, []):
            return
        found[cls].append(path)
        for name, field in cls.model_fields.items():
            kind, inner = kind_of(field.annotation)
            if kind == "model":
                walk(inner, path + (name,))
            elif kind == "variants":  # one class, or one per method (a discriminated union)
                for each in inner if isinstance(inner, tuple) else (inner,):
                    walk(each, path + (name, "*"))

    walk(ProjectConfig, ())
    return found


def _key_paths(text: str) -> set[tuple]:
    """The key paths of a generated file with every comment marker before a key taken away, so that set
    and commented-out keys both count (keys of one-line flow mappings included)."""
    paths: set[tuple] = set()
    stack: list[tuple[int, str]] = []

    def add_flow(path, value):
        if isinstance(value, dict):
            for k, v in value.items():
                paths.add(path + (str(k),))
                add_flow(path + (str(k),), v)

    for line in text.splitlines():
        while (m := re.match(r"( *)# ?", line)) and line.strip() != "#":
            line = m.group(1) + line[m.end():]
        m = re.match(r"( *)([A-Za-z_]\w*):(?: (.*))?$", line)
        if not m:
            continue
        indent, key = len(m.group(1)), m.group(2)
        while stack and stack[-1][0] >= indent:
            stack.pop()
        path = tuple(k for _, k in stack) + (key,)
        paths.add(path)
        stack.append((indent, key))
        if m.group(3) and m.group(3).lstrip().startswith("{"):
            add_flow(path, parse_value(m.group(3)))
    return paths


def _matches(pattern: tuple, path: tuple) -> bool:
    return len(pattern) == len(path) and all(p in ("*", k) for p, k in zip(pattern, path))


@pytest.mark.parametrize("task", TASKS)
def test_every_field_of_every_config_class_is_in_the_init_file_with_its_description(task):
    text = render(task, "proj")
    paths = _key_paths(text)
    flat = re.sub(r"[#\s]+", " ", text)
    reachable = _reachable()
    assert set(reachable) == set(models_of(ProjectConfig))
    missing, undescribed = [], []
    for cls, where in reachable.items():
        for name, field in cls.model_fields.items():
            if not any(_matches(p + (name,), path) for p in where for path in paths):
                missing.append(f"{cls.__name__}.{name} (at {'.'.join(where[0] + (name,)) or name})")
            description = re.sub(r"[#\s]+", " ", field.description or "").strip()
            if not description or (cls is not ProjectConfig and description not in flat):
                undescribed.append(f"{cls.__name__}.{name}")
    assert not missing, f"keys not in the init file: {missing}"
    assert not undescribed, f"fields without their description in the init file: {undescribed}"
    assert all(len(line) <= WIDTH for line in text.splitlines())


@pytest.mark.parametrize("task", TASKS)
def test_init_file_and_each_commented_section_validate(tmp_path, task):
    text = render(task, "proj")
    path = tmp_path / "llmcycle.yaml"
    path.write_text(text)
    cfg = load_project(path).config
    assert cfg.project.task == task and cfg.project.name == "proj" and cfg.model.name
    assert cfg.data.input and cfg.scope.success_metric and cfg.prompt.templates
    lines = text.splitlines()
    commented = [s for s in ProjectConfig.model_fields if f"# {s}:" in lines]
    assert {"select", "pretrain", "tune", "align", "optimize", "augment"} <= set(commented)
    for section in commented:
        start = lines.index(f"# {section}:")
        end = next((i for i in range(start, len(lines)) if not lines[i]), len(lines))
        block = [line[2:] if line.startswith("# ") else line for line in lines[start:end]]
        path.write_text("\n".join(lines[:start] + block + lines[end:]) + "\n")
        assert getattr(load_project(path).config, section), section


def test_init_examples_differ_by_task():
    texts = {task: render(task, "proj") for task in TASKS}
    assert "input: dialogue" in texts["summarization"] and "input: question" in texts["qa"]
    assert "success_metric: macro_f1" in texts["classification"]
    assert "architecture: gpt" in texts["generation"] and "architecture: t5" in texts["qa"]
    assert '{dialogue}' in texts["summarization"] and "{input}" not in texts["summarization"].split(
        "template:")[1].splitlines()[0]
