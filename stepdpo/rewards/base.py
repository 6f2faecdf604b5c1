"""The one interface every reward source implements.

A scorer takes a batch of `ScoreRequest`s (question, the steps of one solution, the reference
answer) and returns one `ScoreResult` per request: a score in [0, 1] for every step, or
`scores=None` with an `error` when it could not score (that pair is then excluded and counted,
never silently scored). A step is wrong when its score is < 0.5 (`stepdpo.weights.is_wrong`).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Protocol, Sequence, runtime_checkable

from ..weights import first_wrong


@dataclass(frozen=True)
class ScoreRequest:
    question: str
    steps: tuple[str, ...]  # full solution steps (prefix + continuation)
    answer: str = ""  # reference final answer, if known
    meta: tuple[tuple[str, Any], ...] = ()  # hashable dataset metadata (e.g. arith ops)

    def meta_dict(self) -> dict[str, Any]:
        return dict(self.meta)


@dataclass
class ScoreResult:
    scores: list[float] | None  # one per step, in [0, 1]; None when scoring failed
    provenance: str = ""  # e.g. "rule:arith", "openai:gpt-4o-mini", "prm800k"
    error: str | None = None  # why scores is None
    usage: dict[str, int] = field(default_factory=dict)  # token usage, for cost accounting
    prompt_value: float | None = None  # value scorers (reward=rollout): V_0, the prompt's value before any step

    @property
    def first_error(self) -> int | None:
        """Index of the first wrong step (`weights.first_wrong`); None if all correct or scoring failed."""
        return None if self.scores is None else first_wrong(self.scores)


@runtime_checkable
class StepScorer(Protocol):
    name: str

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]: ...



def value_before(result: ScoreResult, n: int) -> dict[str, float]:
    """{"value_before": V_n} for a pair whose shared prefix is the first n steps of `result`'s solution
    (scores[n-1], or the prompt's value for n == 0), from value scorers (those that give prompt_value);
    {} from other scorers. Pairs keep it in meta for trainer.weighting=advantage."""
    if result.prompt_value is None or result.scores is None:
        return {}
    return {"value_before": float(result.scores[n - 1] if n else result.prompt_value)}
