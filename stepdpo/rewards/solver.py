"""`reward=solver`: exact step values from the countdown solver, the bound on what step credit can do.

Monte-Carlo values (`reward=rollout`) estimate, from the policy's own continuations, whether a step prefix can
still reach the answer. On countdown an exhaustive solver knows it: V_i = 1 while every line so far is valid and
the target is still reachable, 0 from the first invalid or dooming line on (`stepdpo.countdown.exact_values`).
With `trainer.weighting=first_error` the loss sits on exactly that line; with `advantage` on the drop there. An
experiment arm with these scores measures what perfect credit on the rejected side is worth, so a shortfall of the
rollout arm can be told apart from a shortfall of step credit itself. Countdown problems only (a dataset without
a solver has no exact values): any other problem is refused before a model is loaded.
"""

from __future__ import annotations

from typing import Sequence

from .base import ScoreRequest, ScoreResult


class SolverScorer:
    name = "solver"

    def check_problems(self, problems: Sequence, *, where: str) -> None:
        """Every problem must be a countdown problem (meta kind "countdown"): refused at setup, naming one."""
        bad = [p for p in problems if (p.meta or {}).get("kind") != "countdown"]
        if bad:
            raise ValueError(f"{where}: reward=solver knows exact step values for countdown problems only, but problem "
                             f"{bad[0].id!r} is {(bad[0].meta or {}).get('kind') or 'not one'} ({len(bad)} of "
                             f"{len(problems)}); use dataset=countdown, or reward=rollout for Monte-Carlo values")

    def score_one(self, req: ScoreRequest) -> ScoreResult:
        from ..countdown import exact_values, solvable

        meta = req.meta_dict()
        if meta.get("kind") != "countdown":
            return ScoreResult(None, "solver", error="reward=solver: not a countdown problem")
        return ScoreResult(exact_values(meta, list(req.steps)), "solver:countdown",
                           prompt_value=float(solvable(meta["numbers"], meta["target"], meta["ops"])))

    def score(self, requests: Sequence[ScoreRequest]) -> list[ScoreResult]:
        return [self.score_one(r) for r in requests]
