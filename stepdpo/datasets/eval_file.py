"""A standard held-out test file for any dataset: `eval_problems_from(path)` reads GSM8K-, MATH- or
PRM800K-layout JSONL, telling the layout apart by its first row.

Its own module so that `common.py` (the helpers every loader imports) imports no loader. The pair
datasets (prm800k, step_dpo, pairs_file) call it for their `eval_path`; prm800k imports it inside
`load`, since this module reads PRM800K-layout files with prm800k's reader.
"""

from __future__ import annotations

from pathlib import Path

from ..data import Problem, read_jsonl
from . import gsm8k, math, prm800k
from .common import InvalidRows, pick_file, resolve_path, subsample


def eval_problems_from(path: str, *, n: int | None, seed: int, on_invalid: str, key: str = "dataset.eval_path",
                       single_line: bool = True) -> list[Problem]:
    """Held-out problems from a GSM8K-, MATH- or PRM800K-layout JSONL, told apart by its first row.

    This lets pair datasets (PRM800K, Step-DPO, your pair file) report accuracy on a standard
    test set, e.g. `dataset.eval_path=../shared/data/math500/test.jsonl`.
    """
    p = resolve_path(path, key)
    if p.is_dir():
        p = pick_file(p, ("test.jsonl",), key)
    first = next((row for _, row in _first_rows(p)), None)
    if first is None:
        raise ValueError(f"{p}: no rows; {key} must be a JSONL file of problems")
    if isinstance(first.get("question"), dict):
        read = prm800k.read_problems
    elif "problem" in first:
        read = math.read_problems
    elif "question" in first and "answer" in first:
        read = gsm8k.read_problems
    else:
        raise ValueError(f"{p}:1: can't tell the layout from keys {sorted(first)}; {key} needs GSM8K "
                         "(question, answer with '#### x'), MATH (problem, solution, answer) or PRM800K rows")
    invalid = InvalidRows(on_invalid, str(p))
    probs = read(p, invalid, split="eval", single_line=single_line)
    invalid.log()
    return subsample(probs, n, seed, "eval")


def _first_rows(path: Path, k: int = 1):
    for i, item in enumerate(read_jsonl(path)):
        if i >= k:
            return
        yield item


def train_and_eval(problems: list[Problem], eval_path: str, *, seed: int, on_invalid: str,
                   single_line: bool = True) -> tuple[list[Problem], list[Problem]]:
    """(train, eval) for a pair dataset evaluated on a standard test file: the eval problems from
    `eval_path`, and `problems` without any whose question the test file holds."""
    ev = eval_problems_from(eval_path, n=None, seed=seed, on_invalid=on_invalid, single_line=single_line)
    held = {p.question for p in ev}
    return [p for p in problems if p.question not in held], ev
