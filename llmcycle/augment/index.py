"""The retrieval index for RAG: documents -> token chunks -> sentence embeddings -> FAISS, on disk.

    stats = build_index(["docs/"], "rag-index")      # chunk, embed and store every document
    stats = update_index(["docs/"], "rag-index")     # re-embed only new or changed files, drop deleted ones
    stats = remove_from_index("rag-index", ["docs/old.md"])
    hits = Index.load("rag-index").search("how do I reset my password?", k=5)

Documents: text and Markdown (read as they are), HTML (tags stripped with the stdlib html.parser),
PDF (with pypdf, the `rag` extra). Any other file in a folder is read as UTF-8 text; a binary or
unreadable file is skipped with a warning that names it. Chunks are windows of `chunk_tokens` tokens of
the embedding model's own tokenizer, overlapping by `overlap` tokens, so the embedder never cuts one.
A chunk records its source, its number in the document and its character start/end in the document's
text (the file itself for text and Markdown, the extracted text for HTML and PDF).

On disk: `manifest.json` (settings, indexed files with their hashes, the current generation),
`chunks-<gen>.jsonl`, `vectors-<gen>.npy` (the embeddings: the source of truth) and, for approximate
kinds, `index-<gen>.faiss`. An update writes a new generation's files and then the manifest,
atomically and last: a process killed mid-update leaves the old manifest pointing at the old files.
Chunk ids are never reused and the FAISS index is an IndexIDMap over them, so ids stay stable across
updates. Only new or changed files are embedded again (the slow part). Exact search needs no structure
(built at load from the vectors, milliseconds); an approximate one is extended when files are only
added and rebuilt from the stored vectors after removals (about 30 s for HNSW over 100k chunks on a
busy 2-core machine).

Search is exact (IndexFlatIP on normalised vectors: cosine) up to `approximate_above` chunks and
approximate above it: IVF (`nprobe` lists searched) or HNSW (`ef_search`), trading recall for speed.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import secrets
import time
import warnings
from dataclasses import asdict, dataclass
from html.parser import HTMLParser
from pathlib import Path
from typing import Callable

from llmcycle.core.errors import UserError, suggest
from llmcycle.core.files import fsync_dir
from llmcycle.core.progress import bar
from llmcycle.core.store import atomic_write_json, atomic_write_text
from llmcycle.models.embeddings import DEFAULT_EMBEDDER, Embedder, load_embedding_model

FORMAT = 1
MANIFEST = "manifest.json"
KINDS = ("auto", "flat", "ivf", "hnsw")
APPROXIMATE_ABOVE = 50_000  # chunks; below it exact search is fast enough (a few ms per query)
# Search defaults from benchmarks/rag_retrieval.py (100k MiniLM chunks): recall@5 against exact search
# 0.97 for HNSW at ef_search 128 and 0.95 for IVF at nprobe 64, each well under 1 ms per query.
DEFAULT_PARAMS = {"nlist": None,  # IVF lists; None = about 4 * sqrt(chunks)
                  "nprobe": 64, "hnsw_m": 32, "ef_construction": 80, "ef_search": 128}
HTML_SUFFIXES = {".html", ".htm", ".xhtml"}


class SkippedDocumentWarning(UserWarning):
    """A file that could not be indexed (binary, unreadable, no text); the message names it."""


@dataclass(frozen=True)
class Chunk:
    id: int
    source: str  # the file's absolute path
    number: int  # 0-based position of the chunk in its document
    start: int  # character offsets into the document's text: text[start:end] == chunk.text
    end: int
    text: str


@dataclass(frozen=True)
class Hit:
    chunk: Chunk
    score: float  # cosine similarity (inner product of normalised vectors)
    rank: int  # 1 = best


@dataclass
class Document:
    source: str
    text: str
    sha256: str
    size: int


class _Skip(Exception):
    """A file that is skipped with a warning, not an error that stops the run."""


# -- reading documents ------------------------------------------------------------------------------
class _HTMLText(HTMLParser):
    """Visible text of an HTML page: scripts and styles dropped, block elements on their own lines."""

    SKIP = {"script", "style", "noscript", "template", "svg"}
    BLOCK = {"p", "div", "br", "li", "ul", "ol", "h1", "h2", "h3", "h4", "h5", "h6", "tr", "table",
             "section", "article", "header", "footer", "nav", "pre", "blockquote", "hr", "dt", "dd",
             "title", "main", "aside", "figure", "figcaption", "form"}

    def __init__(self):
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skipping = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skipping += 1
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_startendtag(self, tag, attrs):
        if tag in self.BLOCK:
            self.parts.append("\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skipping = max(0, self.skipping - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n")

    def handle_data(self, data):
        if not self.skipping:
            self.parts.append(data)


def html_to_text(html: str) -> str:
    """The readable text of an HTML document (the <title> kept: it often names the topic)."""
    parser = _HTMLText()
    parser.feed(html)
    parser.close()
    text = re.sub(r"[ \t\r\f\v]+", " ", "".join(parser.parts))
    lines = [line.strip() for line in text.split("\n")]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


def _decode_text(data: bytes) -> str:
    if b"\x00" in data[:8192]:
        raise _Skip("binary file (NUL bytes)")
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as exc:
        raise _Skip(f"not UTF-8 text (byte {exc.start})") from None


def _pdf_text(path: Path, data: bytes) -> str:
    try:
        from pypdf import PdfReader
    except ImportError:
        raise UserError(f"{path}: reading PDF files needs pypdf: pip install 'llmcycle[rag]' "
                        "(or leave the PDF out)") from None
    import io

    try:
        reader = PdfReader(io.BytesIO(data))
        if reader.is_encrypted and not reader.decrypt(""):
            raise _Skip("encrypted PDF")
        return "\n\n".join((page.extract_text() or "").strip() for page in reader.pages).strip()
    except _Skip:
        raise
    except Exception as exc:  # noqa: BLE001 - pypdf raises many types for damaged files
        raise _Skip(f"not a readable PDF ({type(exc).__name__}: {str(exc)[:80]})") from None


def read_document(path: Path) -> Document:
    """One file's text, chosen by its suffix; raises _Skip for files to skip with a warning."""
    path = Path(path)
    try:
        data = path.read_bytes()
    except OSError as exc:
        raise _Skip(f"unreadable ({exc.strerror or exc})") from None
    suffix = path.suffix.lower()
    if suffix == ".pdf":
        text = _pdf_text(path, data)
    elif suffix in HTML_SUFFIXES:
        text = html_to_text(_decode_text(data))
    else:  # text, Markdown and anything else that decodes: kept exactly, so offsets map to the file
        text = _decode_text(data)
    if not text.strip():
        raise _Skip("no text to index")
    return Document(str(path.resolve()), text, hashlib.sha256(data).hexdigest(), len(data))


def find_files(paths, exclude: Path | None = None, allow_empty: bool = False) -> list[Path]:
    """The files named, and every non-hidden file under the folders named (sorted); `exclude` is the
    index's own folder, in case it lies inside the documents."""
    if isinstance(paths, (str, Path)):
        paths = [paths]
    files: list[Path] = []
    for p in map(Path, paths):
        if p.is_file():
            files.append(p)
        elif p.is_dir():
            found = [f for f in sorted(p.rglob("*")) if f.is_file()
                     and not any(part.startswith(".") for part in f.relative_to(p).parts)
                     and (exclude is None or not f.resolve().is_relative_to(exclude))]
            if not found and not allow_empty:
                raise UserError(f"{p}: the folder holds no documents to index")
            files.extend(found)
        else:
            raise UserError(f"{p}: no such file or folder")
    return list(dict.fromkeys(files))


def _skip_warning(path, reason: str) -> dict:
    warnings.warn(f"{path}: skipped, {reason}", SkippedDocumentWarning, stacklevel=3)
    return {"path": str(path), "reason": reason}


# -- chunking ---------------------------------------------------------------------------------------
def chunk_spans(text: str, tokenizer, chunk_tokens: int, overlap: int) -> list[tuple[int, int]]:
    """Character spans of windows of `chunk_tokens` tokens, each starting `chunk_tokens - overlap`
    tokens after the previous one; the last window ends at the last token. text[start:end] is the
    chunk, so positions always map back to the exact source text."""
    if not getattr(tokenizer, "is_fast", False):
        raise UserError("chunking by tokens needs a fast (Rust) tokenizer with offsets; "
                        "this embedding model's tokenizer has none")
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True, verbose=False)
    offsets = [(s, e) for s, e in enc["offset_mapping"] if e > s]  # zero-width pieces carry no text
    step = chunk_tokens - overlap
    spans = []
    for first in range(0, max(len(offsets) - overlap, 1), step):
        window = offsets[first:first + chunk_tokens]
        if window:
            spans.append((window[0][0], window[-1][1]))
    return spans


def check_chunking(chunk_tokens: int, overlap: int, embedder: "Embedder") -> None:
    if chunk_tokens < 1:
        raise UserError(f"chunk_tokens must be at least 1, got {chunk_tokens}")
    if not 0 <= overlap < chunk_tokens:
        raise UserError(f"overlap must be at least 0 and less than chunk_tokens ({chunk_tokens}), got {overlap}")
    if chunk_tokens > embedder.max_chunk_tokens:
        raise UserError(f"chunk_tokens {chunk_tokens} is over what the embedding model '{embedder.name}' "
                        f"reads ({embedder.max_chunk_tokens} tokens besides its special tokens); longer "
                        "chunks would be cut silently, so use a smaller chunk_tokens")


def _model_ref(name: str) -> str:
    """A local model folder is stored as an absolute path, so the index loads from any directory."""
    return str(Path(name).resolve()) if Path(name).is_dir() else name


# -- FAISS ------------------------------------------------------------------------------------------
def _faiss():
    try:
        import faiss
    except ImportError:
        raise UserError("retrieval indexes need faiss: pip install 'llmcycle[rag]'") from None
    return faiss


def resolve_kind(kind: str, n_chunks: int, approximate_above: int) -> str:
    if kind not in KINDS:
        raise UserError(f"unknown index kind '{kind}'{suggest(kind, KINDS)} (choices: {', '.join(KINDS)})")
    if kind == "auto":
        return "flat" if n_chunks <= approximate_above else "hnsw"
    return kind


def build_faiss(vectors, ids, kind: str, params: dict):
    """An IndexIDMap2 over an exact or approximate index of normalised vectors (inner product = cosine)."""
    faiss = _faiss()
    import numpy as np

    n, dim = vectors.shape
    if kind == "flat":
        base = faiss.IndexFlatIP(dim)
    elif kind == "hnsw":
        base = faiss.IndexHNSWFlat(dim, int(params["hnsw_m"]), faiss.METRIC_INNER_PRODUCT)
        base.hnsw.efConstruction = int(params["ef_construction"])
    elif kind == "ivf":
        # k-means wants about 39 points per list; fewer lists than that on a small collection
        nlist = params.get("nlist") or max(1, min(int(4 * math.sqrt(n)), n // 39))
        base = faiss.IndexIVFFlat(faiss.IndexFlatIP(dim), dim, int(nlist), faiss.METRIC_INNER_PRODUCT)
        base.train(vectors)
    else:
        raise ValueError(kind)
    index = faiss.IndexIDMap2(base)
    if n:
        index.add_with_ids(vectors, np.asarray(ids, dtype=np.int64))
    set_search_params(index, params)
    return index


def set_search_params(index, params: dict) -> None:
    faiss = _faiss()

    base = faiss.downcast_index(index.index)
    if isinstance(base, faiss.IndexIVF):
        base.nprobe = min(int(params["nprobe"]), base.nlist)
    elif isinstance(base, faiss.IndexHNSW):
        base.hnsw.efSearch = int(params["ef_search"])


# -- the index on disk ------------------------------------------------------------------------------
class Index:
    """A loaded index: chunks, their vectors and the FAISS structure over them; searches by text."""

    def __init__(self, index_dir: Path, manifest: dict, chunks: list[Chunk], vectors, faiss_index=None):
        self.dir, self.manifest, self.chunks, self.vectors = Path(index_dir), manifest, chunks, vectors
        self.by_id = {c.id: c for c in chunks}
        self.params = {**DEFAULT_PARAMS, **manifest.get("params", {})}
        self.faiss = faiss_index if faiss_index is not None else build_faiss(
            vectors, [c.id for c in chunks], "flat", self.params)
        set_search_params(self.faiss, self.params)

    @classmethod
    def load(cls, index_dir) -> "Index":
        faiss = _faiss()
        import numpy as np

        index_dir = Path(index_dir)
        for attempt in (1, 2):
            manifest = read_manifest(index_dir)
            gen = manifest["generation"]
            try:
                with open(index_dir / f"chunks-{gen}.jsonl", encoding="utf-8") as fh:
                    chunks = [Chunk(**json.loads(line)) for line in fh if line.strip()]
                vectors = np.load(index_dir / f"vectors-{gen}.npy")
                faiss_index = None
                if manifest["kind"] != "flat":
                    faiss_index = faiss.read_index(str(index_dir / f"index-{gen}.faiss"))
                break
            except (OSError, ValueError, RuntimeError, TypeError) as exc:
                # an update that committed between our reading the manifest and its files has
                # deleted them: read the new manifest once more
                if attempt == 1 and read_manifest(index_dir)["generation"] != gen:
                    continue
                raise UserError(f"{index_dir}: the index is damaged ({str(exc).splitlines()[0][:120]}); "
                                "build it again with llmcycle index") from None
        if len(chunks) != len(vectors):
            raise UserError(f"{index_dir}: the index is damaged ({len(chunks)} chunks but {len(vectors)} "
                            "vectors); build it again with llmcycle index")
        return cls(index_dir, manifest, chunks, vectors, faiss_index)

    def __len__(self) -> int:
        return len(self.chunks)

    @property
    def kind(self) -> str:
        return self.manifest["kind"]

    @property
    def embedder(self) -> Embedder:
        return load_embedding_model(self.manifest["model"])

    def set_search_params(self, *, nprobe: int | None = None, ef_search: int | None = None) -> None:
        """Recall/speed of approximate search: IVF lists probed, HNSW candidate list size."""
        if nprobe is not None:
            self.params["nprobe"] = nprobe
        if ef_search is not None:
            self.params["ef_search"] = ef_search
        set_search_params(self.faiss, self.params)

    def search(self, query: str, k: int = 5) -> list[Hit]:
        """The k chunks most similar to the query, best first."""
        return self.search_batch([query], k)[0]

    def search_batch(self, queries: list[str], k: int = 5) -> list[list[Hit]]:
        if isinstance(queries, str):
            raise TypeError("queries must be a list of strings, not a string")
        return self.search_vectors(self.embedder.embed_queries(list(queries)), k)

    def search_vectors(self, vectors, k: int = 5) -> list[list[Hit]]:
        import numpy as np

        if k < 1:
            raise UserError(f"k (chunks to retrieve) must be at least 1, got {k}")
        if not self.chunks:
            return [[] for _ in range(len(vectors))]
        scores, ids = self.faiss.search(np.ascontiguousarray(vectors, dtype=np.float32), min(k, len(self)))
        # approximate search may find fewer than k; FAISS pads with id -1
        return [[Hit(self.by_id[int(i)], float(s), r + 1) for r, (s, i) in enumerate(zip(srow, irow)) if i >= 0]
                for srow, irow in zip(scores, ids)]

    def stats(self) -> dict:
        m = self.manifest
        return {"index": str(self.dir), "model": m["model"], "kind": m["kind"], "chunks": len(self),
                "files": len(m["files"]), "chunk_tokens": m["chunk_tokens"], "overlap": m["overlap"],
                "params": self.params}


def read_manifest(index_dir: Path) -> dict:
    path = Path(index_dir) / MANIFEST
    if not path.is_file():
        raise UserError(f"{index_dir}: no retrieval index here (build one with llmcycle index PATH...)")
    try:
        manifest = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: not a readable index manifest ({exc})") from None
    if manifest.get("format") != FORMAT:
        raise UserError(f"{path}: index format {manifest.get('format')!r}, this llmcycle reads format "
                        f"{FORMAT}; build the index again")
    return manifest


def _new_generation(old: str | None) -> str:
    n = int(old.split("-")[0]) + 1 if old else 1
    return f"{n:06d}-{secrets.token_hex(3)}"


def _write_file(path: Path, write: Callable[[Path], None]) -> None:
    """Write via a temporary name, fsync, rename: a crash never leaves half a file under `path`."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.{secrets.token_hex(3)}.tmp")
    write(tmp)
    with open(tmp, "rb+") as fh:
        os.fsync(fh.fileno())
    os.replace(tmp, path)


def _commit(index_dir: Path, manifest: dict, chunks: list[Chunk], vectors, faiss_index) -> None:
    """Write a new generation, then point the manifest at it (the commit), then drop old files."""
    faiss = _faiss()
    import numpy as np

    index_dir.mkdir(parents=True, exist_ok=True)
    gen = manifest["generation"]
    atomic_write_text(index_dir / f"chunks-{gen}.jsonl",
                      "".join(json.dumps(asdict(c), ensure_ascii=False) + "\n" for c in chunks))
    def save_vectors(path: Path) -> None:
        with open(path, "wb") as fh:
            np.save(fh, vectors)

    _write_file(index_dir / f"vectors-{gen}.npy", save_vectors)
    if faiss_index is not None:
        _write_file(index_dir / f"index-{gen}.faiss", lambda p: faiss.write_index(faiss_index, str(p)))
    fsync_dir(index_dir)
    atomic_write_json(index_dir / MANIFEST, manifest)
    fsync_dir(index_dir)
    # Older generations and leftovers of an interrupted update are garbage now.
    for f in index_dir.iterdir():
        stale = re.match(r"(chunks|vectors|index)-(.+)\.(jsonl|npy|faiss)$", f.name)
        if (stale and stale.group(2) != gen) or (f.name.startswith(".") and f.name.endswith(".tmp")):
            f.unlink(missing_ok=True)


def _apply(index_dir: Path, settings: dict, old: Index | None, add: list[Document], remove: set[str],
           embedder: Embedder, *, progress: bool, extra: dict) -> dict:
    """The next state of the index: old chunks minus removed and changed sources, plus the chunks of
    `add` (embedded here, with fresh ids); written as a new generation."""
    import numpy as np

    start = time.perf_counter()
    replaced = remove | {d.source for d in add}
    if old is not None:
        keep = [i for i, c in enumerate(old.chunks) if c.source not in replaced]
        chunks, vectors = [old.chunks[i] for i in keep], old.vectors[keep]
        files = {s: f for s, f in old.manifest["files"].items() if s not in replaced}
        next_id, previous = old.manifest["next_id"], old.manifest["generation"]
    else:
        chunks, vectors, files, next_id, previous = [], np.zeros((0, embedder.dim), np.float32), {}, 0, None
    removed_chunks = (len(old) if old is not None else 0) - len(chunks)

    new: list[Chunk] = []
    for doc in add:
        spans = chunk_spans(doc.text, embedder.tokenizer, settings["chunk_tokens"], settings["overlap"])
        for number, (s, e) in enumerate(spans):
            new.append(Chunk(next_id, doc.source, number, s, e, doc.text[s:e]))
            next_id += 1
        files[doc.source] = {"sha256": doc.sha256, "size": doc.size, "chunks": len(spans)}
    embed_start = time.perf_counter()
    with bar(len(new), "embedding chunks", enabled=progress and bool(new), unit="chunk") as advance:
        new_vectors = embedder.embed([c.text for c in new], progress=advance)
    embed_s = time.perf_counter() - embed_start
    chunks += new
    vectors = np.concatenate([vectors, new_vectors]) if len(new) else vectors

    kind = resolve_kind(settings["kind"], len(chunks), settings["approximate_above"]) if chunks else "flat"
    faiss_index, built_on, structure = None, len(chunks), "exact"
    if kind != "flat":
        # Additions extend an approximate structure in place; removals (HNSW cannot delete, and IVF's
        # deletions do not mix with an id map) and doubling since training (stale IVF lists) rebuild it.
        old_built_on = old.manifest.get("built_on", 0) if old is not None else 0
        if (old is not None and old.kind == kind and removed_chunks == 0 and len(chunks) <= 2 * old_built_on
                and old.manifest["params"] == settings["params"]):
            faiss_index, built_on, structure = old.faiss, old_built_on, "extended"
            if new:
                faiss_index.add_with_ids(new_vectors, np.asarray([c.id for c in new], dtype=np.int64))
        else:
            faiss_index, structure = build_faiss(vectors, [c.id for c in chunks], kind, settings["params"]), "built"
    manifest = {"format": FORMAT, **settings, "kind": kind, "dim": embedder.dim, "next_id": next_id,
                "generation": _new_generation(previous), "chunks": len(chunks), "built_on": built_on,
                "files": files, "updated": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    _commit(index_dir, manifest, chunks, vectors, faiss_index)
    seconds = time.perf_counter() - start
    return {"index": str(index_dir), "kind": kind, "structure": structure, "files_indexed": len(add),
            "files_removed": len(remove), "chunks_added": len(new), "chunks_removed": removed_chunks,
            "chunks_total": len(chunks), "files_total": len(files), "seconds": round(seconds, 3),
            "embed_seconds": round(embed_s, 3),
            "chunks_per_s": round(len(new) / seconds, 1) if new and seconds else None, **extra}


def _read_all(files: list[Path]) -> tuple[list[Document], list[dict]]:
    docs, skipped = [], []
    for f in files:
        try:
            docs.append(read_document(f))
        except _Skip as reason:
            skipped.append(_skip_warning(f, str(reason)))
    return docs, skipped


def build_index(paths, index_dir, *, model: str = DEFAULT_EMBEDDER, chunk_tokens: int = 200,
                overlap: int = 40, kind: str = "auto", approximate_above: int = APPROXIMATE_ABOVE,
                params: dict | None = None, progress: bool = True) -> dict:
    """Index the documents under `paths` from scratch into `index_dir`; an index already there is
    replaced (atomically: until the new one is complete, the old one stays readable). Returns stats."""
    index_dir = Path(index_dir)
    resolve_kind(kind, 0, approximate_above)  # an unknown kind fails before any work
    unknown = set(params or {}) - set(DEFAULT_PARAMS)
    if unknown:
        key = sorted(unknown)[0]
        raise UserError(f"unknown index parameter '{key}'{suggest(key, DEFAULT_PARAMS)} "
                        f"(known: {', '.join(DEFAULT_PARAMS)})")
    files = find_files(paths, exclude=index_dir.resolve())
    embedder = load_embedding_model(model)
    check_chunking(chunk_tokens, overlap, embedder)
    docs, skipped = _read_all(files)
    if not docs:
        raise UserError(f"no readable documents in {', '.join(map(str, paths))}: all {len(files)} "
                        f"file(s) were skipped ({skipped[0]['path']}: {skipped[0]['reason']}, ...)")
    settings = {"model": _model_ref(model), "chunk_tokens": chunk_tokens, "overlap": overlap, "kind": kind,
                "approximate_above": approximate_above, "params": {**DEFAULT_PARAMS, **(params or {})}}
    return _apply(index_dir, settings, None, docs, set(), embedder, progress=progress,
                  extra={"files_unchanged": 0, "skipped": skipped})


def _sources_under(files: dict, path) -> set[str]:
    target = Path(path).resolve()
    return {s for s in files if Path(s) == target or Path(s).is_relative_to(target)}


def update_index(paths, index_dir, *, model: str | None = None, chunk_tokens: int | None = None,
                 overlap: int | None = None, kind: str | None = None, approximate_above: int | None = None,
                 progress: bool = True) -> dict:
    """Bring the index up to date with `paths`: new and changed files are (re-)embedded, files that
    were indexed under a named folder (or named themselves) and are gone lose their chunks, unchanged
    files keep theirs and their ids. Builds the index when there is none yet."""
    index_dir = Path(index_dir)
    if not (index_dir / MANIFEST).exists():
        return build_index(paths, index_dir, model=model or DEFAULT_EMBEDDER, chunk_tokens=chunk_tokens or 200,
                           overlap=40 if overlap is None else overlap, kind=kind or "auto",
                           approximate_above=approximate_above or APPROXIMATE_ABOVE, progress=progress)
    old = Index.load(index_dir)
    m = old.manifest
    for key, value in (("model", model and _model_ref(model)), ("chunk_tokens", chunk_tokens),
                       ("overlap", overlap)):
        if value is not None and value != m[key]:
            raise UserError(f"{index_dir}: the index was built with {key} {m[key]!r}, not {value!r}; "
                            "build it anew (build_index) to change it")
    settings = {k: m[k] for k in ("model", "chunk_tokens", "overlap", "kind", "approximate_above", "params")}
    if kind is not None:
        resolve_kind(kind, 0, 0)
        settings["kind"] = kind
    if approximate_above is not None:
        settings["approximate_above"] = approximate_above

    if isinstance(paths, (str, Path)):
        paths = [paths]
    remove: set[str] = set()
    for p in map(Path, paths):
        if not p.exists():
            gone = _sources_under(m["files"], p)
            if not gone:
                raise UserError(f"{p}: no such file or folder, and nothing indexed under it")
            remove |= gone
    present = [Path(p) for p in paths if Path(p).exists()]
    found = {str(f.resolve()): f for f in find_files(present, exclude=index_dir.resolve(), allow_empty=True)}
    for p in present:
        remove |= {s for s in _sources_under(m["files"], p) if s not in found}

    add, skipped, unchanged = [], [], 0
    for source, f in found.items():
        known = m["files"].get(source)
        if known is not None and known["sha256"] == _sha256(f):
            unchanged += 1
            continue
        try:
            add.append(read_document(f))
        except _Skip as reason:
            skipped.append(_skip_warning(f, str(reason)))
            if known is not None:
                remove.add(source)  # the file changed into something unreadable: its old text is gone
    extra = {"files_unchanged": unchanged, "skipped": skipped}
    if not add and not remove and settings == {k: m[k] for k in settings}:
        return {"index": str(index_dir), "kind": m["kind"], "structure": "unchanged", "files_indexed": 0,
                "files_removed": 0, "chunks_added": 0, "chunks_removed": 0, "chunks_total": len(old),
                "files_total": len(m["files"]), "seconds": 0.0, "embed_seconds": 0.0, "chunks_per_s": None,
                **extra}
    return _apply(index_dir, settings, old, add, remove, old.embedder, progress=progress, extra=extra)


def remove_from_index(index_dir, paths, *, progress: bool = False) -> dict:
    """Drop the chunks of the named files (or of every file indexed under a named folder)."""
    index_dir = Path(index_dir)
    old = Index.load(index_dir)
    remove: set[str] = set()
    for p in ([paths] if isinstance(paths, (str, Path)) else paths):
        gone = _sources_under(old.manifest["files"], p)
        if not gone:
            known = [Path(s).name for s in old.manifest["files"]]
            raise UserError(f"{p}: not in the index {index_dir}{suggest(Path(p).name, known)}")
        remove |= gone
    settings = {k: old.manifest[k] for k in ("model", "chunk_tokens", "overlap", "kind", "approximate_above",
                                             "params")}
    return _apply(index_dir, settings, old, [], remove, old.embedder, progress=progress,
                  extra={"files_unchanged": len(old.manifest["files"]) - len(remove), "skipped": []})


def _sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as fh:
        for block in iter(lambda: fh.read(1 << 20), b""):
            h.update(block)
    return h.hexdigest()
