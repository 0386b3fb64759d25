"""Prompt building, shot selection and fitting prompts into the context window."""
import numpy as np
import pytest

from llmcycle.data.records import Example
from llmcycle.core.errors import UserError
from llmcycle.data.prompting import build_prompt, check_template, fit_prompts, select_shots, template_fields
from llmcycle.models.embeddings import load_embedder


def ex(text, target="t", **fields):
    return Example(input=text, targets=[target], fields={"dialogue": text, **fields}, where=f"f:{text}")


def test_template_fields_and_missing_field_error():
    assert template_fields("Summarize:\n{dialogue}\nTopic {topic}") == ["dialogue", "topic"]
    check_template("{input} {dialogue}", "ok", ex("a"))
    with pytest.raises(UserError) as err:
        check_template("Summarize {dialog}", "course", ex("a"))
    msg = str(err.value)
    assert "template 'course'" in msg and "'dialog'" in msg and "did you mean 'dialogue'" in msg
    with pytest.raises(UserError, match="empty placeholder"):
        check_template("Summarize {}", "bad", ex("a"))


def test_build_prompt_matches_the_course_layout():
    template = "Dialogue:\n\n{dialogue}\n\nWhat was going on?"
    shots = [ex("A: hi", "greeting"), ex("B: bye", "farewell")]
    prompt = build_prompt(template, ex("C: thanks"), shots, shot_format="{prompt}\n{target}",
                          separator="\n\n\n")
    assert prompt == ("Dialogue:\n\nA: hi\n\nWhat was going on?\ngreeting\n\n\n"
                      "Dialogue:\n\nB: bye\n\nWhat was going on?\nfarewell\n\n\n"
                      "Dialogue:\n\nC: thanks\n\nWhat was going on?")
    assert build_prompt("{input}!", ex("x")) == "x!"


def test_select_first_random_and_errors():
    pool = [ex(str(i)) for i in range(10)]
    queries = [ex("q1"), ex("q2")]
    assert select_shots("first", 3, pool, queries) == [[0, 1, 2], [0, 1, 2]]
    a = select_shots("random", 3, pool, queries, seed=1)
    assert a == select_shots("random", 3, pool, queries, seed=1)
    assert a != select_shots("random", 3, pool, queries, seed=2)
    assert all(len(set(row)) == 3 for row in a)
    assert select_shots("first", 0, pool, queries) == [[], []]
    with pytest.raises(UserError, match="11 shots asked for, but only 10"):
        select_shots("first", 11, pool, queries)


def test_select_similar_puts_the_most_similar_next_to_the_query():
    # A fake embedder with hand-made unit vectors: cosine similarity is easy to reason about.
    vectors = {"cat": [1, 0, 0], "kitten": [0.9, 0.436, 0], "dog": [0, 1, 0], "car": [0, 0, 1]}

    def embed(texts):
        v = np.array([vectors[t] for t in texts], dtype=float)
        return v / np.linalg.norm(v, axis=1, keepdims=True)

    pool = [ex("dog"), ex("car"), ex("kitten")]
    assert select_shots("similar", 2, pool, [ex("cat")], embedder=embed) == [[0, 2]]  # kitten last


def test_real_embedder_finds_the_paraphrase():
    pytest.importorskip("sentence_transformers")
    embed = load_embedder()
    pool = [ex("The weather is sunny and warm today."), ex("I want to book a table for dinner."),
            ex("My laptop will not turn on.")]
    picked = select_shots("similar", 1, pool, [ex("Can I reserve a restaurant table tonight?")],
                          embedder=embed)
    assert picked == [[1]]


def test_unknown_embedder_is_a_clear_error(tmp_path):
    pytest.importorskip("sentence_transformers")
    with pytest.raises(UserError, match="embedding model .* could not be loaded"):
        load_embedder(str(tmp_path / "nothing-here"))


def _count(text):
    return len(text.split())


def test_fit_drops_shots_until_the_prompt_fits_and_counts_them():
    pool = [ex("w " * 5), ex("w " * 5)]
    queries = [ex("short"), ex("w " * 12)]
    fitted = fit_prompts("{input}", queries, pool, [[0, 1], [0, 1]], _count, 16,
                         shot_format="{prompt} {target}", separator=" ", on_overflow="drop_shots",
                         variant="v")
    # query 0: 1 + 2 * (5 + 1) = 13 words fits; query 1: 12 + 12 = 24 > 16, 12 + 6 = 18 > 16, 12 fits
    assert fitted.shots_used == [2, 0] and fitted.lost_shots == 1
    assert fitted.token_counts == [13, 12]
    assert all(n <= 16 for n in fitted.token_counts)


def test_fit_refuses_when_the_project_says_so_and_never_cuts_the_input():
    pool = [ex("w " * 5)]
    with pytest.raises(UserError, match="on_overflow is 'refuse'"):
        fit_prompts("{input}", [ex("w " * 12)], pool, [[0]], _count, 16, shot_format="{prompt} {target}",
                    separator=" ", on_overflow="refuse", variant="v")
    with pytest.raises(UserError, match="even without shots"):
        fit_prompts("{input}", [ex("w " * 20)], pool, [[0]], _count, 16, shot_format="{prompt} {target}",
                    separator=" ", on_overflow="drop_shots", too_long="refuse", variant="v")


def test_a_query_over_the_window_even_alone_is_skipped_and_counted_never_cut():
    queries = [ex("w " * 3), ex("w " * 20), ex("w " * 4)]
    for i, q in enumerate(queries):
        q.where = f"data.jsonl:{i + 1}"
    fitted = fit_prompts("{input}", queries, [], [[], [], []], _count, 16, variant="v")
    assert fitted.kept == [0, 2] and fitted.skipped == ["data.jsonl:2"]
    assert [str(p) for p in fitted.prompts] == ["w " * 3, "w " * 4]  # whole, not cut
    assert fitted.examples(queries) == [queries[0], queries[2]]
