"""Prompts: templates, in-context examples (shots) and fitting prompts into the context window.

One function, `build_prompt`, turns an example into the text a model sees — at evaluation, in the
prompt sweeps, and (later) when building fine-tuning examples — so training and inference never
disagree about the prompt.

A template is a Python format string over the record's fields plus `{input}` (the mapped input
field), e.g. "Summarize the following conversation.\\n\\n{dialogue}\\n\\nSummary:". A shot is written
with `shot_format` (default "{prompt} {target}"), and shots are joined to the query's prompt by
`shot_separator`, as in the course's lab.
"""
from __future__ import annotations

import random
import string
from dataclasses import dataclass

from llmcycle.core.errors import UserError, suggest

DEFAULT_TEMPLATES = {
    "summarization": "Summarize the following conversation.\n\n{input}\n\nSummary:",
    "qa": "Answer the question.\n\n{input}\n\nAnswer:",
    "classification": "Classify the following text.\n\n{input}\n\nLabel:",
    "generation": "{input}",
}
SELECTIONS = ("first", "random", "similar")


def template_fields(template: str) -> list[str]:
    """Field names a template uses, e.g. ['dialogue'] for 'Summarize:\\n{dialogue}'."""
    try:
        return [f.split(".")[0].split("[")[0]
                for _, f, _, _ in string.Formatter().parse(template) if f is not None]
    except ValueError as exc:
        raise UserError(f"template is not a valid format string ({exc}): {template[:60]!r}") from None


def check_template(template: str, name: str, example, extra: tuple[str, ...] = ()) -> None:
    """Every field the template references must exist in the data (checked before any work)."""
    available = ["input", *example.fields, *extra]
    for field in template_fields(template):
        if field == "":
            raise UserError(f"template '{name}' has an empty placeholder {{}}: name the field, e.g. {{input}}")
        if field not in available:
            raise UserError(f"template '{name}' references field '{field}', which the data does not have"
                            f"{suggest(field, available)} (fields: {', '.join(available)})")


def render(template: str, example) -> str:
    values = {k: "" if v is None else v for k, v in example.fields.items()}
    values["input"] = example.input
    return template.format(**values)


def build_prompt(template: str, example, shots=(), shot_format: str = "{prompt} {target}",
                 separator: str = "\n\n\n") -> str:
    """The full prompt: each shot as `shot_format` (its prompt and first reference), then the query."""
    parts = [shot_format.format(prompt=render(template, s), target=s.targets[0] if s.targets else "")
             for s in shots]
    return separator.join(parts + [render(template, example)])


def uses_chat_template(tokenizer, kind: str) -> bool:
    """Chat models (a causal model whose tokenizer has a chat template) get their prompt as a user turn."""
    return kind == "causal" and bool(getattr(tokenizer, "chat_template", None))


def encode_prompt(tokenizer, prompt: str, kind: str) -> list[int]:
    """Token ids of a prompt exactly as the model sees it at inference (chat template when it has one)."""
    if uses_chat_template(tokenizer, kind):
        text = tokenizer.apply_chat_template([{"role": "user", "content": prompt}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its specials
    return tokenizer(prompt, add_special_tokens=True)["input_ids"]


# -- choosing shots -------------------------------------------------------------------------------
def select_shots(method: str, k: int, pool, queries, *, seed: int = 0, embedder=None) -> list[list[int]]:
    """For each query, the indices into `pool` of its k shots, furthest from the query first.

    first: the pool's first k examples for every query; random: k seeded random ones per query;
    similar: the k pool examples whose inputs are most similar by sentence embedding (cosine), the
    most similar placed last, next to the query.
    """
    if k == 0:
        return [[] for _ in queries]
    if k > len(pool):
        raise UserError(f"{k} shots asked for, but only {len(pool)} training examples are available "
                        "to draw them from")
    if method == "first":
        return [list(range(k)) for _ in queries]
    if method == "random":
        rng = random.Random(seed)
        return [rng.sample(range(len(pool)), k) for _ in queries]
    if method == "similar":
        import numpy as np

        if embedder is None:
            raise UserError("shot selection 'similar' needs a sentence embedding model")
        pool_vecs = embedder([e.input for e in pool])
        query_vecs = embedder([q.input for q in queries])
        sims = query_vecs @ pool_vecs.T  # embeddings are normalised: dot product = cosine
        top = np.argsort(-sims, axis=1, kind="stable")[:, :k]
        return [list(reversed(row.tolist())) for row in top]
    raise UserError(f"unknown shot selection '{method}'{suggest(method, SELECTIONS)} "
                    f"(choices: {', '.join(SELECTIONS)})")


@dataclass
class FittedPrompts:
    prompts: list[str]
    shots_used: list[int]
    lost_shots: int  # how many prompts had shots dropped to fit the window
    token_counts: list[int]


def fit_prompts(template: str, queries, pool, shot_lists, count_tokens, budget: int, *,
                shot_format: str, separator: str, on_overflow: str, variant: str) -> FittedPrompts:
    """Build every prompt and make it fit `budget` tokens without ever cutting text.

    Shots are dropped (furthest from the query first) until the prompt fits; with
    on_overflow='refuse' a prompt that needs that refuses the whole variant instead. A prompt that
    does not fit even without shots is an error either way: cutting the input would change the task.
    """
    prompts, used, counts, lost = [], [], [], 0
    for qi, (query, shot_idx) in enumerate(zip(queries, shot_lists)):
        shots = [pool[i] for i in shot_idx]
        while True:
            prompt = build_prompt(template, query, shots, shot_format, separator)
            n = count_tokens(prompt)
            if n <= budget or not shots:
                break
            if on_overflow == "refuse":
                raise UserError(f"variant '{variant}': prompt {qi} ({query.where}) has {n} tokens with "
                                f"{len(shots)} shots, over the budget of {budget} tokens; "
                                "on_overflow is 'refuse' (set it to 'drop_shots' to drop shots instead)")
            shots = shots[1:]
        if n > budget:
            raise UserError(f"variant '{variant}': prompt {qi} ({query.where}) has {n} tokens even "
                            f"without shots, over the budget of {budget} tokens (context window minus "
                            "room to generate); shorten the template or the input, or raise "
                            "model.context_window if the model supports more")
        lost += len(shots) < len(shot_idx)
        prompts.append(prompt)
        used.append(len(shots))
        counts.append(n)
    return FittedPrompts(prompts, used, lost, counts)


