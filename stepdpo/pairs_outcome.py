"""`pairs=outcome`: on-policy pairs chosen by outcome alone, so every reward source sees the same pairs.

The on-policy builder (`pairs=on_policy`) cuts a pair at the step its scorer flags first, so the
scorer decides which pairs exist. To compare credit assignment (which *tokens* of a pair carry the
loss) the pairs themselves must not depend on the scorer. Here:

- sample k solutions per problem from the policy;
- a sample is correct when it is right (`stepdpo.outcome.solved`) and `reward=rule` flags none of its lines
  (`stepdpo.rewards.rule.RuleScorer`: exact for arith and countdown, <<a=b>> for GSM8K);
- each distinct incorrect sample (at most `max_pairs_per_problem` per problem) is paired with the
  correct sample, or the gold solution, that shares the longest run of leading steps with it;
  prefix = those shared steps, chosen / rejected = the two rests (`align=shared`, the default: the
  rejected side starts where the two part, so its first step faces the chosen step at the same state).
  `align=none` pairs it instead with a correct solution drawn at random (seeded), prefix empty, both
  sides whole. The rejected side then keeps the steps a failed solution got right before it went wrong:
  what signed advantages (`trainer.weighting_kwargs.signed`) push up, and what an aligned pair hides in its
  prompt;
- `reject=answer` keeps only samples with a wrong answer as rejected sides (a right answer with a flagged
  line is neither side): on tasks graded by the answer (arith, GSM8K): 25-30 % of arith's rejected sides
  state the right answer (docs/experiments/credit_arith.md).
- `chosen=answer` grades by the answer alone: a right answer is correct, flagged lines or not (outcome
  supervision, the positives of rejection fine-tuning / STaR and of Setlur et al. 2024; no rule checker
  needed). Such positives can carry wrong lines ("spurious steps"); the report counts them
  (`correct_flagged`). Every incorrect sample then has a wrong answer, so `reject` changes nothing.

The pairs leave unscored, carrying their problem's meta (what the rule checker needs, e.g. countdown's
numbers and target); the pipeline scores them with the `reward` group (`finish_pairs`), so
reward=rule, reward=rollout (Monte-Carlo values) and reward=none all weight the very same pairs.
On countdown a rejected sample whose lines are all valid arithmetic but whose target was doomed by
one of them is kept (on_policy would drop it: rule flags only its answer line, and no correct
solution shares the doomed lines before it).
"""

from __future__ import annotations

import random
from collections import Counter
from typing import Sequence

from . import progress
from .data import Problem, StepPair, format_prompt, response_text
from .generation import generate, stop_from_config
from .steps import split_steps
from .outcome import solved
from .pairs import check_chosen, check_reject, check_sampling, request_for
from .weights import is_wrong


def shared_steps(a: Sequence[str], b: Sequence[str]) -> int:
    """How many leading steps a and b have in common (compared without their line breaks: sampled steps keep
    theirs, `steps.split_steps`, gold steps have none)."""
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x.strip() != y.strip()), min(len(a), len(b)))


def build_outcome_pairs(problems: Sequence[Problem], *, model, tokenizer, seed: int = 0,
                        n_problems: int = 256, k: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                        max_new_tokens: int = 96, batch_size: int = 64, max_pairs_per_problem: int = 2,
                        use_gold: bool = True, from_split: str = "train", align: str = "shared",
                        reject: str = "process", chosen: str = "process", stop: Sequence[str] = (),
                        check_annotations: bool = True, pool: Sequence[Problem] = ()) -> tuple[list[StepPair], dict]:
    """Sample, grade by outcome (answer + rule-valid lines), pair each incorrect sample with the correct
    solution sharing most leading steps (`align=shared`) or a random one, whole (`align=none`). Returns
    (unscored pairs, report). `from_split=pool` samples the answer-only `pool` problems instead of `problems`,
    as pairs=on_policy does. `reject` as in pairs=on_policy: `process`, every incorrect sample may be a rejected
    side; `answer`, only those with a wrong final answer (a right answer with a flagged line is neither chosen nor
    rejected, counted as `skipped_right_answer`). `chosen`: `process`, a correct sample has the right answer and no
    flagged line; `answer`, the right answer alone (flagged lines counted as `correct_flagged`).
    `check_annotations`: the rule checker's GSM8K `<<a=b>>` check (`reward.check_annotations` when reward=rule, so
    the pairs and their scores call the same lines wrong)."""
    from .rewards.rule import RuleScorer

    check_sampling(k=k, n_problems=n_problems, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, max_pairs_per_problem=max_pairs_per_problem, align=align,
                   use_gold=use_gold, check_annotations=check_annotations)
    check_reject(reject)
    check_chosen(chosen)
    rng = random.Random(seed)
    probs = list(pool if from_split == "pool" else problems)
    rng.shuffle(probs)
    probs = probs[:n_problems]
    with progress.bar("sampling", len(probs) * k, unit="sample", gen=True):
        samples = generate(model, tokenizer, [format_prompt(p.question, tokenizer) for p in probs],
                           max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=True,
                           temperature=temperature, top_p=top_p, num_return_sequences=k, seed=seed,
                           stop=stop_from_config(stop) or None)
    # a sample cut off at max_new_tokens is never graded into a pair side (counted, then dropped)
    steps_of = [[split_steps(c.text) for c in outs if c.finish_reason != "length"] for outs in samples]
    rule = RuleScorer(unknown_score=1.0, check_annotations=check_annotations)  # lines it can't judge are not wrong
    graded = iter(rule.score([request_for(p.question, st, p.answer, p.meta) for p, sts in zip(probs, steps_of)
                              for st in sts]))
    report: Counter = Counter(problems=len(probs), samples=len(probs) * k,
                              samples_truncated=sum(c.finish_reason == "length" for outs in samples for c in outs))
    pairs: list[StepPair] = []
    for p, sts in zip(probs, steps_of):
        lines_ok = [not any(is_wrong(s) for s in next(graded).scores) for _ in sts]  # one grade per sample, in order
        right = [bool(st) and solved(response_text(st), p.answer, p.meta) for st in sts]
        ok = right if chosen == "answer" else [v and r for v, r in zip(lines_ok, right)]
        good = [(st, "sample") for st, o in zip(sts, ok) if o]
        report["correct"] += len(good)
        report["correct_flagged"] += sum(o and not v for o, v in zip(ok, lines_ok))
        if reject == "answer":  # right answers with a flagged line: never a side (counted here, cap or not)
            report["skipped_right_answer"] += sum(r and not o for o, r in zip(ok, right))
        if use_gold and p.steps:
            good.append((list(p.steps), "gold"))
        seen: set[tuple[str, ...]] = set()
        made = 0
        for st, o, r in zip(sts, ok, right):
            if o or not st or tuple(st) in seen or made >= max_pairs_per_problem:
                continue
            if reject == "answer" and r:
                continue
            seen.add(tuple(st))
            if not good:
                report["no_chosen"] += 1
                continue
            if align == "none":
                best, src = rng.choice(good)
                n = 0
            else:
                best, src = max(good, key=lambda g: shared_steps(g[0], st))  # first of the longest shared runs
                n = shared_steps(best, st)
            if n >= len(st) or n >= len(best):  # one side would be empty
                report["skipped_empty_side"] += 1
                continue
            pairs.append(StepPair(id=f"{p.id}-o{made}", question=p.question, answer=p.answer, prefix=st[:n],
                                  chosen=best[n:], rejected=st[n:], source="outcome",
                                  meta={**p.meta, "problem_id": p.id, "chosen_from": src}))
            made += 1
        report["pairs_outcome"] += made
    report["pairs_prefix_steps"] = sum(len(q.prefix) for q in pairs)
    return pairs, dict(report)
