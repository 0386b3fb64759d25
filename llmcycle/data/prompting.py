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
import re
import string
from dataclasses import dataclass, field

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
    for name_used in template_fields(template):
        if name_used == "":
            raise UserError(f"template '{name}' has an empty placeholder {{}}: name the field, e.g. {{input}}")
        if name_used not in available:
            raise UserError(f"template '{name}' references field '{name_used}', which the data does not have"
                            f"{suggest(name_used, available)} (fields: {', '.join(available)})")


def renders_template(template: str, text: str) -> bool:
    """Whether `text` already is a rendering of `template` (its fixed text around anything): a client
    that sends the finished prompt must not get the template twice."""
    pattern = "".join(re.escape(literal) + ("(.*)" if name is not None else "")
                      for literal, name, _, _ in string.Formatter().parse(template))
    return re.fullmatch(pattern, text, flags=re.DOTALL) is not None


def render(template: str, example) -> str:
    values = {k: "" if v is None else v for k, v in example.fields.items()}
    values["input"] = example.input
    return template.format(**values)


class Prompt(str):
    """A prompt: its flat text (what a model without a chat template reads, what reports show), carrying
    the chat turns it was built from (what a chat model reads through its template). A str subclass so
    that every place that only shows, stores or counts prompts keeps working on the text."""

    def __new__(cls, text: str, messages):
        obj = super().__new__(cls, text)
        obj.messages = tuple(dict(m) for m in messages)
        return obj

    def __getnewargs__(self):  # pickling (data loader workers, torchrun) keeps the turns
        return str(self), self.messages


def flat_history(turns) -> str:
    """Earlier turns of a conversation as text, for models without a chat template."""
    return "\n".join(f"{t['role'].capitalize()}: {t['content']}" for t in turns)


def assemble(query: str, *, system: str | None = None, shots=(), history=(), shot_format: str = "{prompt} {target}",
             separator: str = "\n\n\n") -> Prompt:
    """THE function that builds a model's input: (system, shots, earlier turns, the templated query).

    Chat models get the shots as earlier user/assistant turns and the query as the last user turn;
    models without a chat template get flat text: the system prompt, each shot written with
    `shot_format`, the earlier turns as "Role: text" lines, then the query, joined by `separator`."""
    shots = [(user, answer) for user, answer in shots]
    messages = [{"role": "system", "content": system}] if system else []
    for user, answer in shots:
        messages += [{"role": "user", "content": user}, {"role": "assistant", "content": answer}]
    messages += [dict(t) for t in history] + [{"role": "user", "content": query}]
    parts = [shot_format.format(prompt=user, target=answer) for user, answer in shots]
    parts += [flat_history(history)] if history else []
    text = separator.join(parts + [query])
    return Prompt(f"{system}\n\n{text}" if system else text, messages)


def build_prompt(template: str, example, shots=(), shot_format: str = "{prompt} {target}",
                 separator: str = "\n\n\n", system: str | None = None) -> Prompt:
    """An example's prompt: the template rendered on it (for a conversation, on its last user turn),
    after its earlier turns and the shots (each its rendered prompt and first reference). A system
    prompt in the record (a conversation's own) wins over the project's."""
    pairs = [(render(template, s), s.targets[0] if s.targets else "") for s in shots]
    return assemble(render(template, example), system=getattr(example, "system", None) or system, shots=pairs,
                    history=getattr(example, "history", ()), shot_format=shot_format, separator=separator)


def uses_chat_template(tokenizer, kind: str) -> bool:
    """Chat models (a causal model whose tokenizer has a chat template) get their prompt as turns."""
    return kind == "causal" and bool(getattr(tokenizer, "chat_template", None))


def messages_of(prompt) -> list[dict]:
    """The chat turns of a prompt; a plain string is one user turn."""
    return list(getattr(prompt, "messages", None) or [{"role": "user", "content": str(prompt)}])


def apply_template(tokenizer, messages, generation_prompt: bool) -> str:
    try:
        return tokenizer.apply_chat_template(list(messages), tokenize=False, add_generation_prompt=generation_prompt)
    except Exception as exc:  # noqa: BLE001 - jinja raises TemplateError and others for turns it refuses
        roles = ", ".join(m["role"] for m in messages)
        raise UserError(f"the model's chat template refused a conversation with roles {roles}: {exc} "
                        "(a template without a system role needs evaluate.system unset)") from None


def encode_prompt(tokenizer, prompt, kind: str) -> list[int]:
    """Token ids of a prompt exactly as the model sees it at inference (chat template when it has one)."""
    if uses_chat_template(tokenizer, kind):
        text = apply_template(tokenizer, messages_of(prompt), generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]  # the template has its specials
    return tokenizer(str(prompt), add_special_tokens=True)["input_ids"]


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
    prompts: list[Prompt]
    shots_used: list[int]
    lost_shots: int  # how many prompts had shots dropped to fit the window
    token_counts: list[int]
    kept: list[int] = field(default_factory=list)  # indices of the queries whose prompt fits
    skipped: list[str] = field(default_factory=list)  # where each query that does not fit even alone came from

    def examples(self, queries) -> list:
        """The queries that were kept, in order, matching `prompts`."""
        return [queries[i] for i in self.kept]


def fit_prompts(template: str, queries, pool, shot_lists, count_tokens, budget: int, *,
                shot_format: str = "{prompt} {target}", separator: str = "\n\n\n", on_overflow: str = "drop_shots",
                too_long: str = "skip", variant: str, system: str | None = None) -> FittedPrompts:
    """Build every prompt and make it fit `budget` tokens without ever cutting text.

    Shots are dropped (furthest from the query first) until the prompt fits; with
    on_overflow='refuse' a prompt that needs that refuses the whole variant instead. A query that
    does not fit even without shots is skipped and counted (too_long='skip'; its where is listed)
    or refuses the variant (too_long='refuse'): cutting the input would change the task.
    """
    out = FittedPrompts([], [], 0, [])
    for qi, (query, shot_idx) in enumerate(zip(queries, shot_lists)):
        shots = [pool[i] for i in shot_idx]
        while True:
            prompt = build_prompt(template, query, shots, shot_format, separator, system=system)
            n = count_tokens(prompt)
            if n <= budget or not shots:
                break
            if on_overflow == "refuse":
                raise UserError(f"variant '{variant}': prompt {qi} ({query.where}) has {n} tokens with "
                                f"{len(shots)} shots, over the budget of {budget} tokens; "
                                "on_overflow is 'refuse' (set it to 'drop_shots' to drop shots instead)")
            shots = shots[1:]
        if n > budget:
            if too_long == "refuse":
                raise UserError(f"variant '{variant}': prompt {qi} ({query.where}) has {n} tokens even "
                                f"without shots, over the budget of {budget} tokens (context window minus "
                                "room to generate); shorten the template or the input, raise "
                                "model.context_window if the model supports more, or set "
                                "evaluate.on_overflow: skip to leave such examples out")
            out.skipped.append(query.where)
            continue
        out.lost_shots += len(shots) < len(shot_idx)
        out.prompts.append(prompt)
        out.shots_used.append(len(shots))
        out.token_counts.append(n)
        out.kept.append(qi)
    return out
