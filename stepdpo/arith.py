"""`dataset=arith`: a built-in generator of multi-step arithmetic problems with checkable steps.

    Question: Start with 23, add 45, multiply by 3, subtract 17. What is the result?
    Answer:
    23 + 45 = 68
    68 * 3 = 204
    204 - 17 = 187
    The answer is 187

Every step is checkable (`check_steps`): step i is correct when it reads
"<value_{i-1}> <op_i> <operand_i> = <value_i>" with the true running values, and the last step
reads "The answer is <answer>". Deterministic by seed.
"""

from __future__ import annotations

import random
import re
from typing import Any, Callable

from .data import DatasetBundle, Problem

OPS = {"+": ("add", lambda a, b: a + b), "-": ("subtract", lambda a, b: a - b), "*": ("multiply by", lambda a, b: a * b)}
STEP_RE = re.compile(r"^\s*(-?\d+)\s*([+\-*])\s*(-?\d+)\s*=\s*(-?\d+)\s*$")
ANSWER_RE = re.compile(r"^\s*The answer is\s*(-?\d+)\s*\.?\s*$")


def make_problem(rng: random.Random, idx: int, *, min_ops: int, max_ops: int, max_operand: int,
                 max_multiplier: int, max_value: int, split: str, ops: str = "+-*") -> Problem:
    start = rng.randint(1, max(max_operand, max_value // 2))
    value, picked, steps = start, [], []
    for _ in range(rng.randint(min_ops, max_ops)):
        choices = ["+"] if "+" in ops and value < max_value else []
        if value > 1 and "-" in ops:
            choices.append("-")
        if value * 2 <= max_value and "*" in ops:
            choices.append("*")
        if not choices:
            choices = ["-"] if value > 1 else ["+"]
        op = rng.choice(choices)
        if op == "+":
            b = rng.randint(1, max(1, min(max_operand, max_value - value)))
        elif op == "-":
            b = rng.randint(1, min(max_operand, value - 1))
        else:
            b = rng.randint(2, max(2, min(max_multiplier, max_value // value)))
        new = OPS[op][1](value, b)
        steps.append(f"{value} {op} {b} = {new}")
        picked.append([op, b])
        value = new
    words = ", ".join(f"{OPS[op][0]} {b}" for op, b in picked)
    question = f"Start with {start}, {words}. What is the result?"
    steps.append(f"The answer is {value}")
    return Problem(id=f"arith-{split}-{idx}", question=question, answer=str(value), steps=steps,
                   meta={"kind": "arith", "start": start, "ops": picked})


def load(*, n_train: int = 2000, n_eval: int = 200, min_ops: int = 2, max_ops: int = 3, max_operand: int = 50,
         max_multiplier: int = 5, max_value: int = 300, ops: str = "+-*", seed: int = 0, n_pool: int = 0) -> DatasetBundle:
    """Generate disjoint train/eval splits (eval questions never appear in train), and `n_pool`
    answer-only problems (gold steps withheld) disjoint from both. The pool is drawn after train
    and eval, so its size never changes them."""
    if n_pool < 0:
        raise ValueError(f"dataset.n_pool={n_pool}: must be >= 0")
    if not 1 <= min_ops <= max_ops:
        raise ValueError(f"dataset.min_ops/max_ops: need 1 <= min_ops <= max_ops, got {min_ops}, {max_ops}")
    if not ops or set(ops) - set(OPS):
        raise ValueError(f"dataset.ops: {ops!r} must be a non-empty combination of '+', '-', '*'")
    if max_operand < 2 or max_multiplier < 2 or max_value < max_operand:
        raise ValueError("dataset: need max_operand >= 2, max_multiplier >= 2 and max_value >= max_operand")
    rng = random.Random(seed)
    kw = dict(min_ops=min_ops, max_ops=max_ops, max_operand=max_operand, max_multiplier=max_multiplier,
              max_value=max_value, ops=ops)
    out = draw_splits({"eval": n_eval, "train": n_train, "pool": n_pool},
                      lambda split, i: make_problem(rng, i, split=split, **kw), key=lambda p: p.question,
                      tries_per_problem=50,
                      fail=lambda split, n: f"dataset=arith: can't generate {n} distinct {split} problems; widen the "
                                            "ranges" + (" or lower dataset.n_pool" if split == "pool" else ""))
    return DatasetBundle(name="arith", train=out["train"], eval=out["eval"], answer_format="plain",
                         pool=answer_only(out["pool"]))


def draw_splits(sizes: dict[str, int], draw: Callable[[str, int], Problem | None], *, key: Callable[[Problem], Any],
                tries_per_problem: int, fail: Callable[[str, int], str]) -> dict[str, list[Problem]]:
    """Distinct generated problems per split, the splits filled in `sizes`' order (eval first, so the
    held-out set doesn't depend on n_train). draw(split, index) makes one candidate (None: none this
    try); key(problem) says which are the same problem across all splits. ValueError(fail(split, n))
    after tries_per_problem * n + 1000 tries for a split."""
    seen: set = set()
    out: dict[str, list[Problem]] = {split: [] for split in sizes}
    for split, n in sizes.items():
        tries = 0
        while len(out[split]) < n:
            tries += 1
            if tries > tries_per_problem * n + 1000:
                raise ValueError(fail(split, n))
            p = draw(split, len(out[split]))
            if p is None or key(p) in seen:
                continue
            seen.add(key(p))
            out[split].append(p)
    return out


def answer_only(problems: list[Problem]) -> list[Problem]:
    """The problems with their gold steps withheld (the pool: reference answers only)."""
    return [Problem(id=p.id, question=p.question, answer=p.answer, steps=[], meta=p.meta) for p in problems]


def true_values(meta: dict) -> list[int]:
    """Running values after each op: [v1, ..., vn]."""
    v, vals = meta["start"], []
    for op, b in meta["ops"]:
        v = OPS[op][1](v, b)
        vals.append(v)
    return vals


def check_steps(meta: dict, steps: list[str]) -> list[float]:
    """1.0 for each correct step, 0.0 otherwise (see the module docstring for 'correct')."""
    vals = true_values(meta)
    prev = [meta["start"]] + vals
    scores = []
    for i, s in enumerate(steps):
        ok = False
        if i < len(vals):
            m = STEP_RE.match(s)
            if m:
                a, op, b, c = int(m[1]), m[2], int(m[3]), int(m[4])
                want_op, want_b = meta["ops"][i]
                ok = a == prev[i] and op == want_op and b == want_b and c == vals[i]
        elif i == len(vals):
            m = ANSWER_RE.match(s)
            ok = bool(m) and int(m[1]) == vals[-1]
        scores.append(1.0 if ok else 0.0)
    return scores


def corrupt(problem: Problem, rng: random.Random) -> tuple[list[str], int] | None:
    """Corrupt one arithmetic step's result and carry the error through: (steps, wrong_index).

    The wrong value is used (with correct arithmetic) by every later step, so the final answer
    is wrong too. Returns None if the problem has no arithmetic step.
    """
    ops = problem.meta["ops"]
    if not ops:
        return None
    k = rng.randrange(len(ops))
    vals = true_values(problem.meta)
    delta = rng.choice([d for d in (-10, -2, -1, 1, 2, 10) if vals[k] + d >= 0] or [1])
    v = ([problem.meta["start"]] + vals)[k]
    steps = list(problem.steps[:k])
    for i in range(k, len(ops)):
        op, b = ops[i]
        new = OPS[op][1](v, b) + (delta if i == k else 0)
        steps.append(f"{v} {op} {b} = {new}")
        v = new
    steps.append(f"The answer is {v}")
    if v == vals[-1]:  # the error cancelled out (e.g. multiplied by 0): not a valid rejected sample
        return None
    return steps, k
