"""Retrieval-augmented answers: retrieve chunks, fit them into the context window, answer with citations.

    from llmcycle.evaluation import harness
    from llmcycle.augment import rag
    from llmcycle.augment.index import Index

    index = Index.load("rag-index")                       # built by rag_index.build_index
    result = rag.answer("How long is the warranty?", index, harness.load("run:tune/lora"), k=5)
    print(result.text)                                    # "... two years [1]."
    print(rag.format_sources(result))                     # [1] /docs/warranty.md:120-980 (score 0.71)

The prompt numbers the retrieved chunks [1], [2], ... best first and asks the model to cite them. When
the passages do not fit the model's context window (minus the room to generate), the lowest-ranked
chunks are dropped whole, never cut, and `Answer.dropped` says how many. `Answer.used` lists the
citation numbers the answer actually cites; `Answer.unknown_citations` the numbers it cites that match
no passage (a made-up [7] of five).

The model is an llmcycle LoadedModel (harness.load: its tokenizer counts tokens, its Generator
generates) or a plain `generate_fn(prompt) -> str` together with `window` and `count_tokens`.

Evaluation: `evaluate_retrieval` gives recall@k and MRR on questions with gold sources or passages;
`evaluate_answers` scores answers (exact match, F1, ROUGE via llmcycle.evaluation.metrics) with and without
retrieval, side by side.
"""
from __future__ import annotations

import re
import string
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError
from llmcycle.evaluation import harness, metrics
from llmcycle.models.generation import GenerationConfig

DEFAULT_TEMPLATE = ("Answer the question using only the numbered passages below. Cite the passages you "
                    "use by their numbers in square brackets, like [1]. If the passages do not contain "
                    "the answer, say that you do not know.\n\n{passages}\n\nQuestion: {question}\nAnswer:")
PASSAGE_FORMAT = "[{number}] {text}"
PASSAGE_SEPARATOR = "\n\n"
CLOSED_BOOK_TEMPLATE = "Answer the question.\n\nQuestion: {question}\nAnswer:"
_CITATION = re.compile(r"\[(\d+(?:\s*[,;]\s*\d+)*)\]")  # [1], [2, 3], [1;4]


@dataclass
class Citation:
    number: int  # as in the prompt and the answer: [number]
    source: str
    start: int  # character span in the source document's text
    end: int
    score: float  # retrieval similarity
    chunk_id: int
    chunk_number: int
    text: str

    @classmethod
    def of(cls, number: int, hit) -> "Citation":
        """Citation [number] for a search hit (rag_index.Hit)."""
        c = hit.chunk
        return cls(number, c.source, c.start, c.end, hit.score, c.id, c.number, c.text)

    def to_api(self) -> dict:
        """As the server and the agent's transcript give it: `n` is the number cited as [n]."""
        data = asdict(self)
        return {"n": data.pop("number"), **data}


@dataclass
class Answer:
    question: str
    text: str
    citations: list[Citation]  # the passages the model saw, numbered from 1, best first
    used: list[int]  # citation numbers the answer cites, in order of first mention
    unknown_citations: list[int]  # numbers cited that match no passage
    dropped: int  # retrieved chunks left out (lowest-ranked first) so the prompt fits the window
    retrieved: int  # chunks retrieved before fitting
    prompt: str
    prompt_tokens: int

    def to_dict(self) -> dict:
        return asdict(self)


@dataclass
class Assembled:
    prompt: str
    hits: list  # the hits kept, best first; hit i is citation [i + 1]
    dropped: int
    tokens: int


@dataclass
class _Model:
    generate: Callable[[list[str]], list[str]]
    count_tokens: Callable[[str], int]
    budget: int  # tokens a prompt may take
    window: int
    tokenizer: object = None


# -- prompt ---------------------------------------------------------------------------------------
def check_template(template: str, fields: tuple[str, ...] = ("passages", "question")) -> None:
    try:
        used = {f for _, f, _, _ in string.Formatter().parse(template) if f is not None}
    except ValueError as exc:
        raise UserError(f"RAG template is not a valid format string ({exc}): {template[:60]!r}") from None
    missing = [f for f in fields if f not in used]
    extra = sorted(used - set(fields))
    if missing or extra:
        raise UserError(f"RAG template must use {{{'}, {'.join(fields)}}} and nothing else "
                        f"({'missing ' + ', '.join(missing) if missing else 'unknown ' + ', '.join(extra)}): "
                        f"{template[:60]!r}")


def format_passages(hits) -> str:
    return PASSAGE_SEPARATOR.join(PASSAGE_FORMAT.format(number=i, text=h.chunk.text.strip())
                                  for i, h in enumerate(hits, 1))


def assemble_prompt(question: str, hits, count_tokens: Callable[[str], int], budget: int, *,
                    template: str = DEFAULT_TEMPLATE) -> Assembled:
    """The grounded prompt with as many of the hits (best first) as fit `budget` tokens.

    Chunks are dropped whole from the lowest-ranked end; none is ever cut. If not even the
    best chunk fits, that is an error: an answer without its evidence would not be grounded.
    """
    check_template(template)
    kept = list(hits)
    while True:
        prompt = template.format(passages=format_passages(kept), question=question)
        tokens = count_tokens(prompt)
        if tokens <= budget:
            return Assembled(prompt, kept, len(hits) - len(kept), tokens)
        if len(kept) <= 1:
            bare = count_tokens(template.format(passages="", question=question))
            if bare > budget or not kept:
                raise UserError(f"the question alone makes a prompt of {bare} tokens, over the prompt "
                                f"budget of {budget} tokens; shorten it")
            raise UserError(f"not even the best retrieved chunk fits: with it the prompt has {tokens} "
                            f"tokens, over the budget of {budget} (the context window minus room to "
                            "generate); index with smaller chunk_tokens, lower max_new_tokens, or use a "
                            "model with a larger window")
        kept.pop()


def cited_numbers(text: str, n_passages: int) -> tuple[list[int], list[int]]:
    """(numbers 1..n cited in `text`, numbers cited outside 1..n), each in order of first mention."""
    used: list[int] = []
    unknown: list[int] = []
    for m in _CITATION.finditer(text):
        for number in map(int, re.split(r"[,;]", m.group(1))):
            bucket = used if 1 <= number <= n_passages else unknown
            if number not in bucket:
                bucket.append(number)
    return used, unknown


# -- answering --------------------------------------------------------------------------------------
def as_model(model, *, window: int | None = None, max_new_tokens: int = 128,
             count_tokens: Callable[[str], int] | None = None, generation: dict | None = None) -> _Model:
    """A LoadedModel (generates with its Generator, counts with its tokenizer and chat template) or a
    plain generate_fn(prompt) -> str with `window` and `count_tokens` given (the prompt budget is then
    window - max_new_tokens, as for a decoder-only model)."""
    if hasattr(model, "generator"):
        cfg = GenerationConfig.from_dict({"max_new_tokens": max_new_tokens, **(generation or {})},
                                         "RAG generation")
        window = window or model.window
        budget = window - (max_new_tokens if model.kind == "causal" else 0)
        gen = model.generator
        return _Model(lambda prompts: [r.text for r in gen.generate(prompts, cfg)],
                      count_tokens or harness.count_tokens(model), _check_budget(budget, window, max_new_tokens),
                      window, model.tokenizer)
    if callable(model):
        if window is None or count_tokens is None:
            raise TypeError("a generate_fn needs window= (the model's context window in tokens) and "
                            "count_tokens= (prompt -> its token count)")
        return _Model(lambda prompts: [model(p) for p in prompts], count_tokens,
                      _check_budget(window - max_new_tokens, window, max_new_tokens), window)
    raise TypeError(f"model must be a LoadedModel or a generate_fn(prompt) -> str, not {type(model).__name__}")


def _check_budget(budget: int, window: int, max_new_tokens: int) -> int:
    if budget < 1:
        raise UserError(f"max_new_tokens {max_new_tokens} leaves no room for a prompt in the context "
                        f"window of {window} tokens")
    return budget


def _answer_from(question: str, assembled: Assembled, text: str, retrieved: int) -> Answer:
    citations = [Citation.of(i, h) for i, h in enumerate(assembled.hits, 1)]
    used, unknown = cited_numbers(text, len(citations))
    return Answer(question, text, citations, used, unknown, assembled.dropped, retrieved,
                  assembled.prompt, assembled.tokens)


def answer(question: str, index, model, *, k: int = 5, window: int | None = None, max_new_tokens: int = 128,
           count_tokens: Callable[[str], int] | None = None, generation: dict | None = None,
           template: str = DEFAULT_TEMPLATE) -> Answer:
    """Retrieve the top k chunks for `question`, fit them into the window, generate a cited answer."""
    if not question.strip():
        raise UserError("the question is empty")
    m = as_model(model, window=window, max_new_tokens=max_new_tokens, count_tokens=count_tokens,
                 generation=generation)
    hits = index.search(question, k)
    if not hits:
        raise UserError(f"{index.dir}: the index holds no chunks; index some documents first")
    assembled = assemble_prompt(question, hits, m.count_tokens, m.budget, template=template)
    return _answer_from(question, assembled, m.generate([assembled.prompt])[0], len(hits))


def format_sources(result: Answer) -> str:
    """One line per citation, those the answer uses marked with '*'."""
    lines = []
    for c in result.citations:
        mark = "*" if c.number in result.used else " "
        lines.append(f"{mark}[{c.number}] {c.source}:{c.start}-{c.end} (chunk {c.chunk_number}, "
                     f"score {c.score:.3f})")
    if result.dropped:
        lines.append(f"({result.dropped} lower-ranked chunk(s) left out to fit the context window)")
    return "\n".join(lines)


# -- evaluation -------------------------------------------------------------------------------------
def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values) if values else 0.0


def retrieval_metrics(rankings: list[list], gold: list, ks=(1, 5, 10),
                      match: Callable[[object, object], bool] | None = None) -> dict:
    """recall@k and MRR of ranked lists against gold items.

    recall@k of a question: the share of its gold items matched by some item in its top k (with one
    gold item: 1 if found in the top k, else 0). MRR: the mean over questions of 1 / rank of the first
    item that matches any gold item (0 when none does). `gold[i]` is one item or a list of items;
    `match(item, gold_item)` defaults to equality.
    """
    match = match or (lambda item, g: item == g)
    ks = sorted(set(ks))
    if not rankings:
        raise UserError("no questions to evaluate retrieval on")
    if len(rankings) != len(gold):
        raise UserError(f"{len(rankings)} questions but {len(gold)} gold entries")
    if not ks or ks[0] < 1:
        raise UserError(f"ks must be positive integers, got {ks}")
    recall: dict[int, list[float]] = {k: [] for k in ks}
    reciprocal, first_ranks = [], []
    for i, (ranking, golds) in enumerate(zip(rankings, gold)):
        golds = list(golds) if isinstance(golds, (list, tuple, set)) else [golds]
        if not golds:
            raise UserError(f"question {i} has no gold passage or source")
        found = [next((r for r, item in enumerate(ranking, 1) if match(item, g)), None) for g in golds]
        for k in ks:
            recall[k].append(sum(f is not None and f <= k for f in found) / len(golds))
        first = min((f for f in found if f is not None), default=None)
        reciprocal.append(1 / first if first else 0.0)
        first_ranks.append(first)
    return {"n_questions": len(rankings), **{f"recall@{k}": _mean(recall[k]) for k in ks},
            "mrr": _mean(reciprocal), "first_relevant_rank": first_ranks}


def _norm(text: str) -> str:
    return " ".join(text.lower().split())


def _same_source(source: str, ref: str) -> bool:
    """`ref` names `source` exactly, as a path that resolves to it, or as a trailing part of it."""
    if source == ref or source == str(Path(ref).resolve()):
        return True
    parts = Path(ref).parts
    return not Path(ref).is_absolute() and Path(source).parts[-len(parts):] == parts


def chunk_matches(chunk, gold) -> bool:
    """Whether a retrieved chunk is relevant to a gold item: a source path (any chunk of that file),
    {"source", "start", "end"} (a chunk overlapping that span), or {"text"} (a chunk containing the
    passage or contained in it, whitespace and case ignored; with overlapping chunks, a passage no
    longer than the overlap always lies whole in some chunk)."""
    if isinstance(gold, (str, Path)):
        return _same_source(chunk.source, str(gold))
    if isinstance(gold, dict) and "text" in gold:
        if "source" in gold and not _same_source(chunk.source, str(gold["source"])):
            return False
        passage, text = _norm(gold["text"]), _norm(chunk.text)
        return bool(passage) and (passage in text or text in passage)
    if isinstance(gold, dict) and {"source", "start", "end"} <= set(gold):
        return (_same_source(chunk.source, str(gold["source"]))
                and chunk.start < gold["end"] and gold["start"] < chunk.end)
    raise UserError(f"gold item {gold!r}: give a source path, {{source, start, end}} or {{text}}")


def evaluate_retrieval(index, questions: list[str], gold: list, ks=(1, 5, 10)) -> dict:
    """recall@k and MRR (over the top max(ks) chunks) of `index` on questions with gold sources or
    passages (see chunk_matches for the forms a gold item takes)."""
    if len(questions) != len(gold):
        raise UserError(f"{len(questions)} questions but {len(gold)} gold entries")
    hits = index.search_batch(list(questions), max(ks))
    out = retrieval_metrics([[h.chunk for h in row] for row in hits], gold, ks, match=chunk_matches)
    out["k_retrieved"] = max(ks)
    return out


def evaluate_answers(index, model, questions: list[str], references: list, *, k: int = 5, task: str = "qa",
                     window: int | None = None, max_new_tokens: int = 64,
                     count_tokens: Callable[[str], int] | None = None, generation: dict | None = None,
                     template: str = DEFAULT_TEMPLATE, closed_book_template: str = CLOSED_BOOK_TEMPLATE,
                     bootstrap: bool = True) -> dict:
    """The same questions answered with retrieval (top k chunks in the prompt) and without (the
    closed-book prompt), scored by llmcycle.evaluation.metrics for `task`: {"with_retrieval": summary,
    "without_retrieval": summary, "rows": one dict per question}."""

    if not questions:
        raise UserError("no questions to evaluate")
    if len(questions) != len(references):
        raise UserError(f"{len(questions)} questions but {len(references)} references")
    check_template(closed_book_template, ("question",))
    m = as_model(model, window=window, max_new_tokens=max_new_tokens, count_tokens=count_tokens,
                 generation=generation)
    hits = index.search_batch(list(questions), k)
    assembled = [assemble_prompt(q, h, m.count_tokens, m.budget, template=template)
                 for q, h in zip(questions, hits)]
    closed = [closed_book_template.format(question=q) for q in questions]
    for q, p in zip(questions, closed):
        if m.count_tokens(p) > m.budget:
            raise UserError(f"question {q[:60]!r}: the closed-book prompt is over the budget of {m.budget} tokens")
    answers = [_answer_from(q, a, text, len(h))
               for q, a, text, h in zip(questions, assembled, m.generate([a.prompt for a in assembled]), hits)]
    closed_texts = m.generate(closed)
    with_summary, with_per = metrics.compute_all(task, [a.text for a in answers], references, m.tokenizer,
                                                 bootstrap=bootstrap)
    without_summary, without_per = metrics.compute_all(task, closed_texts, references, m.tokenizer,
                                                       bootstrap=bootstrap)
    with_summary.update({"k": k, "dropped_chunks": sum(a.dropped for a in answers),
                         "cited_share": _mean(bool(a.used) for a in answers),
                         "unknown_citation_share": _mean(bool(a.unknown_citations) for a in answers)})
    headline = with_summary["headline"]
    rows = [{"question": q, "references": r, "with_retrieval": a.text, "without_retrieval": c,
             "used": a.used, "dropped": a.dropped,
             "sources": [(x.source, x.start, x.end) for x in a.citations],
             f"{headline}_with": with_per[headline][i], f"{headline}_without": without_per[headline][i]}
            for i, (q, r, a, c) in enumerate(zip(questions, references, answers, closed_texts))]
    return {"with_retrieval": with_summary, "without_retrieval": without_summary, "rows": rows}
