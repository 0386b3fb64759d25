"""The `augment:` section of the project file: retrieval and program-aided answers for the server."""
from __future__ import annotations

from pydantic import Field

from llmcycle.augment.pal import DEFAULT_SHOTS
from llmcycle.core.configbase import Section


class RagServeConfig(Section):
    index: str = Field(description="The retrieval index folder (built by `llmcycle index`), relative to the "
                       "project file.")
    k: int = Field(5, ge=1, le=100, description="Chunks retrieved per question; the lowest-ranked are "
                   "dropped whole when they do not fit the context window.")
    max_new_tokens: int = Field(128, ge=1, description="Room kept for the answer (causal models) when a "
                                "request sets no max_tokens.")


class PalServeConfig(Section):
    enabled: bool = Field(True, description="Accept requests with {\"llmcycle\": {\"mode\": \"pal\"}}.")
    timeout_s: float = Field(5.0, gt=0, le=60, description="Wall-clock limit of each program in the sandbox.")
    shots: int = Field(len(DEFAULT_SHOTS), ge=0, le=len(DEFAULT_SHOTS), description="Worked examples in "
                       "the PAL prompt (0-4); fewer fit small context windows.")


class AugmentConfig(Section):
    rag: RagServeConfig | None = Field(None, description="Answer chat completions from a retrieval index.")
    pal: PalServeConfig | None = Field(None, description="Answer math by running the model's program.")
