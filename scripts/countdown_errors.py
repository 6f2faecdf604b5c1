"""What goes wrong in countdown solutions: an invalid line while the target was still reachable (reward=rule
flags the critical line) vs a valid line that doomed the target first (rule flags a later line or only the
answer; only Monte-Carlo values can find the critical line). Prints ONE JSON line per file.

    python scripts/countdown_errors.py RUN_DIR/pairs.jsonl            (the rejected sides of a run's pairs)
    python scripts/countdown_errors.py RUN_DIR/samples_before.jsonl   (saved eval generations)

Credit assignment can only beat the rule checker on the doomed share: measure it before a sweep.
With pairs scored by reward=rollout it also reports how often the rollout's critical step (largest
value drop) is the first invalid or first dooming line, and how often no value drops at all
(`<kind>/rollout_no_drop`: the advantage weighting then puts no weight on the rejected side).
"""

from __future__ import annotations

import json
import sys
from collections import Counter
from pathlib import Path

from stepdpo.countdown import ANSWER_RE, check_steps, exact_values
from stepdpo.weights import advantage


def classify(meta: dict, steps: list[str]) -> tuple[str, int | None]:
    """("correct" | "invalid" | "doomed" | "other", the critical line): the first line whose exact value
    (`countdown.exact_values`, reward=solver) is 0. "doomed" when that line is valid arithmetic that made the
    target unreachable (reward=rule flags a later line, or only the answer line); "invalid" when it is an invalid
    line while the target was still reachable; "other" when only the answer line is wrong."""
    scores, values = check_steps(meta, steps), exact_values(meta, steps)
    at = next((i for i, v in enumerate(values) if v < 1), None)
    if at is None:
        return ("correct", None) if scores else ("other", None)
    if at == len(steps) - 1 and ANSWER_RE.match(steps[at]):
        return "other", None
    return ("doomed" if scores[at] == 1 else "invalid"), at


def rollout_critical(value_before: float, rejected_scores: list[float]) -> int | None:
    """The rejected continuation's critical step under reward=rollout, counted from its start: the step
    `trainer.weighting=advantage` gives the rejected side's weight to (its largest value drop), or None when
    that scheme weighs no step (no value drops, e.g. a policy that never reaches the target)."""
    _, rw = advantage([], rejected_scores, value_before=value_before)
    return next((i for i, w in enumerate(rw) if w > 0), None)


def main(path: str) -> dict:
    rows = [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]
    c: Counter = Counter()
    for r in rows:
        if "rejected" in r:  # a pair: classify its rejected solution
            steps, meta = r["prefix"] + r["rejected"], r["meta"]
        else:  # an eval record
            steps, meta = r["steps"], r["meta"]
        if meta.get("kind") != "countdown":
            continue
        kind, at = classify(meta, steps)
        c[kind] += 1
        rs, v = r.get("rejected_scores"), r.get("meta", {}).get("value_before")
        if kind in ("invalid", "doomed") and rs and v is not None:  # rollout-scored pair: where is the largest drop?
            crit = rollout_critical(v, rs)
            if crit is None:  # no value drops (e.g. V = 0 from the start): trainer.weighting=advantage weighs nothing
                c[f"{kind}/rollout_no_drop"] += 1
            else:
                c[f"{kind}/rollout_critical_at_that_line"] += len(r["prefix"]) + crit == at
    return {"file": path, "n": sum(c[k] for k in ("correct", "invalid", "doomed", "other")), **dict(c)}


if __name__ == "__main__":
    for p in sys.argv[1:] or ["-h"]:
        if p in ("-h", "--help"):
            print(__doc__)
            sys.exit(0)
        print(json.dumps(main(p)))
