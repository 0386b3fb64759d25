"""The project file: YAML 1.2 numbers, overrides, unknown keys, types and ranges, init templates."""
import pytest

from llmcycle.project.config import TASKS, apply_overrides, load_project, parse_yaml
from llmcycle.core.errors import UserError
from llmcycle.project.init_template import render

BASE = """\
project:
  name: demo
  task: summarization
data:
  train: data/train.jsonl
  input: dialogue
  target: summary
model:
  name: run:pretrain/tiny
pretrain:
  tiny:
    architecture: t5
    lr: 1e-3
    max_steps: 10
"""


def write(tmp_path, text=BASE):
    path = tmp_path / "llmcycle.yaml"
    path.write_text(text)
    return path


def test_valid_project_loads_with_variants_and_numbers(tmp_path):
    project = load_project(write(tmp_path))
    cfg = project.config
    assert cfg.project.task == "summarization"
    assert list(cfg.pretrain) == ["tiny"]
    assert cfg.pretrain["tiny"].lr == pytest.approx(1e-3)  # `1e-3` is a number, not a string
    assert project.dir == tmp_path.resolve()


def test_yaml_1_2_floats():
    data, lines = parse_yaml("a: 1e-5\nb: -2E+3\nc: 1.5\nd: 7\ne: .5\nf: version1e5\n", "x.yaml")
    assert data == {"a": 1e-5, "b": -2000.0, "c": 1.5, "d": 7, "e": 0.5, "f": "version1e5"}
    assert lines["c"] == 3


def test_every_section_is_optional(tmp_path):
    project = load_project(write(tmp_path, "project:\n  name: x\n"))
    assert project.config.data is None and project.config.pretrain == {}
    assert load_project(write(tmp_path, "project: {name: x}\n")).config.model is None


def test_set_overrides_dotted_keys_with_typed_values(tmp_path):
    project = load_project(write(tmp_path), ["pretrain.tiny.lr=2e-4", "pretrain.small.max_steps=5",
                                             "data.target=[summary, summary2]"])
    assert project.config.pretrain["tiny"].lr == pytest.approx(2e-4)
    assert project.config.pretrain["small"].max_steps == 5
    assert project.config.data.target == ["summary", "summary2"]


def test_unknown_key_names_path_line_and_nearest_key(tmp_path):
    text = BASE.replace("    lr: 1e-3", "    lrr: 1e-3")
    with pytest.raises(UserError) as exc:
        load_project(write(tmp_path, text))
    msg = str(exc.value)
    assert "unknown key 'pretrain.tiny.lrr'" in msg and "did you mean 'lr'" in msg
    assert "llmcycle.yaml:13" in msg


def test_unknown_top_level_section(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'modle'.*did you mean 'model'"):
        load_project(write(tmp_path, "modle:\n  name: x\n"))


def test_unknown_key_from_override(tmp_path):
    with pytest.raises(UserError, match=r"unknown key 'data.inptu'.*'input'"):
        load_project(write(tmp_path), ["data.inptu=text"])


def test_wrong_type_says_expected_and_given(tmp_path):
    with pytest.raises(UserError) as exc:
        load_project(write(tmp_path), ["pretrain.tiny.lr=fast"])
    msg = str(exc.value)
    assert "key 'pretrain.tiny.lr'" in msg and "a number" in msg and "'fast'" in msg


def test_out_of_range_says_bound(tmp_path):
    with pytest.raises(UserError, match=r"pretrain.tiny.lr': expected a value > 0, got -1"):
        load_project(write(tmp_path), ["pretrain.tiny.lr=-1"])
    with pytest.raises(UserError, match=r"data.eval_fraction': expected a value < 1"):
        load_project(write(tmp_path), ["data.eval_fraction=1.5"])


def test_bad_literal_lists_choices(tmp_path):
    with pytest.raises(UserError, match=r"project.task': expected one of .*summarization"):
        load_project(write(tmp_path), ["project.task=translate"])


def test_missing_file_and_bad_yaml(tmp_path):
    with pytest.raises(UserError, match="project file not found"):
        load_project(tmp_path / "nope.yaml")
    with pytest.raises(UserError, match=r"llmcycle.yaml:2: invalid YAML"):
        load_project(write(tmp_path, "a: 1\n b: [\n"))


def test_an_empty_project_file_says_what_it_needs(tmp_path):
    with pytest.raises(UserError, match=r"llmcycle.yaml: the project file is empty; it needs a `project:`"):
        load_project(write(tmp_path, "# nothing yet\n"))


def test_duplicate_keys_name_both_lines(tmp_path):
    text = "project:\n  name: x\n  task: summarization\n  task: qa\n"
    with pytest.raises(UserError, match=r"llmcycle.yaml:4: duplicate key 'project.task' \(first on line 3\)"):
        load_project(write(tmp_path, text))


def test_malformed_override():
    with pytest.raises(UserError, match="expected KEY=VALUE"):
        apply_overrides({}, ["pretrain.tiny.lr"])


@pytest.mark.parametrize("task", TASKS)
def test_init_templates_validate_and_are_commented(tmp_path, task):
    text = render(task, "proj")
    path = write(tmp_path, text)
    cfg = load_project(path).config
    assert cfg.project.task == task
    assert sum(1 for line in text.splitlines() if "#" in line) > 20
    # the commented-out pretrain section validates too once uncommented
    head, rest = text.split("# pretrain:")
    block, tail = rest.split("\n\n", 1)  # the pretrain block ends at the blank line (tune, align follow)
    uncommented = (head + "pretrain:" + "\n".join(line.replace("# ", "", 1) for line in block.splitlines())
                   + "\n\n" + tail)
    assert load_project(write(tmp_path, uncommented)).config.pretrain


def test_every_example_project_validates():
    from pathlib import Path

    examples = sorted((Path(__file__).parents[2] / "examples").glob("*/llmcycle.yaml"))
    assert len(examples) >= 2
    for path in examples:
        assert load_project(path).config.project.name


def test_augment_section_is_typed_and_the_init_template_block_validates(tmp_path):
    cfg = load_project(write(tmp_path, "augment:\n  rag: {index: idx, k: 3}\n  pal: {timeout_s: 2}\n")).config
    assert (cfg.augment.rag.index, cfg.augment.rag.k, cfg.augment.pal.enabled) == ("idx", 3, True)
    for text, needle in (("augment: {rag: {indx: idx}}", r"unknown key 'augment.rag.indx' \(did you mean 'index'"),
                         ("augment: {rga: {index: idx}}", r"unknown key 'augment.rga' \(did you mean 'rag'"),
                         ("augment: {pal: {timeout_s: 0}}", r"key 'augment.pal.timeout_s': expected a value > 0"),
                         ("augment: {rag: {k: 3}}", r"key 'augment.rag.index': is required")):
        with pytest.raises(UserError, match=needle):
            load_project(write(tmp_path, text))
    text = render("qa", "proj")
    head, block = text.split("# augment:")
    uncommented = head + "augment:\n" + "\n".join(line.replace("# ", "", 1) for line in block.splitlines()[1:])
    assert load_project(write(tmp_path, uncommented)).config.augment.pal.timeout_s == 5
