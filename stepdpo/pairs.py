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

The builder contract (every target of the `pairs` config group: `build_on_policy_pairs`,
`perturb.build_perturb_pairs`, `pairs_llm.build_llm_pairs`): `builder(problems, *, <its settings>,
<the runtime inputs it uses>) -> (pairs, report)`. `problems` are the dataset's training problems;
the runtime inputs a builder may name are `RUNTIME_INPUTS` (`call_builder` passes exactly those
its signature names, so a builder declares what it uses and swallows nothing); `report` is a dict
of counts for summary.json.
"""

from __future__ import annotations

import inspect
import logging
import random
from collections import Counter
from typing import Sequence

from . import progress
from .outcome import solved
from .data import Problem, StepPair, continuation_fits, format_prompt, prefix_tokens, prompt_text, response_text
from .generation import generate, stop_from_config
from .steps import split_steps
from .rewards.base import ScoreRequest, ScoreResult, StepScorer, value_before
from .weights import is_wrong

log = logging.getLogger(__name__)

REJECT_MODES = ("process", "answer")  # pairs.reject: which incorrect samples become rejected sides
CHOSEN_MODES = ("process", "answer")  # pairs.chosen (pairs=outcome): what makes a sample correct
FROM_SPLITS = ("train", "pool")  # pairs.from_split: which problems on-policy pairs are sampled on
RUNTIME_INPUTS = ("pool", "model", "tokenizer", "scorer", "seed")  # what the pipeline can hand a builder


def call_builder(builder, problems: Sequence[Problem], **runtime) -> tuple[list[StepPair], dict]:
    """Run a `pairs` group builder with the runtime inputs its signature names; check it kept the contract."""
    unknown = set(runtime) - set(RUNTIME_INPUTS)
    assert not unknown, f"not runtime inputs: {unknown}"
    params = inspect.signature(builder).parameters
    res = builder(problems, **{k: v for k, v in runtime.items() if k in params})
    if not (isinstance(res, tuple) and len(res) == 2 and isinstance(res[0], list) and isinstance(res[1], dict)):
        raise TypeError(f"pairs builder {getattr(builder, 'func', builder)!r} must return (pairs, report), "
                        f"got {type(res).__name__}")
    return res


def check_from_split(split: str, pool: Sequence[Problem] | None = None, *, dataset: str = "") -> None:
    """pairs.from_split is train or pool; pool needs answer-only problems (pass `pool` to check that)."""
    if split not in FROM_SPLITS:
        raise ValueError(f"pairs.from_split={split!r}: choose train (the SFT problems) or pool (answer-only)")
    if split == "pool" and pool is not None and not pool:
        raise ValueError(f"pairs.from_split=pool, but dataset={dataset or '?'} has no answer-only pool problems: "
                         "set dataset.n_pool (arith, gsm8k) or pairs.from_split=train")


def check_reject(reject: str) -> None:
    if reject not in REJECT_MODES:
        raise ValueError(f"pairs.reject={reject!r}: choose one of {', '.join(REJECT_MODES)}")


def check_chosen(chosen: str) -> None:
    if chosen not in CHOSEN_MODES:
        raise ValueError(f"pairs.chosen={chosen!r}: choose one of {', '.join(CHOSEN_MODES)} (answer: the right answer "
                         "alone makes a sample correct; process: also no line reward=rule flags)")


ALIGN_MODES = ("shared", "none")  # pairs.align (pairs=outcome)
_COUNT = (lambda v: isinstance(v, int) and v >= 1, "an integer >= 1")
SAMPLING_RULES = {  # the on-policy samplers' settings (pairs=on_policy|outcome), checked with the config and by them
    "k": _COUNT, "n_problems": _COUNT, "max_pairs_per_problem": _COUNT, "max_new_tokens": _COUNT, "batch_size": _COUNT,
    "temperature": (lambda v: v > 0, "> 0 (pairs are sampled)"), "top_p": (lambda v: 0 < v <= 1, "in (0, 1]"),
}
SAMPLING_FLAGS = ("use_gold", "check_annotations")  # switches: true or false (a string "no" would read as true)


def check_sampling(**settings) -> None:
    """`pairs.<key>=value` is refused, naming the key, unless SAMPLING_RULES allow it; `align` must be ALIGN_MODES;
    SAMPLING_FLAGS must be booleans."""
    for key, v in settings.items():
        if key == "align":
            if v not in ALIGN_MODES:
                raise ValueError(f"pairs.align={v!r}: choose one of {', '.join(ALIGN_MODES)}")
            continue
        if key in SAMPLING_FLAGS:
            if not isinstance(v, bool):
                raise ValueError(f"pairs.{key}={v!r}: must be true or false")
            continue
        ok, want = SAMPLING_RULES[key]
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not ok(v):
            raise ValueError(f"pairs.{key}={v!r}: must be {want}")


def check_resample(k: int, temperature: float) -> None:
    if k < 0:
        raise ValueError(f"pairs.resample_k={k}: must be >= 0 (0 = off; e.g. 4 continuations per rejected prefix)")
    if k and temperature <= 0:
        raise ValueError(f"pairs.resample_temperature={temperature}: must be > 0 (continuations are sampled)")


def answer_right(steps: Sequence[str], answer: str, meta: dict | None = None) -> bool:
    """Is the sampled solution right: `outcome.solved`, the check evaluation and rollouts use (on countdown, whose
    question states the target, its lines must be valid too)."""
    return bool(steps) and solved(response_text(steps), answer, meta)


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

        out += build_perturb_pairs(other, seed=rng.randrange(2**31), max_pairs=n)[0]
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
                            rejected_scores=[0.0] * len(steps[k:]), source="perturb", meta={**p.meta, "problem_id": p.id}))  # the problem's meta: reward=rule re-checks the steps
    return out[:n]


def build_on_policy_pairs(problems: Sequence[Problem], *, model, tokenizer, scorer: StepScorer, seed: int = 0,
                          pool: Sequence[Problem] | None = None, from_split: str = "train",
                          n_problems: int = 256, k: int = 8, temperature: float = 1.0, top_p: float = 1.0,
                          max_new_tokens: int = 96, batch_size: int = 64, max_pairs_per_problem: int = 2,
                          min_pairs: int = 0, topup_problems: Sequence[Problem] | None = None,
                          reject: str = "process", resample_k: int = 0, resample_temperature: float = 0.7,
                          stop: Sequence[str] = ()) -> tuple[list[StepPair], dict]:
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
    Samples on `problems`, or with `from_split="pool"` on `pool` (answer-only problems).
    Tops up with `corrupt_pairs` of `topup_problems` (default: `problems`; only those with gold
    steps can be corrupted) when sampling yields fewer than `min_pairs`. Returns (pairs,
    report) where the report counts samples, correct samples, pairs by kind and top-ups.
    """
    check_from_split(from_split, pool if from_split == "pool" else None)
    check_reject(reject)
    check_resample(resample_k, resample_temperature)
    check_sampling(k=k, n_problems=n_problems, temperature=temperature, top_p=top_p, max_new_tokens=max_new_tokens,
                   batch_size=batch_size, max_pairs_per_problem=max_pairs_per_problem)
    rng = random.Random(seed)
    probs = list(pool if from_split == "pool" else problems)
    rng.shuffle(probs)
    probs = probs[:n_problems]
    bar = progress.bar("sampling", len(probs) * k, unit="sample", on_outputs=progress.samples_so_far(
        [(p.answer, p.meta) for p in probs], lambda t, gold: answer_right(split_steps(t), *gold), max_pairs_per_problem))
    samples = generate(model, tokenizer, [format_prompt(p.question, tokenizer) for p in probs], max_new_tokens=max_new_tokens,
                       batch_size=batch_size, do_sample=True, temperature=temperature, top_p=top_p,
                       num_return_sequences=k, seed=seed, stop=stop_from_config(stop) or None)
    # a sample cut off at max_new_tokens is never graded, chosen or rejected: it is counted (`samples_truncated`)
    steps_of = [[None if c.finish_reason == "length" else split_steps(c.text) for c in outs] for outs in samples]
    reqs = [request_for(p.question, st, p.answer, p.meta) for p, sts in zip(probs, steps_of) for st in sts
            if st is not None]
    results = scorer.score(reqs)
    report: Counter = Counter(problems=len(probs), samples=sum(map(len, samples)),
                              samples_truncated=sum(st is None for sts in steps_of for st in sts))
    pairs: list[StepPair] = []
    orphans: list[tuple[Problem, list[str], ScoreResult, int]] = []  # rejected samples without a chosen side
    it = iter(results)
    for p, sts in zip(probs, steps_of):
        graded: list[tuple[list[str], ScoreResult, bool]] = []
        for st in sts:
            if st is None:
                continue
            r = next(it)
            if r.scores is None:
                report["score_failed"] += 1
                continue
            ok = answer_right(st, p.answer, p.meta)
            if ok and reject == "answer" and any(is_wrong(s) for s in r.scores):
                report["skipped_right_answer"] += 1
                continue
            graded.append((st, r, ok and r.first_error is None))
        good = [g for g in graded if g[2]]
        report["correct"] += len(good)
        seen: set[str] = set()
        made = pending = 0  # pairs, and rejected samples left for resample_chosen (both count to the cap)
        for st, r, ok in graded:
            if ok or not st or made + pending >= max_pairs_per_problem or response_text(st) in seen:
                continue
            seen.add(response_text(st))
            fe = r.first_error
            if fe is None:  # final answer wrong but no step flagged: blame the last step
                fe = len(st) - 1
            prefix = st[:fe]
            chosen = None
            for cst, cr, _ in good:
                if cst[:fe] == prefix and len(cst) > fe:
                    chosen, cs = cst[fe:], cr.scores[fe:]
                    break
            if chosen is None and [s.strip() for s in prefix] == p.steps[:fe] and len(p.steps) > fe:  # gold: "\n" joins
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
                                 batch_size=batch_size, seed=seed + 7919, report=report, stop=stop)
    if len(pairs) < min_pairs:
        gold = [p for p in (problems if topup_problems is None else topup_problems) if p.steps]
        want = min_pairs - len(pairs)
        top = corrupt_pairs(gold, want, rng)
        report["pairs_perturb_topup"] = len(top)
        if len(top) < want:  # say so: the rules only know the arith task and GSM8K's "<<a=b>>" annotations
            usable = sum(p.meta.get("kind") == "arith" or any("<<" in s for s in p.steps) for p in gold)
            report["pairs_topup_short"] = want - len(top)
            log.warning("pairs.min_pairs=%d: the top-up added %d of %d pairs: rule-based corruption needs the arith "
                        "task or GSM8K '<<a=b>>' annotations, and %d of %d gold solutions have them (MATH has none); "
                        "lower pairs.min_pairs, sample more (pairs.k, pairs.n_problems), or use pairs=llm",
                        min_pairs, len(top), want, usable, len(gold))
        pairs += top
    bar.set(pairs=len(pairs))  # graded: the pairs found
    bar.close()
    return pairs, dict(report)


def resample_chosen(orphans, *, model, tokenizer, scorer: StepScorer, k: int, temperature: float, top_p: float,
                    max_new_tokens: int, batch_size: int, seed: int, report: Counter,
                    stop: Sequence[str] = ()) -> list[StepPair]:
    """Step-DPO's chosen sides: for each (problem, rejected steps, their scores, first error fe),
    sample k continuations of the correct prefix steps[:fe] and pair the first one graded correct."""
    prompts = [prompt_text(p.question, st[:fe], tokenizer) for p, st, _, fe in orphans]
    used = [prefix_tokens(tokenizer, st[:fe]) for _, st, _, fe in orphans]
    with progress.bar("resampling", len(prompts) * k, unit="sample", gen=True):
        conts = generate(model, tokenizer, prompts, max_new_tokens=max(1, max_new_tokens - min(used, default=0)),
                         batch_size=batch_size, do_sample=True, temperature=temperature, top_p=top_p,
                         num_return_sequences=k, seed=seed, stop=stop_from_config(stop) or None)
    # prefix + continuation is a whole solution within max_new_tokens, or it is counted and never chosen
    fulls = [[st[:fe] + split_steps(c.text) if continuation_fits(c, u, max_new_tokens) else None for c in outs]
             for (p, st, _, fe), u, outs in zip(orphans, used, conts)]
    results = iter(scorer.score([request_for(p.question, f, p.answer, p.meta)
                                 for (p, *_), fs in zip(orphans, fulls) for f in fs if f is not None]))
    report["resample_prefixes"] += len(orphans)
    report["resample_samples"] += len(orphans) * k
    report["resample_truncated"] += sum(f is None for fs in fulls for f in fs)
    pairs = []
    for (p, st, r, fe), fs in zip(orphans, fulls):
        chosen = None
        for f in fs:
            if f is None:
                continue
            res = next(results)
            if (chosen is None and res.scores is not None and len(f) > fe and f[fe:] != st[fe:]
                    and answer_right(f, p.answer, p.meta) and res.first_error is None):
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


def check_own_scores(pairs: Sequence[StepPair], scorer: StepScorer, *, reward: str) -> None:
    """A pairs file's own step scores are never replaced without being asked: with a reward that scores
    (anything but reward=prm800k, which keeps labels), a file row that carries scores stops the run,
    naming the row and the two fixes. Rows without scores are scored by the reward as usual."""
    if getattr(scorer, "uses_labels", False):
        return
    for p in pairs:
        if p.source == "file" and (p.chosen_scores is not None or p.rejected_scores is not None):
            raise ValueError(f"{p.meta.get('where', p.id)}: the pairs file carries its own step scores "
                             f"('chosen_scores'/'rejected_scores') and {reward} would replace them: add "
                             "reward=prm800k to train on the file's scores, or dataset.rescore=true to score "
                             f"every pair with {reward}")


def no_pairs_message(report: dict, *, source: str | None, builder: str, reward: str) -> str:
    """One line for a round that ends with no usable pair: where they came from, the counts, the fix."""
    counts = ", ".join(f"{k}={v}" for k, v in report.items()
                       if isinstance(v, int) and not isinstance(v, bool) and v and k not in ("max_length", "pairs"))
    head = f"{source}: no usable pairs" if source else f"{builder}: no usable pairs were built"
    if report.get("dropped_unlabelled"):
        fix = (f"{reward} keeps only pairs that carry 'chosen_scores' and 'rejected_scores': add them to the rows "
               "(spelled exactly so), or let a reward score them (e.g. reward=rule)")
    elif report.get("dropped"):
        first = next(iter(report.get("examples", {}).values()), [""])[0]
        fix = f"every pair was dropped by validation; first: {first}"
    elif report.get("score_failed"):
        fix = f"{reward} failed to score every pair (see the log for reasons)"
    elif source:
        fix = "the file has no pair rows; add one JSON object per line with prompt, chosen, rejected"
    elif builder == "pairs=outcome":  # its knobs: no min_pairs top-up
        fix = "sample more (pairs.k, pairs.n_problems, pairs.temperature)" + (
            "; no problem had a correct sample to pair with: pairs.use_gold=true, or pairs.chosen=answer"
            if report.get("no_chosen") else "")
    else:
        fix = "sample more (pairs.k, pairs.n_problems) or top up with rule-based pairs (pairs.min_pairs)"
    return f"{head} ({counts or 'nothing read'}): {fix}"
