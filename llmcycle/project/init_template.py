"""The commented `llmcycle.yaml` written by `llmcycle init DIR --task TASK`, generated from the config
classes: every key of every section is written with its description (from the pydantic fields) as a
`#` comment, wrapped to 100 columns. Keys with an example value below are written as real YAML (or
commented out, for the sections and keys a project only sometimes needs); all the other keys are
written commented out with their defaults. The file must load and validate for every task.

Only example values live here; what a key means lives on its config field.
"""
from __future__ import annotations

import json
import re
import textwrap
import types
import typing
from typing import Any, Literal, get_args, get_origin

from pydantic import BaseModel

from llmcycle.data.prompting import DEFAULT_TEMPLATES
from llmcycle.project.config import ProjectConfig, parse_value

WIDTH = 100  # the longest line we aim for
COMMENT_COL = 33  # inline comments line up here when the key and value leave room

# Per task: the use case, the data fields, the headline metric and a model that suits it.
TASK_DEFAULTS = {
    "summarization": dict(use_case="Summarize a dialogue in one or two sentences.",
                          input="dialogue", target="summary", metric="rougeL", threshold=0.35,
                          model="google/flan-t5-base", arch="t5"),
    "qa": dict(use_case="Answer a question from the given context.", input="question",
               target="answer", metric="f1", threshold=0.6, model="google/flan-t5-base", arch="t5"),
    "classification": dict(use_case="Label each text with one of a fixed set of classes.",
                           input="text", target="label", metric="macro_f1", threshold=0.8,
                           model="google/flan-t5-base", arch="t5"),
    "generation": dict(use_case="Continue or answer a prompt in free text.", input="prompt",
                       target="response", metric="rougeL", threshold=0.3,
                       model="HuggingFaceTB/SmolLM2-135M-Instruct", arch="gpt"),
}

HEADER = """\
# llmcycle project file: one file drives the whole lifecycle
#   scope -> select or pretrain -> adapt and align -> evaluate -> optimize -> deploy -> augment
# Every section is optional. `llmcycle run` carries the project through each configured stage;
# each variant of a stage becomes a run in ./runs, compared side by side by `llmcycle runs compare`.
# Any key can be overridden on the command line with its dotted path, e.g.
#   llmcycle run --set pretrain.tiny.lr=5e-4 --set data.seed=1
# Keys written commented out show their defaults (null = unset); uncomment one to set it.
"""

# How to use a section, where its fields' descriptions do not say it (shown under its description).
NOTES = {
    "select": "Then set model.name: run:select/best.",
    "pretrain": "To train your own base model instead of selecting one: uncomment, then point model.name "
                "at run:pretrain/tiny.",
    "tune": "When prompts are not enough.",
    "align": "Train a reward model, then PPO against it (or DPO / ORPO on preference pairs).",
    "augment": "Flags of `llmcycle serve`: --rag-index, --pal.",
}


class Off:
    """An example value written commented out: a key (or a whole section or variant) a project only
    sometimes needs."""

    def __init__(self, value: Any):
        self.value = value


def examples(task: str, name: str) -> dict[str, Any]:
    """Example values per section, in the order the file shows them; sections not listed here follow,
    commented out, before the last one."""

    d = TASK_DEFAULTS[task]
    prompt = DEFAULT_TEMPLATES[task].replace("{input}", "{" + d["input"] + "}")
    return {
        "project": {"name": name, "task": task},
        "scope": {"use_case": d["use_case"], "success_metric": d["metric"],
                  "success_threshold": d["threshold"], "latency_budget_ms": 500, "size_budget_mb": 1000,
                  "require_significant_gain": Off(True), "throughput_tflops": 1.0, "tune_epochs": 3,
                  "lora_r": 8},
        "data": {"train": "data/train.jsonl", "eval": Off("data/eval.jsonl"), "input": d["input"],
                 "target": d["target"], "eval_fraction": 0.1, "seed": 42},
        "model": {"name": d["model"], "dtype": "auto", "device": "auto", "context_window": Off(512)},
        "evaluate": {"template": prompt, "perplexity": True, "show_examples": 3,
                     "generation": {"max_new_tokens": 64, "batch_size": 16,
                                    "no_repeat_ngram_size": Off(3)}},
        "prompt": {"templates": {"default": prompt}, "shots": [0, 1, 3], "selection": ["first", "similar"],
                   "shot_format": "{prompt} {target}", "on_overflow": "drop_shots",
                   "generation": {"greedy": {"max_new_tokens": 64},
                                  "sampled": {"do_sample": True, "temperature": 0.7, "top_k": 50,
                                              "top_p": 0.95, "max_new_tokens": 64}},
                   "limit": 200},
        "select": Off({
            "candidates": {"minilm": {"warm_start": {"encoder": "all-MiniLM-L6-v2", "decoder_layers": 2}},
                           "hub": {"model": d["model"]},
                           "scratch": Off({"run": "pretrain/tiny"}),
                           "hosted": Off({"endpoint": "http://127.0.0.1:8000/v1", "model": "NAME"})},
            "probe": {"method": "full", "steps": 100, "lr": 3e-4, "batch_size": 16},
            "pick": Off("minilm")}),
        "pretrain": Off({"tiny": {
            "architecture": d["arch"], "size": "tiny", "d_model": Off(128), "n_layers": Off(2),
            "n_heads": Off(4), "d_ff": Off(512), "vocab_size": 4000, "seq_len": 256, "packing": True,
            "batch_size": 16, "lr": 1e-3, "warmup_steps": 50, "max_steps": 500, "checkpoint_every": 100,
            "seed": 0}}),
        "tune": Off({"lora": {"method": "lora", "r": 16, "alpha": 32, "target_modules": Off(["q", "v"]),
                              "lr": 1e-4, "batch_size": 8, "epochs": 1, "eval_every": 100,
                              "checkpoint_every": 100}}),
        "align": Off({
            "toxicity": {"method": "reward_classifier", "data": "toxicity.csv", "text_field": "tweet",
                         "label_field": "class", "label_map": {0: "toxic", 1: "toxic", 2: "not_toxic"},
                         "encoder": "all-MiniLM-L6-v2", "epochs": 1, "lr": 5e-5},
            "detox": {"method": "ppo", "policy": "run:tune/lora", "reward": "run:align/toxicity",
                      "reward_label": "not_toxic", "max_steps": 50, "batch_size": 16, "mini_batch_size": 4,
                      "init_kl_coef": 0.2, "lr": 1.41e-5},
            "helpful": Off({"method": "reward_pairwise", "data": "pairs.jsonl", "max_steps": 200}),
            "dpo": Off({"method": "dpo", "data": "pairs.jsonl", "beta": 0.1, "max_steps": 200,
                        "toxicity_model": "run:align/toxicity"}),
            "orpo": Off({"method": "orpo", "data": "pairs.jsonl", "beta": 0.1, "max_steps": 200}),
            "math": Off({"method": "grpo", "max_steps": 200, "group_size": 8, "rewards": {
                "answer": {"kind": "exact_answer"}, "shape": {"kind": "format", "pattern": "####", "weight": 0.2}}}),
            "feedback": Off({"method": "kto", "data": "feedback.jsonl", "desirable": ["up"], "max_steps": 200})}),
        "optimize": Off({
            "int8": {"method": "quantize", "source": "run:tune/lora", "scheme": "int8_dynamic"},
            "student": {"method": "distill", "source": "run:tune/lora", "student": {"preset": "tiny"},
                        "max_steps": 200},
            "sparse": Off({"method": "prune", "structure": "unstructured", "sparsity": 0.5,
                           "recovery_steps": 100}),
            "merged": Off({"method": "export", "source": "run:tune/lora", "format": "hf"})}),
        "augment": Off({"rag": {"index": "index", "k": 5}, "pal": {"enabled": True, "timeout_s": 5.0}}),
    }


# -- reading the config classes ---------------------------------------------------------------------
def _strip_none(ann):
    """`X | None` -> X (and its args); anything else unchanged."""
    args = get_args(ann)
    if type(None) in args and get_origin(ann) in (typing.Union, types.UnionType):
        rest = [a for a in args if a is not type(None)]
        return rest[0] if len(rest) == 1 else typing.Union[tuple(rest)]
    return ann


def _is_model(ann) -> bool:
    return isinstance(ann, type) and issubclass(ann, BaseModel)


def alternatives(ann) -> tuple[str, dict[str, type[BaseModel]]] | None:
    """(discriminator, {tag: class}) of a discriminated union of models
    (`Annotated[A | B, Field(discriminator="method")]`), else None."""
    if get_origin(ann) is not typing.Annotated:
        return None
    union, *meta = get_args(ann)
    key = next((m.discriminator for m in meta if isinstance(getattr(m, "discriminator", None), str)), None)
    members = get_args(union)
    if key is None or not all(_is_model(m) for m in members):
        return None
    return key, {str(tag): m for m in members for tag in get_args(m.model_fields[key].annotation)}


def kind_of(ann) -> tuple[str, Any]:
    """('model', cls) for a nested model, ('variants', cls) for `dict[str, Model]` (cls a tuple of the
    classes for a discriminated union of models: one class per method), else ('value', None)."""
    ann = _strip_none(ann)
    if _is_model(ann):
        return "model", ann
    if get_origin(ann) is dict:
        inner = _strip_none(get_args(ann)[1])
        if _is_model(inner):
            return "variants", inner
        union = alternatives(inner)
        if union is not None:
            return "variants", tuple(dict.fromkeys(union[1].values()))
    return "value", None


def _choices(ann) -> list:
    """The Literal choices a field (or its list items) takes; [] for other types."""
    if get_origin(ann) is Literal:
        return list(get_args(ann))
    return [c for a in get_args(ann) for c in _choices(a)]


def _default(field) -> Any:
    if field.default_factory is not None:
        return field.default_factory()
    return None if field.is_required() else field.default


def models_of(cls: type[BaseModel], seen: set | None = None) -> list[type[BaseModel]]:
    """Every config class reachable from `cls` (itself first), each once."""
    seen = set() if seen is None else seen
    if cls in seen:
        return []
    seen.add(cls)
    found = [cls]
    for field in cls.model_fields.values():
        kind, inner = kind_of(field.annotation)
        for each in inner if isinstance(inner, tuple) else () if inner is None else (inner,):
            found += models_of(each, seen)
    return found


def _plain(ex) -> dict:
    """An example mapping without its Off wrapper."""
    ex = ex.value if isinstance(ex, Off) else ex
    return ex if isinstance(ex, dict) else {}


# -- writing YAML ---------------------------------------------------------------------------------
_PLAIN = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_./@+\- ]*(?<! )")


def _value(v: Any, flow: bool = False) -> str:
    """A value as one line of YAML (flow style for lists and mappings)."""

    if isinstance(v, BaseModel):
        v = v.model_dump(exclude_defaults=True)
    if v is None:
        return "null"
    if isinstance(v, bool):
        return "true" if v else "false"
    if isinstance(v, (int, float)):
        return repr(v)
    if isinstance(v, str):
        plain = _PLAIN.fullmatch(v) or (not flow and re.fullmatch(r"[A-Za-z0-9_][\w./@+\-]*:[\w./@+\-]+", v))
        return v if plain and parse_value(v) == v else json.dumps(v)
    if isinstance(v, (list, tuple)):
        return "[" + ", ".join(_value(x, True) for x in v) + "]"
    if isinstance(v, dict):
        return "{" + ", ".join(f"{_value(k, True)}: {_value(x, True)}" for k, x in v.items()) + "}"
    return json.dumps(str(v))


def _comment(lines: list[str], indent: int, everything: bool = False) -> list[str]:
    """Comment a block out: `# ` after its indentation on every line that is not a comment yet (on every
    line for a whole section, so that removing one `# ` from each line gives the section back)."""
    return [line if line.lstrip().startswith("#") and not everything else line[:indent] + "# " + line[indent:]
            for line in lines]


def _keyed(indent: int, key_line: str, text: str, budget: int) -> list[str]:
    """`key: value` with its description inline when it fits, else wrapped on the lines above."""
    line = " " * indent + key_line
    if not text:
        return [line]
    inline = line.ljust(COMMENT_COL - 1 - (WIDTH - budget)) + " # " + text
    if len(inline) <= budget:
        return [inline]
    wrapped = textwrap.wrap(text, width=max(budget - indent - 2, 40), break_on_hyphens=False)
    return [" " * indent + "# " + chunk for chunk in wrapped] + [line]


def _describe(field, value: Any, shown: bool) -> str:
    """The field's description, its Literal choices (unless it names them all) and its default when the
    value written differs from it."""
    text = (field.description or "").strip()
    choices = _choices(field.annotation)
    if choices and not all(re.search(rf"\b{re.escape(str(c))}\b", text) for c in choices):
        text += f" ({' | '.join(str(c) for c in choices)})"
    if field.is_required():
        text += " (required)"
    elif shown and kind_of(field.annotation)[0] == "value" and value != _default(field):
        text += f" (default: {_value(_default(field))})"
    return text


class _Writer:
    def __init__(self):
        self.seen: set = set()  # classes written in full already
        self.where_full: dict = {}  # class -> the key path where it was written in full

    def model(self, cls, ex: dict, indent: int, budget: int, where: str, shown: dict | None = None) -> list[str]:
        """The keys of one mapping of `cls`: every field the first time the class is written, only the
        example keys after that (with a pointer to where the class was written in full). `shown`: the
        keys written in full for another method of the same section (name -> (description, default)),
        which are not repeated."""
        full = cls not in self.seen
        if full:
            self.seen.add(cls)
            self.where_full[cls] = where
        out: list[str] = []
        for name, field in cls.model_fields.items():
            same = (field.description, repr(_default(field)))
            if name in ex:
                value, active = ex[name], True
                if isinstance(value, Off):
                    value, active = value.value, False
            elif full and shown is not None and shown.get(name) == same:
                continue
            elif full:
                value, active = _default(field), False
                if field.is_required():
                    choices = _choices(field.annotation)
                    value = choices[0] if choices else "..."
            else:
                continue
            if full and shown is not None:
                shown.setdefault(name, same)
            out += self.field(name, field, value, active, indent, budget, f"{where}.{name}")
        return out

    def field(self, name, field, value, active, indent, budget, where, text=None) -> list[str]:
        inner_budget = budget if active else budget - 2
        kind, cls = kind_of(field.annotation)
        text = _describe(field, value, active) if text is None else text
        if kind == "value":
            lines = _keyed(indent, f"{name}: {_value(value)}", text, inner_budget)
        elif kind == "model":
            ex = value if isinstance(value, dict) else {}
            lines = self.block(name, cls, ex, text, indent, inner_budget, where)
        else:  # variants: one mapping per example name
            variants = dict(value) if isinstance(value, dict) and value else {"example": {}}
            union = alternatives(_strip_none(get_args(_strip_none(field.annotation))[1]))
            shown: dict | None = None
            if union is not None:  # one class per method: every method shown, the example's or a stub
                key, classes = union
                shown = {}
                used = {str(_plain(ex).get(key)) for ex in variants.values()}
                variants.update({tag: Off({key: tag}) for tag in classes if tag not in used})
            lines = _keyed(indent, f"{name}:", text, inner_budget)
            for variant, ex in variants.items():
                on = not isinstance(ex, Off)
                ex = ex if on else ex.value
                of = cls if union is None else union[1].get(str(ex.get(union[0])), cls[0])
                block = self.block(variant, of, ex, "", indent + 2, inner_budget - (0 if on else 2),
                                   f"{where}.{variant}", shown)
                lines += block if on else _comment(block, indent + 2)
        return lines if active else _comment(lines, indent)

    def block(self, name, cls, ex, text, indent, budget, where, shown: dict | None = None) -> list[str]:
        """`name:` and the keys of `cls` under it; a class already written in full becomes one flow
        mapping of its example keys when that fits."""
        if cls in self.seen:
            flat = {k: (v.value if isinstance(v, Off) else v) for k, v in ex.items()}
            note = f"keys as in {self.where_full[cls]}"
            text = f"{text}; {note}" if text else note
            if not any(isinstance(v, Off) for v in ex.values()):
                line = _keyed(indent, f"{name}: {_value(flat, True)}", text, budget)
                if len(line[-1]) <= budget:
                    return line
        if shown:  # keys another method of this section has shown already are not repeated
            note = "its other keys as in the variants above"
            text = f"{text}; {note}" if text else note
        return _keyed(indent, f"{name}:", text, budget) + self.model(cls, ex, indent + 2, budget, where, shown)


def render(task: str, name: str) -> str:
    ex = examples(task, name)
    fields = ProjectConfig.model_fields
    order = [s for s in ex if s in fields]
    order[-1:-1] = [s for s in fields if s not in ex]  # a section without examples: commented, before the last
    writer = _Writer()
    parts = [HEADER]
    for section in order:
        field, value = fields[section], ex.get(section, Off({}))
        active = not isinstance(value, Off)
        value = value if active else value.value
        text = (field.description or "").strip()
        text = text[:1].upper() + text[1:].rstrip(".") + "."
        if kind_of(field.annotation)[0] == "variants":
            first = next(iter(value), "example")
            text += f" Each named entry (here `{first}`) is a variant and becomes its own run."
        if section in NOTES:
            text += " " + NOTES[section]
        head = ["# " + chunk for chunk in textwrap.wrap(text, WIDTH - 2, break_on_hyphens=False)]
        # the section itself carries no inline comment: its header line is exactly `section:`
        body = writer.field(section, field, value, True, 0, WIDTH - (0 if active else 2), section, text="")
        body = body if active else _comment(body, 0, everything=True)
        parts.append("\n".join(head + body) + "\n")
    return "\n".join(parts)
