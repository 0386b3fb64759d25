"""Every lifecycle stage, in the order `llmcycle run` walks them. Adding a stage: one line here."""
from __future__ import annotations

from llmcycle.core.errors import UserError, suggest
from llmcycle.stages import prompt, scope, select, tune
from llmcycle.stages.align import stage as align
from llmcycle.stages.contract import Stage
from llmcycle.stages.optimize import stage as optimize
from llmcycle.stages.pretrain import stage as pretrain

STAGES: tuple[Stage, ...] = (scope.STAGE, pretrain.STAGE, select.STAGE, prompt.STAGE, tune.STAGE, align.STAGE,
                             optimize.STAGE)
NAMES: tuple[str, ...] = tuple(s.name for s in STAGES)
_BY_NAME = {s.name: s for s in STAGES}


def get(name: str) -> Stage:
    if name not in _BY_NAME:
        raise UserError(f"unknown stage '{name}'{suggest(name, NAMES)} (stages: {', '.join(NAMES)})")
    return _BY_NAME[name]
