"""`dataset=pairs`: your own preference pairs, one JSON object per line.

    {"prompt": "What is 2 + 3?",                       required (or "question")
     "prefix": ["We add."],                            optional: shared steps before the divergence
     "chosen": ["2 + 3 = 5", "The answer is 5"],       required: a list of steps, or one string
     "rejected": "2 + 3 = 6\\nThe answer is 6",          required: ... split into steps with step_mode
     "chosen_scores": [1.0, 1.0],                      optional: one score in [0, 1] per chosen step
     "rejected_scores": [0.0, 0.0],                    optional: ... per rejected step
     "answer": "5",                                    optional: final answer (needed for evaluation)
     "id": "p1", "meta": {...}}                        optional

Scores: pairs without scores are scored by the `reward` option. A file whose rows carry scores is
trained on them with reward=prm800k (which keeps file scores and drops unscored pairs); with any
other reward the run stops before loading a model and says so (`pairs.check_own_scores`), unless
`rescore=true` (the file's scores are dropped and the reward scores every pair). We stop rather
than pick: silently replacing a user's labels and silently ignoring the chosen reward are both
wrong for someone, and the one-line fix costs seconds.

A key outside the layout above (e.g. `chosen_step_scores`) is an error naming file:line, the keys
and the closest known field, unless `extra_fields=ignore`. Every bad row is reported as
file:line: field ... and how to fix it; an empty file, as the file and what a row looks like.
Problems (for SFT and held-out accuracy) are the distinct prompts; their steps are prefix +
chosen, their answer the `answer` field. Held-out problems are those of a seeded
`eval_fraction` of prompts (only prompts with an answer), or the problems of `eval_path`.
"""

from __future__ import annotations

import difflib
import hashlib
import logging
from pathlib import Path

from ..data import DatasetBundle, Problem, StepPair, check_field, check_scores
from ..steps import MODES, clean_steps, segment
from .common import (InvalidRows, check_choice, check_count, check_fraction, check_policies, dedupe_problems, holdout,
                     pairs_for, problem_from, read_converted, resolve_path, row_number, subsample)
from .eval_file import train_and_eval

log = logging.getLogger(__name__)

FIELDS = ("prompt", "question", "prefix", "chosen", "rejected", "chosen_scores", "rejected_scores", "answer", "id",
          "meta")
EXTRA_FIELDS = ("error", "ignore")  # dataset.extra_fields: what a row key outside FIELDS does


def check_keys(row: dict, where: str) -> None:
    """Refuse keys outside FIELDS, each with the closest known field (a misspelt score column would
    otherwise be dropped without a word)."""
    unknown = [k for k in row if k not in FIELDS]
    if not unknown:
        return
    said = []
    for k in unknown:
        close = difflib.get_close_matches(k, FIELDS, n=1, cutoff=0.6)
        said.append(f"'{k}'" + (f" (did you mean '{close[0]}'?)" if close else ""))
    raise ValueError(f"{where}: unknown field{'s' if len(said) > 1 else ''} {', '.join(said)}; rename "
                     f"{'them' if len(said) > 1 else 'it'}, move extra data into 'meta', or set "
                     "dataset.extra_fields=ignore")


def _steps(row: dict, key: str, where: str, *, mode: str, pattern: str | None, single_line: bool,
           required: bool = True) -> list[str]:
    if not required and row.get(key) is None:
        return []
    v = check_field(row, key, (str, list), where, nonempty=required)
    if isinstance(v, str):
        return segment(v, mode, pattern=pattern, single_line=single_line)
    for i, s in enumerate(v):
        if not isinstance(s, str):
            raise ValueError(f"{where}: field '{key}[{i}]' must be a string (one step), got {type(s).__name__}")
        if not s.strip():
            raise ValueError(f"{where}: field '{key}[{i}]' is an empty step; remove it")
    return clean_steps(v, single_line=single_line)


def convert(row: dict, where: str, *, step_mode: str = "lines", step_pattern: str | None = None,
            single_line: bool = True, extra_fields: str = "error", rescore: bool = False) -> dict:
    """One pair row -> {pair, problem}; ValueError naming where, the field and the fix."""
    if extra_fields == "error":
        check_keys(row, where)
    key = "prompt" if "prompt" in row or "question" not in row else "question"
    prompt = check_field(row, key, str, where).strip()
    kw = {"mode": step_mode, "pattern": step_pattern, "single_line": single_line}
    prefix = _steps(row, "prefix", where, required=False, **kw)
    chosen = _steps(row, "chosen", where, **kw)
    rejected = _steps(row, "rejected", where, **kw)
    for k, steps in (("chosen", chosen), ("rejected", rejected)):
        if not steps:
            raise ValueError(f"{where}: field '{k}' has no steps after splitting with step_mode={step_mode!r}")
    if chosen == rejected:
        raise ValueError(f"{where}: field 'chosen' equals field 'rejected'; a pair needs two different continuations")
    cs = check_scores(row.get("chosen_scores"), len(chosen), where, "chosen_scores")
    rs = check_scores(row.get("rejected_scores"), len(rejected), where, "rejected_scores")
    if rescore:  # dataset.rescore=true: the reward option scores every pair
        cs = rs = None
    answer = row.get("answer")
    if answer is not None and (isinstance(answer, bool) or not isinstance(answer, (str, int, float))):
        raise ValueError(f"{where}: field 'answer' must be a string, got {type(answer).__name__}")
    answer = "" if answer is None else str(answer).strip()
    meta = row.get("meta") or {}
    if not isinstance(meta, dict):
        raise ValueError(f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    rid = row.get("id")
    if rid is not None and (isinstance(rid, bool) or not isinstance(rid, (str, int))):
        raise ValueError(f"{where}: field 'id' must be a string, got {type(rid).__name__}")
    pid = "pairs-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]
    line = row_number(where)
    pair = {"id": str(rid) if rid is not None else f"pairs-{line}", "question": prompt, "answer": answer,
            "prefix": prefix, "chosen": chosen, "rejected": rejected, "chosen_scores": cs, "rejected_scores": rs,
            "source": "file", "meta": {**meta, "where": where, "problem_id": pid}}
    problem = {"id": pid, "question": prompt, "answer": answer, "steps": prefix + chosen,
               "meta": {"source": "pairs_file", "where": where}}
    return {"pair": pair, "problem": problem}


def check_not_empty(path: Path) -> None:
    """A file with no row fails here, naming it (the `datasets` text reader would raise a bare
    DatasetGenerationError)."""
    with open(path, encoding="utf-8") as f:
        if any(line.strip() for line in f):
            return
    raise ValueError(f"{path}: the pairs file is empty; write one JSON object per line, e.g. "
                     '{"prompt": "What is 2 + 3?", "chosen": ["2 + 3 = 5"], "rejected": ["2 + 3 = 6"]} '
                     "(layout: stepdpo/datasets/pairs_file.py)")


def read_problems(path: Path, invalid: InvalidRows, *, split: str = "eval", single_line: bool = True,
                  **_) -> list[Problem]:
    rows = read_converted(path, convert, invalid, single_line=single_line, extra_fields="ignore")
    return dedupe_problems(problem_from(d["problem"]) for _, d in rows)


def load(*, path: str = "???", eval_path: str | None = None, eval_fraction: float | None = 0.1,
         n_train: int | None = None, n_eval: int | None = None, seed: int = 0, on_invalid: str = "error",
         truncation: str = "error", step_mode: str = "lines", step_pattern: str | None = None, single_line: bool = True,
         max_pairs: int | None = None, answer_format: str = "plain", extra_fields: str = "error",
         rescore: bool = False) -> DatasetBundle:
    """Pairs from a JSONL file (see the module docstring for the row layout)."""
    check_policies(on_invalid, truncation)
    check_choice(extra_fields, EXTRA_FIELDS, "dataset.extra_fields")
    for key, n in (("n_train", n_train), ("n_eval", n_eval), ("max_pairs", max_pairs)):
        check_count(n, f"dataset.{key}")
    check_fraction(eval_fraction, "dataset.eval_fraction")
    check_choice(step_mode, MODES, "dataset.step_mode")
    check_choice(answer_format, ("plain", "gsm8k", "boxed"), "dataset.answer_format")
    if eval_path is not None and eval_fraction is not None:
        raise ValueError("dataset.eval_path and dataset.eval_fraction both set: keep one")
    p = resolve_path(path, "dataset.path")
    invalid = InvalidRows(on_invalid, str(p))
    check_not_empty(p)
    rows = [d for _, d in read_converted(p, convert, invalid, step_mode=step_mode, step_pattern=step_pattern,
                                         single_line=single_line, extra_fields=extra_fields, rescore=bool(rescore))]
    invalid.log()
    problems = dedupe_problems(problem_from(r["problem"]) for r in rows)
    pairs = [StepPair.from_dict(r["pair"]) for r in rows]
    if eval_path is not None:
        train, ev = train_and_eval(problems, eval_path, seed=seed, on_invalid=on_invalid, single_line=single_line)
    else:
        answered = [q for q in problems if q.answer]
        _, ev = holdout(answered, eval_fraction or 0.0, seed)
        held = {q.question for q in ev}
        train = [q for q in problems if q.question not in held]
        if eval_fraction and not answered:
            log.warning("%s: no row has an 'answer', so nothing can be held out for evaluation; add answers or set "
                        "dataset.eval_path", p)
    train = subsample(train, n_train, seed, "train")
    pairs = subsample(pairs_for(pairs, train), max_pairs, seed, "pairs")
    return DatasetBundle(name="pairs", train=train, eval=subsample(ev, n_eval, seed, "eval"), pairs=pairs,
                         answer_format=answer_format)
