"""Where Monte-Carlo credit lands on the rejected sides, against the rule checker's first error. Prints ONE JSON line.

    python scripts/credit_agreement.py RULE_RUN_DIR ROLLOUT_RUN_DIR

The two runs are arms of one seed of a credit experiment (`experiment=credit_arith`, `credit_countdown*`): with
`pairs=outcome` they train on the same pairs, scored once by `reward=rule` and once by `reward=rollout`. For each
rejected side it takes the step `trainer.weighting=advantage` weighs (the largest value drop, `stepdpo.weights`) and
reports the shares of pairs where the value before the rejected side is already 0, where no value drops (the side
gets no weight), and where the largest drop is at, before or after the first line the rule scores below 1.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from stepdpo.weights import advantage


def main(rule_dir: str, rollout_dir: str) -> dict:
    def read(d: str) -> list[dict]:
        return [json.loads(line) for line in Path(d, "pairs.jsonl").read_text().splitlines() if line.strip()]

    rule = {r["id"]: r for r in read(rule_dir)}
    rows = read(rollout_dir)
    counts = dict.fromkeys(("value_before_0", "no_drop", "at_first_error", "before_it", "after_it"), 0)
    weight = 0.0
    for r in rows:
        if r["id"] not in rule:
            raise SystemExit(f"{rollout_dir}/pairs.jsonl: pair {r['id']} is not in {rule_dir}/pairs.jsonl "
                             "(compare two arms of the same seed, built with pairs=outcome)")
        value_before = r["meta"]["value_before"]
        _, rw = advantage(r["chosen_scores"], r["rejected_scores"], value_before=value_before)
        first = next((i for i, s in enumerate(rule[r["id"]]["rejected_scores"]) if s < 1), len(rw))
        counts["value_before_0"] += value_before == 0
        weight += sum(rw)  # one step at most carries weight: the largest drop
        j = next((i for i, w in enumerate(rw) if w > 0), None)
        counts["no_drop" if j is None else "at_first_error" if j == first else "before_it" if j < first
               else "after_it"] += 1
    n = max(len(rows), 1)
    return {"pairs": len(rows), **{k: round(v / n, 3) for k, v in counts.items()},
            "mean_rejected_weight": round(weight / n, 3)}


if __name__ == "__main__":
    if len(sys.argv) != 3:
        raise SystemExit(__doc__)
    print(json.dumps(main(sys.argv[1], sys.argv[2])))
