"""Preference pairs: on-policy sampling graded step by step (the Step-DPO recipe), rule-based
corruption as a top-up, and scoring of pairs that arrive without scores.

A pair is (prompt + shared prefix steps, chosen continuation, rejected continuation). For an
incorrect sample whose first wrong step is k, the prefix is its steps before k (all judged
correct), the rejected continuation is its steps from k on, and the chosen continuation is a
correct sample's (or the gold solution's) steps from k on, provided its first k steps are the
same text as the prefix; otherwise the pair is a whole-solution pair (empty prefix).
With `resample_k` > 0, an incorrect sample that has no such chosen side gets one the Step-DPO way:
the policy continues its correct prefix `resample_k` times, and the first continuation that is
correct step by step and reaches the answer becomes the chosen side (answer-only problems then
give pairs even where none of the k samples was right).
"""

from __future__ import annotations

import logging
import random
from collections import Counter
from typing import Sequence

from .answers import answers_match, extract_answer
from .data import Problem, StepPair, format_prompt, prompt_text
from .evaluate import split_steps
from .generation import generate
from .rewards.base import ScoreRequest, ScoreResult, StepScorer, first_error_of, value_before

log = logging.getLogger(__name__)

REJECT_MODES = ("process", "answer")  # pairs.reject: which incorrect samples become rejected sides


def check_reject(reject: str) -> None:
    if reject not in REJECT_MODES:
        raise ValueError(f"pairs.reject={reject!r}: choose one of {', '.join(REJECT_MODES)}")


def check_resample(k: int, temperature: float) -> None:
    if k < 0:
        raise ValueError(f"pairs.resample_k={k}: must be >= 0 (0 = off; e.g. 4 continuations per rejected prefix)")
    if k and temperature <= 0:
        raise ValueError(f"pairs.resample_temperature={temperature}: must be > 0 (continuations are sampled)")


def answer_right(steps: Sequence[str], answer: str) -> bool:
    return bool(steps) and answers_match(extract_answer("\n".join(steps)), answer)


def request_for(problem_question: str, steps: Sequence[str], answer: str, meta: dict) -> ScoreRequest:
    return ScoreRequest(question=problem_question, steps=tuple(steps), answer=answer,
                        meta=tuple(sorted(meta.items())))


def corrupt_pairs(problems: Sequence[Problem], n: int, rng: random.Random) -> list[StepPair]:
    """Up to n pairs by corrupting one step of a correct solution and carrying the error through."""
    from . import arith

    out: list[StepPair] = []
    arith_probs = [p for p in problems if p.meta.get("kind") == "arith"]
    other = [p for p in problems if p.meta.get("kind") != "arith"]
    if other:
        from .perturb import build_perturb_pairs

        out += build_perturb_pairs(other, seed=rng.randrange(2**31), max_pairs=n)
    tries = 0
    while arith_probs and len(out) < n and tries < 20 * n:
        tries += 1
        p = rng.choice(arith_probs)
        res = arith.corrupt(p, rng)
        if res is None:
            continue
        steps, k = res
        out.append(StepPair(id=f"{p.id}-perturb{tries}", question=p.question, answer=p.answer, prefix=p.steps[:k],
                            chosen=p.steps[k:], rejected=steps[k:], chosen_scores=[1.0] * len(p.steps[k:]),
                            rejected_scores=[0.0] * len(steps[k:]), source="perturb", meta={"problem_id": p.id}))
    return out[:n]


def build_on_policy_pairs(problems: Sequence[Problem], *, model, tokenizer, scorer: StepScorer, seed: int = 0,
                          n_problems: int = 256, k: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                          max_new_tokens: int = 96, batch_size: int = 64, max_pairs_per_problem: int = 2,
                          min_pairs: int = 0, topup_problems: Sequence[Problem] | None = None,
                          from_split: str = "train", reject: str = "process", resample_k: int = 0,
                          resample_temperature: float = 0.7, **_) -> tuple[list[StepPair], dict]:
    """Sample k solutions per problem from `model`, grade them, pair correct against incorrect.

    A sample is correct when its final answer matches and no step is flagged. `reject` says which
    of the others become rejected sides: `process`, every one; `answer` (as in Step-DPO), only those
    with a wrong final answer, so a sample that reaches the right answer through a flagged step is
    neither chosen nor rejected (counted as `skipped_right_answer`).

    A problem's gold solution (if it has one) stands in as the chosen side when no sample is
    correct with the same prefix; answer-only problems (no gold steps) pair samples only. With
    `resample_k` > 0 a rejected sample still without a chosen side is continued from its prefix
    (its steps before the first error) `resample_k` times at `resample_temperature`; the first
    continuation graded correct (every step, and the answer) is its chosen side.
    Tops up with `corrupt_pairs` of `topup_problems` (default: `problems`; only those with gold
    steps can be corrupted) when sampling yields fewer than `min_pairs`. Returns (pairs,
    report) where the report counts samples, correct samples, pairs by kind and top-ups.
    """
    check_reject(reject)
    check_resample(resample_k, resample_temperature)
    rng = random.Random(seed)
    probs = list(problems)
    rng.shuffle(probs)
    probs = probs[:n_problems]
    samples = generate(model, tokenizer, [format_prompt(p.question, tokenizer) for p in probs], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, do_sample=True, temperature=temperature, top_p=top_p,
                       num_return_sequences=k, seed=seed)
    steps_of = [[split_steps(c.text) for c in outs] for outs in samples]
    reqs = [request_for(p.question, st, p.answer, p.meta) for p, sts in zip(probs, steps_of) for st in sts]
    results = scorer.score(reqs)
    report: Counter = Counter(problems=len(probs), samples=len(reqs))
    pairs: list[StepPair] = []
    orphans: list[tuple[Problem, list[str], ScoreResult, int]] = []  # rejected samples without a chosen side
    it = iter(results)
    for p, sts in zip(probs, steps_of):
        graded: list[tuple[list[str], ScoreResult, bool]] = []
        for st in sts:
            r = next(it)
            if r.scores is None:
                report["score_failed"] += 1
                continue
            ok = answer_right(st, p.answer)
            if ok and reject == "answer" and any(s < 0.5 for s in r.scores):
                report["skipped_right_answer"] += 1
                continue
            graded.append((st, r, ok and all(s >= 0.5 for s in r.scores)))
        good = [g for g in graded if g[2]]
        report["correct"] += len(good)
        seen: set[str] = set()
        made = pending = 0  # pairs, and rejected samples left for resample_chosen (both count to the cap)
        for st, r, ok in graded:
            if ok or not st or made + pending >= max_pairs_per_problem or "\n".join(st) in seen:
                continue
            seen.add("\n".join(st))
            fe = first_error_of(r.scores)
            if fe is None:  # final answer wrong but no step flagged: blame the last step
                fe = len(st) - 1
            prefix = st[:fe]
            chosen = None
            for cst, cr, _ in good:
                if cst[:fe] == prefix and len(cst) > fe:
                    chosen, cs = cst[fe:], cr.scores[fe:]
                    break
            if chosen is None and p.steps[:fe] == prefix and len(p.steps) > fe:
                chosen, cs = p.steps[fe:], [1.0] * len(p.steps[fe:])
            if chosen is None:
                if resample_k > 0:  # continue the correct prefix below, once every problem is graded
                    orphans.append((p, st, r, fe))
                    pending += 1
                continue
            pairs.append(StepPair(id=f"{p.id}-s{made}", question=p.question, answer=p.answer, prefix=prefix,
                                  chosen=chosen, rejected=st[fe:], chosen_scores=cs, rejected_scores=r.scores[fe:],
                                  source="on_policy", meta={"problem_id": p.id, "scored_by": scorer.name,
                                                            "provenance": r.provenance, **value_before(r, fe)}))
            made += 1
        report["pairs_on_policy"] += made
    if orphans:
        pairs += resample_chosen(orphans, model=model, tokenizer=tokenizer, scorer=scorer, k=resample_k,
                                 temperature=resample_temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                                 batch_size=batch_size, seed=seed + 7919, report=report)
    if len(pairs) < min_pairs:
        gold = [p for p in (problems if topup_problems is None else topup_problems) if p.steps]
        top = corrupt_pairs(gold, min_pairs - len(pairs), rng)
        report["pairs_perturb_topup"] = len(top)
        pairs += top
    return pairs, dict(report)


def resample_chosen(orphans, *, model, tokenizer, scorer: StepScorer, k: int, temperature: float, top_p: float,
                    max_new_tokens: int, batch_size: int, seed: int, report: Counter) -> list[StepPair]:
    """Step-DPO's chosen sides: for each (problem, rejected steps, their scores, first error fe),
    sample k continuations of the correct prefix steps[:fe] and pair the first one graded correct."""
    prompts = [prompt_text(p.question, st[:fe], tokenizer) for p, st, _, fe in orphans]
    conts = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, do_sample=True,
                     temperature=temperature, top_p=top_p, num_return_sequences=k, seed=seed)
    fulls = [[st[:fe] + split_steps(c.text) for c in outs] for (p, st, _, fe), outs in zip(orphans, conts)]
    results = iter(scorer.score([request_for(p.question, f, p.answer, p.meta)
                                 for (p, *_), fs in zip(orphans, fulls) for f in fs]))
    report["resample_prefixes"] += len(orphans)
    report["resample_samples"] += len(orphans) * k
    pairs = []
    for (p, st, r, fe), fs in zip(orphans, fulls):
        chosen = None
        for f in fs:
            res = next(results)
            if (chosen is None and res.scores is not None and len(f) > fe and f[fe:] != st[fe:]
                    and answer_right(f, p.answer) and all(x >= 0.5 for x in res.scores)):
                chosen, cs = f[fe:], res.scores[fe:]
        if chosen is None:
            continue
        pairs.append(StepPair(id=f"{p.id}-r{len(pairs)}", question=p.question, answer=p.answer, prefix=st[:fe],
                              chosen=chosen, rejected=st[fe:], chosen_scores=cs, rejected_scores=r.scores[fe:],
                              source="on_policy_resampled", meta={"problem_id": p.id, "scored_by": scorer.name,
                                                                  "provenance": r.provenance, **value_before(r, fe)}))
    report["pairs_resampled"] += len(pairs)
    return pairs


def score_pairs(pairs: Sequence[StepPair], scorer: StepScorer) -> tuple[list[StepPair], dict]:
    """Give every pair step scores from `scorer` (chosen and rejected, in the context of the prefix).

    Pairs already scored by this scorer are kept as they are. With a label scorer
    (`uses_labels`), pairs keep their own scores and a pair without scores is dropped and counted.
    A pair whose scoring failed is dropped and counted, never scored by default.
    """
    report: Counter = Counter()
    if getattr(scorer, "uses_labels", False):
        kept = [p for p in pairs if p.chosen_scores is not None and p.rejected_scores is not None]
        report["dropped_unlabelled"] = len(pairs) - len(kept)
        return kept, dict(report)
    todo = [p for p in pairs if p.meta.get("scored_by") != scorer.name]
    reqs = []
    for p in todo:
        reqs.append(request_for(p.question, p.prefix + p.chosen, p.answer, p.meta))
        reqs.append(request_for(p.question, p.prefix + p.rejected, p.answer, p.meta))
    results = scorer.score(reqs) if reqs else []
    failed: set[str] = set()
    for i, p in enumerate(todo):
        rc, rr = results[2 * i], results[2 * i + 1]
        if rc.scores is None or rr.scores is None:
            failed.add(p.id)
            report["score_failed"] += 1
            parts = (rc.error or rr.error or "?").split(": ")  # "<id>: <reason>: <response head>"
            report[f"score_failed/{(parts[1] if len(parts) > 1 else parts[0])[:40]}"] += 1
            continue
        n = len(p.prefix)
        p.chosen_scores, p.rejected_scores = rc.scores[n:], rr.scores[n:]
        p.meta = {**p.meta, "scored_by": scorer.name, "provenance": rc.provenance, **value_before(rc, n)}
        report["scored"] += 1
    return [p for p in pairs if p.id not in failed], dict(report)
