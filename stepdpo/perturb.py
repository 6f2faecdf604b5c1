"""`pairs=perturb`: rule-based preference pairs from correct GSM8K solutions.

One arithmetic step of a gold solution is corrupted: the result of one "<<a=b>>" calculator
annotation and the number shown after it change ("48/2 = <<48/2=25>>25"), then the error is
carried through: every later annotation whose expression uses a changed number is recomputed
(and its shown result updated), and later numbers that repeat a changed value are rewritten, up
to the final "#### answer", which must end up wrong. A problem is skipped when that can't be
done consistently (the value is ambiguous in the question or earlier steps, a later step computes
with it outside an annotation, the final answer does not change, a later annotation would not
recompute). The pair: prefix = gold steps before the corrupted one, chosen = the gold rest
(scores 1), rejected = the corrupted rest (scores 0 from the corrupted step on).

Problems with `meta["kind"] == "arith"` are skipped (`stepdpo.arith` corrupts those itself).
"""

from __future__ import annotations

import random
import re
from fractions import Fraction
from typing import Sequence

from .answers import answers_match, extract_answer
from .data import Problem, StepPair
from .calculator import (annotation_matches, annotations, check_annotation, evaluate_expression, format_number,
                         parse_number, strip_annotation_marks)

# a number as written in text: 1,080 | 12 | 0.5 | .5 (no sign: negatives are left alone)
_NUM = re.compile(r"(?<![\w.,])(\d{1,3}(?:,\d{3})+|\d+(?:\.\d+)?|\.\d+)(?![\w]|[.,]\d)")
# a visible computation outside annotations: "12 * 3 = 36"
_VISIBLE_EQ = re.compile(r"((?:\d[\d.,]*|\(|\))(?:\s*[-+*/x×÷()]\s*\(?\s*\d[\d.,]*\)?)+)"
                         r"\s*=\s*\$?\s*(\d[\d.,]*)(?!\s*<<)")
MAX_TRIES_PER_SITE = 3  # new values tried per annotation
MAX_TRIES_PER_PROBLEM = 12


def _numbers(text: str) -> set[Fraction]:
    out = set()
    for m in _NUM.finditer(strip_annotation_marks(text)):
        v = parse_number(m.group(1))
        if v is not None:
            out.add(v)
    return out


def _nice(v: Fraction) -> bool:
    """At most two decimals: values a GSM8K solution would write."""
    return 100 % v.denominator == 0 if v.denominator <= 100 else False


def _replace_numbers(text: str, changed: dict[Fraction, Fraction]) -> str:
    def sub(m: re.Match) -> str:
        v = parse_number(m.group(1))
        return format_number(changed[v]) if v is not None and v in changed else m.group(0)

    return _NUM.sub(sub, text)


def _visible_equations_ok(text: str) -> bool:
    """Every visible "a op b = c" outside annotations still holds (x, × and ÷ read as * and /)."""
    plain = _ANNOT.sub(" ", text)
    for m in _VISIBLE_EQ.finditer(plain):
        expr = m.group(1).replace("x", "*").replace("×", "*").replace("÷", "/")
        v, c = evaluate_expression(expr), parse_number(m.group(2))
        if v is not None and c is not None and abs(v - c) > Fraction(1, 100):
            return False
    return True


_ANNOT = re.compile(r"<<[^<>]*>>")


def _rewrite_step(step: str, changed: dict[Fraction, Fraction], *, start: int = 0) -> str | None:
    """Carry `changed` values through one later step (from character `start` on).

    Annotations whose expression uses a changed value are recomputed; their old result maps to the
    new one in `changed` (updated in place). Numbers in the text between annotations are rewritten.
    Returns None when a recomputation fails or leaves an ugly value.
    """
    out, pos = [step[:start]], start
    for a, b, expr, claimed in annotation_matches(step):
        if a < start:
            continue
        out.append(_replace_numbers(step[pos:a], changed))
        new_expr = _replace_numbers(expr, changed)
        if new_expr != expr:
            v, old = evaluate_expression(new_expr), parse_number(claimed)
            if v is None or old is None or not _nice(v) or (old >= 0 > v):
                return None
            if v != old:
                changed[old] = v
            out.append(f"<<{new_expr}={format_number(v)}>>")
        else:
            out.append(step[a:b])
        pos = b
    out.append(_replace_numbers(step[pos:], changed))
    return "".join(out)


def _candidates(old: Fraction, rng: random.Random, avoid: set[Fraction]) -> list[Fraction]:
    if old.denominator == 1:
        deltas = [1, 2, 3, 4, 5, 10, -1, -2, -3, -5, -10]
        vals = [old + d for d in deltas] + [old * 2]
    else:
        vals = [old + Fraction(1, 2), old * 2, old + 1, old - Fraction(1, 2)]
    vals = [v for v in dict.fromkeys(vals) if v != old and v > 0 and v not in avoid]
    rng.shuffle(vals)
    return vals


def corrupt_solution(question: str, steps: list[str], answer: str,
                     rng: random.Random) -> tuple[list[str], int, Fraction, Fraction] | None:
    """(corrupted steps, index of the corrupted step, old value, new value), or None if no
    annotation of this solution can be corrupted and carried through consistently."""
    if not steps or not answers_match(extract_answer("\n".join(steps)), answer):
        return None  # the gold text must state its answer ("#### x") for the wrong one to show
    q_nums = _numbers(question)
    sites = []
    for k, s in enumerate(steps):
        for a, b, expr, claimed in annotation_matches(s):
            old = parse_number(claimed)
            shown = _NUM.match(s, b)
            if old is None or old <= 0 or not check_annotation(expr, claimed) or not shown:
                continue
            if parse_number(shown.group(1)) != old:
                continue
            sites.append((k, a, b, expr, old, shown.end()))
    rng.shuffle(sites)
    all_nums = q_nums | set().union(*(_numbers(s) for s in steps))
    tries = 0
    for k, a, b, expr, old, shown_end in sites:
        if old in q_nums or any(old in _numbers(s) for s in steps[:k]):
            continue  # the same number means something else elsewhere: can't tell uses apart
        if old in _numbers(steps[k][:a]):
            continue
        for new in _candidates(old, rng, all_nums)[:MAX_TRIES_PER_SITE]:
            tries += 1
            if tries > MAX_TRIES_PER_PROBLEM:
                return None
            changed = {old: new}
            s = steps[k]
            head = s[:a] + f"<<{expr}={format_number(new)}>>" + format_number(new)
            tail = _rewrite_step(s[shown_end:], changed)
            if tail is None:
                continue
            out = list(steps[:k]) + [head + tail]
            ok = True
            for later in steps[k + 1:]:
                r = _rewrite_step(later, changed)
                if r is None or (r != later and not _visible_equations_ok(r)):
                    ok = False
                    break
                out.append(r)
            if not ok:
                continue
            if out[-1] == steps[-1]:
                break  # the error never reaches the final answer from this step: try another annotation
            if any(not check_annotation(e, c) for st in out[k + 1:] for e, c in annotations(st)):
                continue
            if check_annotation(expr, format_number(new)):
                continue
            if answers_match(extract_answer("\n".join(out)), answer):
                continue
            return out, k, old, new
    return None


def perturb_problem(p: Problem, rng: random.Random) -> StepPair | None:
    """One corrupted-step pair for a GSM8K-style problem, or None (see the module docstring)."""
    annotated = p.meta.get("annotated_steps") or p.steps
    res = corrupt_solution(p.question, list(annotated), p.answer, rng)
    if res is None:
        return None
    bad, k, old, new = res
    gold = list(annotated)
    if "annotated_steps" in p.meta and p.steps != annotated:  # the model text has annotations stripped
        gold = [strip_annotation_marks(s).strip() for s in gold]
        bad = [strip_annotation_marks(s).strip() for s in bad]
    chosen, rejected = gold[k:], bad[k:]
    if chosen == rejected:
        return None
    return StepPair(id=f"{p.id}-perturb", question=p.question, answer=p.answer, prefix=gold[:k], chosen=chosen,
                    rejected=rejected, chosen_scores=[1.0] * len(chosen), rejected_scores=[0.0] * len(rejected),
                    source="perturb", meta={"problem_id": p.id, "where": p.meta.get("where", p.id),
                                            "corrupted_step": k, "old_value": format_number(old),
                                            "new_value": format_number(new)})


def build_perturb_pairs(problems: Sequence[Problem], *, seed: int = 0,
                        max_pairs: int | None = None) -> tuple[list[StepPair], dict]:
    """At most one corrupted-step pair per problem, problems visited in a seeded order.

    `max_pairs` caps the number of pairs (None = one per usable problem). The rules need no model.
    Returns (pairs, report): problems visited, pairs made, problems with no corruptible step.
    """
    if max_pairs is not None and (isinstance(max_pairs, bool) or not isinstance(max_pairs, int) or max_pairs < 0):
        raise ValueError(f"pairs.max_pairs: must be null (no cap) or an integer >= 0, got {max_pairs!r}")
    rng = random.Random(seed)
    order = [p for p in problems if p.meta.get("kind") != "arith"]
    rng.shuffle(order)
    out: list[StepPair] = []
    visited = 0
    for p in order:
        if max_pairs is not None and len(out) >= max_pairs:
            break
        visited += 1
        pair = perturb_problem(p, rng)
        if pair is not None:
            out.append(pair)
    return out, {"problems": visited, "pairs_perturb": len(out), "skipped_no_corruption": visited - len(out)}
