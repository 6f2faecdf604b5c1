"""Scorers that need no judgement: `reward=none` (every step 1) and `reward=prm800k` (labels).

`LabelScorer` is for datasets whose pairs already carry human step labels (PRM800K, Step-DPO
files, user pair files with scores): the pipeline keeps those scores; asked to score a solution
without labels, it fails that request (counted), it never invents a score.
"""

from __future__ import annotations

from typing import Sequence

from .base import ScoreRequest, ScoreResult


class ConstantScorer:
    name = "none"

    def __init__(self, value: float = 1.0):
        if not 0.0 <= value <= 1.0:
            raise ValueError(f"reward.value must be in [0, 1], got {value}")
        self.value = value

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return [ScoreResult([self.value] * len(r.steps), f"constant:{self.value}") for r in requests]


class LabelScorer:
    name = "labels"
    uses_labels = True  # the pipeline keeps the pairs' own scores

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return [ScoreResult(None, error="no human labels for this solution (reward=prm800k needs labelled pairs)")
                for _ in requests]
