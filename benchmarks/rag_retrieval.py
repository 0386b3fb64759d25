"""Retrieval speed and quality of llmcycle's RAG index over 100k real chunks, exact vs approximate.

The collection: DialogSum train dialogues and GSM8K train problems (question + worked answer), from
../shared/data, shuffled (seed 0) and cut by llmcycle's own chunker (the MiniLM tokenizer) into
windows of 32 tokens overlapping by 8, until 100,000 chunks. They are embedded with the default
all-MiniLM-L6-v2; embeddings are cached in benchmarks/out/rag/ (git-ignored) in blocks, so a killed
run resumes and a second run reuses them (the cache records the throughput it was computed at).

Measured with --threads torch and FAISS threads (default 1: one query per thread, as a server runs
them; on the shared 2-core machine two threads per query made each wait for the other):
  indexing   chunks/s of rag_index.build_index on a sample of the documents written to files (reading,
             chunking, embedding, writing: the `llmcycle index` path), and of embedding the 100k
  latency    p50/p95 of Index.search(question, 5) end to end (query embedding included) for exact
             (IndexFlatIP), IVF and HNSW over the 100k, plus embedding alone and search alone; wall
             time and the thread's CPU time (what a query costs with a core to itself)
  recall     recall@5 of each index against exact search with float32 question vectors (share of the
             exact top 5 it returns), with a sweep of nprobe / efSearch; and, as a quality check,
             recall@5 / MRR of finding a dialogue from its DialogSum reference summary
Questions are embedded as Index.search does (Embedder.embed_queries: bfloat16 on a CPU with native
bfloat16, LLMCYCLE_QUERY_DTYPE=float32 to compare); the JSON says which, and the cosine to float32.

    .venv/bin/python benchmarks/rag_retrieval.py [--chunks 100000] [--queries 200] [--threads 1]
    .venv/bin/python benchmarks/rag_retrieval.py --embed-only      # fill the embedding cache, then stop

Prints exactly one JSON line. Without the data it prints a JSON line with "skipped" and exits 0.
"""
from __future__ import annotations

import argparse
import hashlib
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # run from a checkout without installing

DATA = Path(__file__).resolve().parents[2] / "shared/data"
CACHE = Path(__file__).resolve().parent / "out/rag"
BLOCK = 5000  # chunks per cached embedding file


def read_jsonl(path: Path) -> list[dict]:
    with open(path, encoding="utf-8") as fh:
        return [json.loads(line) for line in fh if line.strip()]


def load_documents(data: Path) -> list[tuple[str, str, str | None]]:
    """(source, text, DialogSum summary or None) for every dialogue and GSM8K problem, shuffled."""
    docs = [(f"dialogsum/train:{i}", r["dialogue"], r["summary"])
            for i, r in enumerate(read_jsonl(data / "dialogsum/dialogsum.train.jsonl"))]
    docs += [(f"gsm8k/train:{i}", f"{r['question']}\n{r['answer']}", None)
             for i, r in enumerate(read_jsonl(data / "gsm8k/train.jsonl"))]
    random.Random(0).shuffle(docs)
    return docs


def make_chunks(docs, tokenizer, n: int, chunk_tokens: int, overlap: int):
    from llmcycle.augment.index import Chunk, chunk_spans

    chunks, used_docs = [], 0
    for source, text, _ in docs:
        if len(chunks) >= n:
            break
        used_docs += 1
        for number, (s, e) in enumerate(chunk_spans(text, tokenizer, chunk_tokens, overlap)):
            chunks.append(Chunk(len(chunks), source, number, s, e, text[s:e]))
    return chunks[:n], used_docs


def cached_embeddings(chunks, embedder, key: str):
    """All chunk embeddings, computed in blocks that are saved as they finish; (vectors, meta)."""
    import numpy as np

    folder = CACHE / key
    folder.mkdir(parents=True, exist_ok=True)
    meta_path = folder / "meta.json"
    meta = json.loads(meta_path.read_text()) if meta_path.exists() else {"blocks": {}}
    parts = []
    for b in range(0, len(chunks), BLOCK):
        count = min(BLOCK, len(chunks) - b)
        path = folder / (f"block-{b // BLOCK:04d}.npy" if count == BLOCK else f"block-{b // BLOCK:04d}-{count}.npy")
        if path.exists():
            parts.append(np.load(path))
            continue
        t0, load0 = time.perf_counter(), os.getloadavg()[0]
        vectors = embedder.embed([c.text for c in chunks[b:b + BLOCK]])
        seconds = time.perf_counter() - t0
        tmp = path.with_suffix(".tmp.npy")
        np.save(tmp, vectors)
        os.replace(tmp, path)
        meta["blocks"][path.name] = {"chunks": len(vectors), "seconds": round(seconds, 2),
                                     "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}
        meta_path.write_text(json.dumps(meta, indent=1))
        print(f"embedded {b + len(vectors)}/{len(chunks)} chunks ({len(vectors) / seconds:.1f}/s)",
              file=sys.stderr, flush=True)
        parts.append(vectors)
    return np.concatenate(parts), meta


def percentiles(values_s: list[float]) -> dict:
    import numpy as np

    ms = np.asarray(values_s) * 1000
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p95_ms": round(float(np.percentile(ms, 95)), 2),
            "mean_ms": round(float(ms.mean()), 2)}


def indexing_throughput(docs, n_docs: int, chunk_tokens: int, overlap: int) -> dict:
    """build_index on n_docs documents written as text files: the path `llmcycle index` takes."""
    from llmcycle.augment.index import build_index

    with tempfile.TemporaryDirectory() as tmp:
        folder = Path(tmp) / "docs"
        folder.mkdir()
        for i, (_, text, _) in enumerate(docs[-n_docs:]):  # the end of the shuffle: outside the 100k
            (folder / f"doc{i:05d}.txt").write_text(text, encoding="utf-8")
        load0 = os.getloadavg()[0]
        stats = build_index([folder], Path(tmp) / "index", chunk_tokens=chunk_tokens, overlap=overlap,
                            progress=False)
    return {"documents": n_docs, "chunks": stats["chunks_added"], "seconds": stats["seconds"],
            "chunks_per_s": stats["chunks_per_s"],
            "embed_share": round(stats["embed_seconds"] / stats["seconds"], 3),
            "loadavg_1m": [round(load0, 2), round(os.getloadavg()[0], 2)]}


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--data", type=Path, default=DATA, help="folder with dialogsum/ and gsm8k/")
    ap.add_argument("--chunks", type=int, default=100_000)
    ap.add_argument("--chunk-tokens", type=int, default=32)
    ap.add_argument("--overlap", type=int, default=8)
    ap.add_argument("--queries", type=int, default=200, help="DialogSum summaries used as questions")
    ap.add_argument("--index-docs", type=int, default=150, help="documents for the build_index throughput")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch and FAISS threads per query (2 on the shared 2-core machine made each "
                         "query wait on the other thread: 800 ms instead of 25 ms)")
    ap.add_argument("--embed-only", action="store_true", help="fill the embedding cache and stop")
    args = ap.parse_args()

    if not (args.data / "dialogsum/dialogsum.train.jsonl").is_file() or not (args.data / "gsm8k/train.jsonl").is_file():
        print(json.dumps({"benchmark": "rag_retrieval", "skipped": f"data not found under {args.data}"}))
        return 0
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    import faiss
    import numpy as np
    import torch

    from llmcycle.augment import rag
    from llmcycle.augment.index import DEFAULT_PARAMS, Index, build_faiss
    from llmcycle.models.embeddings import load_embedding_model

    torch.set_num_threads(args.threads)
    faiss.omp_set_num_threads(args.threads)
    load_start = os.getloadavg()
    embedder = load_embedding_model()
    docs = load_documents(args.data)
    t0 = time.perf_counter()
    chunks, used_docs = make_chunks(docs, embedder.tokenizer, args.chunks, args.chunk_tokens, args.overlap)
    chunk_s = time.perf_counter() - t0
    # The chunk sequence depends only on these (documents shuffled with seed 0, chunked in order), so
    # a run with fewer chunks reuses the first blocks of a larger one.
    key = hashlib.sha256(json.dumps([embedder.name, args.chunk_tokens, args.overlap, "seed0"]).encode()
                         ).hexdigest()[:12]
    vectors, meta = cached_embeddings(chunks, embedder, key)
    blocks = meta["blocks"].values()
    embed_rate = sum(b["chunks"] for b in blocks) / sum(b["seconds"] for b in blocks)
    if args.embed_only:
        print(json.dumps({"benchmark": "rag_retrieval", "embedded": len(vectors), "cache": str(CACHE / key),
                          "chunks_per_s": round(embed_rate, 1)}))
        return 0

    # The 100k-chunk indexes: built from the cached vectors exactly as rag_index builds them.
    params = dict(DEFAULT_PARAMS)
    ids = [c.id for c in chunks]
    indexes, build_s = {}, {}
    for kind in ("flat", "ivf", "hnsw"):
        t0 = time.perf_counter()
        structure = build_faiss(vectors, ids, kind, params)
        build_s[kind] = round(time.perf_counter() - t0, 2)
        manifest = {"model": embedder.name, "kind": kind, "params": params, "files": {},
                    "chunk_tokens": args.chunk_tokens, "overlap": args.overlap}
        indexes[kind] = Index(CACHE / key, manifest, chunks, vectors, structure)

    # Questions: reference summaries of dialogues whose chunks are in the index (gold = that dialogue).
    in_index = {c.source for c in chunks}
    pool = [(summary, source) for source, _, summary in docs if summary and source in in_index]
    questions = random.Random(1).sample(pool, min(args.queries, len(pool)))
    texts = [q for q, _ in questions]

    for q in texts[:10]:  # warm-up: allocator, lazy paths
        indexes["flat"].search(q, 5)
    # Wall time is what a user waits; CPU time of this thread is what the query costs when it has a
    # core to itself (on this shared machine the two differ by the load of other processes).
    embed_times, embed_cpu, query_vectors = [], [], []
    for q in texts:
        t0, c0 = time.perf_counter(), time.thread_time()
        query_vectors.append(embedder.embed_queries([q])[0])  # what Index.search does
        embed_times.append(time.perf_counter() - t0)
        embed_cpu.append(time.thread_time() - c0)
    query_vectors = np.stack(query_vectors)
    # The reference is exact search with float32 question vectors: recall below counts both the
    # approximate index and, where questions are embedded in bfloat16, that precision.
    fp32_vectors = embedder.embed(texts)
    query_cosine = (query_vectors * fp32_vectors).sum(1)
    exact_top = [[h.chunk.id for h in row] for row in indexes["flat"].search_vectors(fp32_vectors, 5)]

    def recall_vs_exact(index) -> float:
        rows = index.search_vectors(query_vectors, 5)
        return float(np.mean([len({h.chunk.id for h in row} & set(ex)) / len(ex) for row, ex in zip(rows, exact_top)]))

    def search_only(index) -> list[float]:
        times = []
        for v in query_vectors:
            t0 = time.perf_counter()
            index.search_vectors(v[None, :], 5)
            times.append(time.perf_counter() - t0)
        return times

    results = {}
    for kind, index in indexes.items():
        end_to_end, end_to_end_cpu = [], []
        for q in texts:
            t0, c0 = time.perf_counter(), time.thread_time()
            index.search(q, 5)
            end_to_end.append(time.perf_counter() - t0)
            end_to_end_cpu.append(time.thread_time() - c0)
        ranked = [[h.chunk.source for h in row] for row in index.search_vectors(query_vectors, 10)]
        quality = rag.retrieval_metrics(ranked, [s for _, s in questions], ks=(1, 5, 10))
        results[kind] = {"build_s": build_s[kind], "end_to_end": percentiles(end_to_end),
                         "end_to_end_cpu": percentiles(end_to_end_cpu),
                         "search_only": percentiles(search_only(index)),
                         "recall@5_vs_exact": round(recall_vs_exact(index), 4),
                         "summary_to_dialogue": {k: round(v, 4) for k, v in quality.items()
                                                 if k.startswith("recall") or k == "mrr"}}

    sweep = {"ivf_nprobe": {}, "hnsw_ef_search": {}}
    for nprobe in (1, 4, 8, 16, 32, 64):
        indexes["ivf"].set_search_params(nprobe=nprobe)
        sweep["ivf_nprobe"][nprobe] = {"recall@5_vs_exact": round(recall_vs_exact(indexes["ivf"]), 4),
                                       **percentiles(search_only(indexes["ivf"]))}
    for ef in (16, 32, 64, 128, 256):
        indexes["hnsw"].set_search_params(ef_search=ef)
        sweep["hnsw_ef_search"][ef] = {"recall@5_vs_exact": round(recall_vs_exact(indexes["hnsw"]), 4),
                                       **percentiles(search_only(indexes["hnsw"]))}

    throughput = indexing_throughput(docs, args.index_docs, args.chunk_tokens, args.overlap)
    load_end = os.getloadavg()
    print(json.dumps({
        "benchmark": "rag_retrieval",
        "chunks": len(chunks), "documents": used_docs,
        "chunking": {"chunk_tokens": args.chunk_tokens, "overlap": args.overlap, "seconds": round(chunk_s, 2),
                     "tokenizer": "all-MiniLM-L6-v2 (WordPiece)"},
        "query_embedding": percentiles(embed_times), "query_embedding_cpu": percentiles(embed_cpu),
        "query_dtype": embedder.query_dtype,
        "query_vs_float32_cosine": {"mean": round(float(query_cosine.mean()), 5),
                                    "min": round(float(query_cosine.min()), 5)},
        "query_tokens_mean": round(sum(len(embedder.tokenizer(q)["input_ids"]) for q in texts) / len(texts), 1),
        "top5": results,
        "goal_p95_ms": 20,
        "meets_goal": {k: r["end_to_end"]["p95_ms"] < 20 for k, r in results.items()},
        "meets_goal_cpu_time": {k: r["end_to_end_cpu"]["p95_ms"] < 20 for k, r in results.items()},
        "params": {k: v for k, v in params.items() if v is not None} | {
            "ivf_nlist": int(faiss.extract_index_ivf(indexes["ivf"].faiss).nlist)},
        "sweep": sweep,
        "indexing": {"build_index": throughput,
                     "embed_100k_chunks_per_s": round(embed_rate, 1),
                     "embed_100k_note": "from the cache's record of when it was computed (blocks of "
                                        f"{BLOCK}; load average per block in {CACHE / key}/meta.json)"},
        "queries": len(texts), "query_source": "DialogSum train reference summaries (gold: their dialogue)",
        "model": embedder.name, "dim": embedder.dim, "threads": args.threads,
        "loadavg": {"start": [round(x, 2) for x in load_start], "end": [round(x, 2) for x in load_end]},
        "faiss": faiss.__version__, "torch": torch.__version__,
    }))
    return 0


if __name__ == "__main__":
    sys.exit(main())
