"""`dataset=math`: MATH (Hendrycks et al., 2021) and MATH-500 in their JSONL layout.

Rows are {"problem", "solution", "answer"?, "subject", "level", "unique_id"}; the solution is
LaTeX with the final answer in \\boxed{...}. A Problem's `answer` is the `answer` field, or the
last \\boxed{} of the solution when the row has none; its `steps` are the solution segmented
with `step_mode` (`stepdpo.steps`: blank-line paragraphs by default, "Step k:" markers when a
solution has them). answer_format "boxed".

MATH-500 is a test split of 500 problems: used alone (`path=.../math500/test.jsonl`) a seeded
`eval_fraction` of it is held out for evaluation; or train on one file and evaluate on another
(`path=.../train.jsonl eval_path=.../test.jsonl`, e.g. PRM800K's math_splits).
"""

from __future__ import annotations

import re
from pathlib import Path

from ..answers import last_boxed
from ..data import DatasetBundle, Problem, check_field
from ..steps import MODES, segment
from .common import (InvalidRows, check_choice, check_count, check_policies, problem_from, read_converted,
                     read_train_eval, row_number, subsample)


def convert(row: dict, where: str, *, split: str = "train", step_mode: str = "auto", step_pattern: str | None = None,
            single_line: bool = True) -> dict:
    """One MATH row -> Problem fields; ValueError naming where and the field when it is malformed."""
    problem = check_field(row, "problem", str, where)
    solution = check_field(row, "solution", str, where)
    if row.get("answer") is not None:
        answer = check_field(row, "answer", (str, int, float), where)
        answer = str(answer).strip()
        if not answer:
            raise ValueError(f"{where}: field 'answer' must be non-empty (or leave it out to use the last \\boxed{{}})")
    else:
        answer = last_boxed(solution)
        if answer is None or not answer.strip():
            raise ValueError(f"{where}: field 'answer' missing and field 'solution' has no \\boxed{{...}} to take it "
                             "from; add an 'answer' field")
        answer = answer.strip()
    steps = segment(solution, step_mode, pattern=step_pattern, single_line=single_line)
    meta = {"source": "math", "split": split, "where": where}
    if row.get("subject") is not None:
        meta["subject"] = str(check_field(row, "subject", str, where))
    if row.get("level") is not None:
        meta["level"] = _level(check_field(row, "level", (int, str), where), where)
    uid = row.get("unique_id")
    if uid is not None:
        meta["unique_id"] = str(uid)
    n = row_number(where)
    return {"id": str(uid) if uid is not None else f"math-{split}-{n}", "question": problem.strip(),
            "answer": answer, "steps": steps, "meta": meta}


def _level(level: int | str, where: str) -> int | str:
    """2 or "Level 2" -> 2; "Level ?" (present in MATH) stays as written."""
    if isinstance(level, int):
        return level
    m = re.fullmatch(r"\s*(?:Level\s*)?(\d+)\s*", level)
    return int(m.group(1)) if m else level.strip()


def read_problems(path: Path, invalid: InvalidRows, *, split: str = "train", **opts) -> list[Problem]:
    return [problem_from(d) for _, d in read_converted(path, convert, invalid, split=split, **opts)]


def load(*, path: str = "../shared/data/math500/test.jsonl", eval_path: str | None = None,
         eval_fraction: float | None = 0.2, n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
         on_invalid: str = "error", truncation: str = "error", step_mode: str = "sentences",
         step_pattern: str | None = None, single_line: bool = True,
         levels: list[int] | None = None, subjects: list[str] | None = None) -> DatasetBundle:
    """MATH problems. `path`: a JSONL file (eval from `eval_path` or a held-out `eval_fraction`),
    or a directory with train.jsonl and test.jsonl. `levels`/`subjects` keep only those problems."""
    check_policies(on_invalid, truncation)
    check_count(n_train, "dataset.n_train")
    check_count(n_eval, "dataset.n_eval")
    check_choice(step_mode, MODES, "dataset.step_mode")
    opts = {"step_mode": step_mode, "step_pattern": step_pattern, "single_line": single_line}
    train, ev = read_train_eval(read_problems, path, eval_path, eval_fraction, on_invalid=on_invalid, seed=seed,
                                **opts)
    keep = _filter(levels, subjects)
    return DatasetBundle(name="math", train=subsample([p for p in train if keep(p)], n_train, seed, "train"),
                         eval=subsample([p for p in ev if keep(p)], n_eval, seed, "eval"), answer_format="boxed")


def _filter(levels, subjects):
    if levels is not None and (not isinstance(levels, list) or not all(isinstance(x, int) for x in levels)):
        raise ValueError(f"dataset.levels: must be null or a list of integers like [1, 2, 3], got {levels!r}")
    if subjects is not None and (not isinstance(subjects, list) or not all(isinstance(x, str) for x in subjects)):
        raise ValueError(f"dataset.subjects: must be null or a list of names like [Algebra, Prealgebra], "
                         f"got {subjects!r}")
    lv, sj = set(levels or ()), {s.lower() for s in subjects or ()}
    return lambda p: (not lv or p.meta.get("level") in lv) and (not sj or str(p.meta.get("subject", "")).lower() in sj)
