"""`reward=rule`: rule-based step checks, no model and no network.

- arith problems (meta kind "arith"): every step checked exactly (`stepdpo.arith.check_steps`).
- countdown problems (meta kind "countdown"): each line valid arithmetic on available numbers, the
  answer line the target (`stepdpo.countdown.check_steps`; a valid line that dooms the target scores 1).
- GSM8K-style steps with `<<a=b>>` calculator annotations: a step scores 1 when all of its
  annotations recompute, 0 otherwise (`score_gsm8k_steps`).
- the final step, whatever the dataset: its extracted answer must match the reference answer
  under math-verify; if it does not, the final step scores 0. Steps the rules cannot judge get
  `unknown_score`.
"""

from __future__ import annotations

from typing import Sequence

from ..answers import answers_match, extract_answer
from ..calculator import annotations, check_annotation
from .base import ScoreRequest, ScoreResult


def score_gsm8k_steps(steps: Sequence[str]) -> list[float]:
    """1.0 for a step whose "<<a=b>>" annotations all recompute (or that has none), else 0.0."""
    return [1.0 if all(check_annotation(e, c) for e, c in annotations(s)) else 0.0 for s in steps]


class RuleScorer:
    name = "rule"

    def __init__(self, unknown_score: float = 1.0, check_annotations: bool = True):
        if not 0.0 <= unknown_score <= 1.0:
            raise ValueError(f"reward.unknown_score must be in [0, 1], got {unknown_score}")
        self.unknown_score = unknown_score
        self.check_annotations = check_annotations

    def score_one(self, req: ScoreRequest) -> ScoreResult:
        meta = req.meta_dict()
        steps = list(req.steps)
        if meta.get("kind") == "arith":
            from ..arith import check_steps

            scores = check_steps(meta, steps)
            return ScoreResult(scores, "rule:arith")
        if meta.get("kind") == "countdown":
            from ..countdown import check_steps as check_countdown

            return ScoreResult(check_countdown(meta, steps), "rule:countdown")
        scores = [self.unknown_score] * len(steps)
        prov = "rule:answer"
        if self.check_annotations and any("<<" in s for s in steps):
            scores = [min(a, b) for a, b in zip(scores, score_gsm8k_steps(steps))]
            prov = "rule:gsm8k"
        if steps and req.answer:
            pred = extract_answer(steps[-1]) or extract_answer("\n".join(steps))
            if not answers_match(pred, req.answer):
                scores[-1] = 0.0
        return ScoreResult(scores, prov)

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return [self.score_one(r) for r in requests]
