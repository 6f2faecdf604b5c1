"""`dataset=countdown`: a built-in task where a step can be valid and still doom the solution.

    Question: Make 46 from 3, 7, 25. Use each number once with + - *.
    Answer:
    7 * 3 = 21
    21 + 25 = 46
    The answer is 46

A first line "25 - 7 = 18" is exact arithmetic on available numbers, and it dooms the solution:
from {3, 18} no operation makes 46.

A problem is a multiset of numbers and a target. A solution combines two available numbers per line,
"a op b = c" (op in the problem's allowed operations; subtraction only when a >= b, so every value
stays >= 0); a and b leave the multiset and c joins it. Every number is used exactly once, so a
solution has len(numbers) - 1 lines, then "The answer is <target>".

Two different checks, on purpose:
- `check_steps` (what `reward=rule` sees): a line is right when it is valid arithmetic on numbers
  still available; the answer line when all numbers are used and the one left is the target.
- `solvable(numbers, target)` (what a Monte-Carlo value estimates): can the target still be made
  from what is available. A valid line can make it unreachable (`doomed_steps`); the rule checker
  scores that line 1 and only the final answer line 0, so credit assignment has something to find.
  `exact_values` are the solver's step values (`reward=solver`): exact credit, the bound on what any
  estimate of it can do.

Deterministic by seed. Every problem is generated from a random walk (its gold solution) and checked
with the exhaustive solver `solve`; train, eval and pool questions are disjoint. Difficulty knobs: how
many numbers, their range, the target range, the operations, and `shuffle` (False: the question lists
the numbers in the order the gold solution combines them, so the search is over operations, which the
tiny model can learn; True: over pairs too).

Because the question states the target, "The answer is <target>" alone proves nothing: a solution is
right only when every line is valid (`stepdpo.outcome.solved`, used by evaluation and rollouts).
"""

from __future__ import annotations

import random
import re
from functools import lru_cache
from typing import Sequence

from .arith import answer_only, draw_splits
from .data import DatasetBundle, Problem

OPS = {"+": lambda a, b: a + b, "-": lambda a, b: a - b, "*": lambda a, b: a * b}
STEP_RE = re.compile(r"^\s*(\d+)\s*([+\-*])\s*(\d+)\s*=\s*(-?\d+)\s*$")
ANSWER_RE = re.compile(r"^\s*The answer is\s*(-?\d+)\s*\.?\s*$")


def apply(a: int, op: str, b: int) -> int | None:
    """a op b, or None when the step is not allowed (subtraction below 0)."""
    if op == "-" and a < b:
        return None
    return OPS[op](a, b)


def _moves(nums: tuple[int, ...], ops: str):
    """Every (a, op, b, c, remaining) one line can do from the multiset `nums` (sorted tuple)."""
    seen = set()
    for i in range(len(nums)):
        for j in range(len(nums)):
            if i == j:
                continue
            a, b = nums[i], nums[j]
            for op in ops:
                if op in "+*" and a < b:  # commutative: one order is enough for the search
                    continue
                c = apply(a, op, b)
                if c is None or (a, op, b) in seen:
                    continue
                seen.add((a, op, b))
                rest = tuple(sorted(nums[:min(i, j)] + nums[min(i, j) + 1:max(i, j)] + nums[max(i, j) + 1:] + (c,)))
                yield a, op, b, c, rest


@lru_cache(maxsize=200_000)
def _solve(nums: tuple[int, ...], target: int, ops: str) -> tuple[tuple[int, str, int, int], ...] | None:
    if len(nums) == 1:
        return () if nums[0] == target else None
    for a, op, b, c, rest in _moves(nums, ops):
        tail = _solve(rest, target, ops)
        if tail is not None:
            return ((a, op, b, c),) + tail
    return None


def solve(numbers: Sequence[int], target: int, ops: str = "+-*") -> list[str] | None:
    """One solution as lines ("a op b = c", then "The answer is target"), or None if there is none.
    Exhaustive depth-first search over every pair and operation (memoised on the sorted multiset)."""
    lines = _solve(tuple(sorted(int(x) for x in numbers)), int(target), "".join(sorted(set(ops))))
    if lines is None:
        return None
    return [f"{a} {op} {b} = {c}" for a, op, b, c in lines] + [f"The answer is {int(target)}"]


def solvable(numbers: Sequence[int], target: int, ops: str = "+-*") -> bool:
    """Can `target` be made from `numbers`, using each exactly once with `ops`?"""
    return _solve(tuple(sorted(int(x) for x in numbers)), int(target), "".join(sorted(set(ops)))) is not None


def remaining_after(numbers: Sequence[int], steps: Sequence[str], ops: str = "+-*") -> list[int] | None:
    """The multiset left after valid op lines `steps`, or None if one of them is invalid."""
    avail = list(numbers)
    for s in steps:
        m = STEP_RE.match(s)
        if not m:
            return None
        a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
        if op not in ops or apply(a, op, b) != c or a not in avail:
            return None
        avail.remove(a)
        if b not in avail:
            return None
        avail.remove(b)
        avail.append(c)
    return avail


def check_steps(meta: dict, steps: list[str]) -> list[float]:
    """1.0 for each valid line, 0.0 otherwise (what `reward=rule` can see).

    An op line is valid when it reads "a op b = c" with op allowed, a and b both still available
    (two different occurrences), c = a op b, and no subtraction below 0. After an invalid line the
    claimed result is carried on (a and b removed where present, c added), so later lines are judged
    on what the solution wrote. The answer line is right when it is the line after the last number
    was combined (exactly one left), states that number, and that number is the target. A valid line
    that makes the target unreachable scores 1: see `doomed_steps`.
    """
    avail, ops, target = list(meta["numbers"]), meta["ops"], int(meta["target"])
    scores = []
    for s in steps:
        m = STEP_RE.match(s)
        if m:
            a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
            ok = len(avail) >= 2 and op in ops and apply(a, op, b) == c
            for x in (a, b):
                if x in avail:
                    avail.remove(x)
                else:
                    ok = False
            avail.append(c)
            scores.append(1.0 if ok else 0.0)
            continue
        m = ANSWER_RE.match(s)
        scores.append(1.0 if m and len(avail) == 1 and int(m[1]) == avail[0] == target else 0.0)
        avail = []  # nothing may follow the answer
    return scores


def doomed_steps(meta: dict, steps: list[str]) -> list[bool]:
    """For each op line: is it valid (so far) and yet leaves the target unreachable? (The truth that
    Monte-Carlo values estimate and the rule checker cannot see.)"""
    out = []
    for i in range(len(steps)):
        rest = remaining_after(meta["numbers"], steps[:i + 1], meta["ops"])
        out.append(rest is not None and not solvable(rest, meta["target"], meta["ops"]))
    return out


def exact_values(meta: dict, steps: list[str]) -> list[float]:
    """The solver's step values (what `reward=rollout`'s Monte-Carlo values estimate for a policy that plays
    perfectly from each prefix): V_i = 1.0 while every line so far is valid and the target can still be made from
    what is left (`solvable`), else 0.0, and 0.0 from then on; the answer line keeps 1.0 only when `check_steps`
    finds it right. So the first 0 is the critical line: the first invalid line or the valid line that dooms."""
    rule = check_steps(meta, steps)
    values, alive = [], True
    for i, s in enumerate(steps):
        alive = alive and rule[i] == 1.0
        if alive and STEP_RE.match(s):
            rest = remaining_after(meta["numbers"], steps[:i + 1], meta["ops"])
            alive = rest is not None and solvable(rest, meta["target"], meta["ops"])
        values.append(1.0 if alive else 0.0)
    return values


def question_text(numbers: Sequence[int], target: int, ops: str) -> str:
    return f"Make {target} from {', '.join(map(str, numbers))}. Use each number once with {' '.join(ops)}."


def make_problem(rng: random.Random, idx: int, *, min_numbers: int, max_numbers: int, max_number: int,
                 min_target: int, max_target: int, ops: str, split: str, shuffle: bool = True) -> Problem | None:
    """A random multiset and a random walk over it (the gold solution); None when the walk's result
    is outside [min_target, max_target] (the caller draws again). shuffle=False: the walk combines the
    first two numbers left, so the question lists the numbers in the order the gold solution uses them."""
    n = rng.randint(min_numbers, max_numbers)
    numbers = [rng.randint(1, max_number) for _ in range(n)]
    avail, steps = list(numbers), []
    while len(avail) > 1:
        i, j = rng.sample(range(len(avail)), 2) if shuffle else (0, 1)
        a, b = avail[i], avail[j]
        choices = [op for op in ops if apply(a, op, b) is not None]
        if not choices:  # only "-" allowed and a < b: take them the other way round
            a, b = b, a
            choices = [op for op in ops if apply(a, op, b) is not None]
        op = rng.choice(choices)
        c = apply(a, op, b)
        for k in sorted((i, j), reverse=True):
            avail.pop(k)
        if shuffle:
            avail.append(c)
        else:
            avail.insert(0, c)
        steps.append(f"{a} {op} {b} = {c}")
    target = avail[0]
    if not min_target <= target <= max_target:
        return None
    steps.append(f"The answer is {target}")
    return Problem(id=f"countdown-{split}-{idx}", question=question_text(numbers, target, ops), answer=str(target),
                   steps=steps, meta={"kind": "countdown", "numbers": numbers, "target": target, "ops": ops})


def load(*, n_train: int = 2000, n_eval: int = 500, n_pool: int = 0, min_numbers: int = 3, max_numbers: int = 3,
         max_number: int = 12, min_target: int = 1, max_target: int = 36, ops: str = "+-", shuffle: bool = False,
         seed: int = 0) -> DatasetBundle:
    """Disjoint eval, train and answer-only pool splits (drawn in that order, so a larger pool never
    changes train or eval). Two problems with the same numbers (in any order; in the same order when
    shuffle=False) and target count as one."""
    if n_train < 0 or n_eval < 0 or n_pool < 0:
        raise ValueError(f"dataset: n_train/n_eval/n_pool must be >= 0, got {n_train}, {n_eval}, {n_pool}")
    if not 2 <= min_numbers <= max_numbers <= 6:
        raise ValueError(f"dataset.min_numbers/max_numbers: need 2 <= min_numbers <= max_numbers <= 6, "
                         f"got {min_numbers}, {max_numbers}")
    if not ops or set(ops) - set(OPS) or len(set(ops)) != len(ops):
        raise ValueError(f"dataset.ops: {ops!r} must be a non-empty combination of '+', '-', '*' (each once)")
    if max_number < 1 or not 0 <= min_target <= max_target:
        raise ValueError(f"dataset: need max_number >= 1 and 0 <= min_target <= max_target, "
                         f"got {max_number}, {min_target}, {max_target}")
    rng = random.Random(seed)
    kw = dict(min_numbers=min_numbers, max_numbers=max_numbers, max_number=max_number, min_target=min_target,
              max_target=max_target, ops=ops, shuffle=shuffle)
    def key(p: Problem) -> tuple:  # unshuffled: the order of the numbers is part of the problem
        nums = p.meta["numbers"]
        return tuple(sorted(nums) if shuffle else nums), p.meta["target"]

    out = draw_splits({"eval": n_eval, "train": n_train, "pool": n_pool},
                      lambda split, i: make_problem(rng, i, split=split, **kw), key=key, tries_per_problem=200,
                      fail=lambda split, n: f"dataset=countdown: can't generate {n} distinct {split} problems; widen "
                                            "dataset.max_number / the target range, or allow more numbers")
    return DatasetBundle(name="countdown", train=out["train"], eval=out["eval"], answer_format="plain",
                         pool=answer_only(out["pool"]))
