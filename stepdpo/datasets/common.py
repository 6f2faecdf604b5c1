"""Shared loader plumbing: paths, reading JSONL through `datasets`, bad-row policy, splits.

Files are read with `datasets.load_dataset("text", data_files=path)` and parsed row by row in a
`.map` (cached by `datasets` like any map). Not `load_dataset("json")`: Arrow's JSON schema
inference turns one mistyped row (a number where every other row has a string, PRM800K's
null-or-int ratings) into a single unlocated error and renumbers rows around blank lines. Read
as text, row i is line i + 1, so every error can name file:line:field.

A `convert(row, where, **opts)` function turns one JSON object into plain JSON data or raises
ValueError naming `where` (file:line) and the field; `InvalidRows` applies `on_invalid`.
"""

from __future__ import annotations

import json
import logging
import os
import random
import re
from collections import Counter
from pathlib import Path
from typing import Any, Callable, Iterable, Sequence

from ..data import Problem, StepPair
from ..validate import ON_INVALID, TRUNCATION  # the dataset.on_invalid / dataset.truncation choices

log = logging.getLogger(__name__)

N_EXAMPLES = 5  # bad-row messages kept per report


# ----------------------------------------------------------------------------- options


def check_on_invalid(on_invalid: str, key: str = "dataset.on_invalid") -> str:
    if on_invalid not in ON_INVALID:
        raise ValueError(f"{key}: {on_invalid!r} is not one of {ON_INVALID}")
    return on_invalid


def check_policies(on_invalid: str, truncation: str) -> None:
    """The two bad-data options every loader takes (truncation is applied later, by stepdpo.validate)."""
    check_on_invalid(on_invalid)
    check_choice(truncation, TRUNCATION, "dataset.truncation")


def check_count(n: int | None, key: str) -> int | None:
    if n is not None and (isinstance(n, bool) or not isinstance(n, int) or n < 0):
        raise ValueError(f"{key}: must be null (all) or an integer >= 0, got {n!r}")
    return n


def check_fraction(x: float | None, key: str) -> float | None:
    if x is not None and (isinstance(x, bool) or not isinstance(x, (int, float)) or not 0.0 <= x < 1.0):
        raise ValueError(f"{key}: must be null or a number in [0, 1), got {x!r}")
    return x


def check_choice(value: Any, allowed: Sequence[Any], key: str) -> Any:
    if value not in allowed:
        raise ValueError(f"{key}: {value!r} is not one of {tuple(allowed)}")
    return value


def resolve_path(path: str | os.PathLike | None, key: str) -> Path:
    """`path` expanded (~) and made absolute; FileNotFoundError that says how relative paths resolve."""
    if path is None or str(path).strip() in ("", "???"):
        raise ValueError(f"{key}: no path given; set {key}=/path/to/data on the command line")
    p = Path(path).expanduser()
    if not p.is_absolute():
        p = Path.cwd() / p
    p = Path(os.path.normpath(p))
    if not p.exists():
        raise FileNotFoundError(f"{key}: {path} does not exist (relative paths are resolved from the current "
                                f"directory {Path.cwd()}; run from the project root or give an absolute path)")
    return p


def pick_file(path: Path, names: Sequence[str], key: str) -> Path:
    """`path` itself if it is a file, else the first of `names` inside the directory."""
    if path.is_file():
        return path
    for n in names:
        if (path / n).is_file():
            return path / n
    raise FileNotFoundError(f"{key}: directory {path} has none of {list(names)}; point {key} at a JSONL file")


# ----------------------------------------------------------------------------- bad rows


class InvalidRows:
    """Applies `on_invalid` to bad rows: raise at the first (error) or count by reason (skip)."""

    def __init__(self, on_invalid: str, source: str):
        self.on_invalid = check_on_invalid(on_invalid)
        self.source = source
        self.rows = 0
        self.reasons: Counter = Counter()
        self.examples: list[str] = []

    def bad(self, message: str, reason: str | None = None) -> None:
        if self.on_invalid == "error":
            raise ValueError(message + "  (dataset.on_invalid=skip drops such rows and reports them)")
        self.reasons[reason or reason_of(message)] += 1
        if len(self.examples) < N_EXAMPLES:
            self.examples.append(message)

    def report(self) -> dict[str, Any]:
        return {"source": self.source, "rows": self.rows, "skipped": sum(self.reasons.values()),
                "skipped_by_reason": dict(self.reasons), "examples": list(self.examples)}

    def log(self) -> None:
        if self.reasons:
            log.warning("%s: skipped %d of %d rows: %s; first: %s", self.source, sum(self.reasons.values()),
                        self.rows, dict(self.reasons), self.examples[0])


def reason_of(message: str) -> str:
    """A short reason key from a located error: "f.jsonl:3: field 'x' missing (keys...)" -> "field 'x' missing"."""
    m = re.match(r"(?:.*?:\d+|.*?\[\d+\]): (.*)$", message, re.DOTALL)
    body = m.group(1) if m else message
    for stop in (" (", ", got", "; "):
        body = body.split(stop, 1)[0]
    return body.strip()[:80]


# ----------------------------------------------------------------------------- reading rows


def code_version(convert: Callable) -> str:
    """Hash of the source files a conversion depends on. `datasets` fingerprints a module-level
    function by name, not code, so without this an edited converter would reuse a stale cached map."""
    import hashlib
    import sys

    h = hashlib.sha1()
    for mod in (sys.modules[convert.__module__], sys.modules[__name__], sys.modules["stepdpo.steps"],
                sys.modules["stepdpo.data"]):
        h.update(Path(mod.__file__).read_bytes())
    return h.hexdigest()


def row_number(where: str) -> str:
    """"data/x.jsonl:12" -> "12", "openai/gsm8k:train[12]" -> "12" (for ids derived from the origin)."""
    m = re.search(r"(\d+)\]?$", where)
    return m.group(1) if m else where


def row_stem(where: str) -> str:
    """"data/phase1_train.jsonl:12" -> "phase1_train" (the file or Hub split a row came from)."""
    head = re.sub(r"(:\d+|\[\d+\])$", "", where)
    return Path(head.replace(":", "/")).stem


def _convert_one(row: dict, idx: int, *, convert: Callable, source: str, from_text: bool, opts: dict,
                 code_version: str = "") -> dict:
    where = f"{source}:{idx + 1}" if from_text else f"{source}[{idx}]"
    if from_text:
        line = row["text"]
        if not line.strip():
            return {"_out": "", "_err": "", "_where": where}
        try:
            obj = json.loads(line)
        except json.JSONDecodeError as e:
            return {"_out": "", "_err": f"{where}: invalid JSON ({e.msg} at column {e.colno})", "_where": where}
        if not isinstance(obj, dict):
            return {"_out": "", "_err": f"{where}: expected a JSON object, got {type(obj).__name__}", "_where": where}
    else:
        obj = row
    try:
        out = convert(obj, where, **opts)
    except (ValueError, TypeError, KeyError) as e:
        msg = str(e) if isinstance(e, (ValueError, TypeError)) else f"{where}: field {e} missing"
        return {"_out": "", "_err": msg if msg.startswith(where) else f"{where}: {msg}", "_where": where}
    return {"_out": json.dumps(out, ensure_ascii=False), "_err": "", "_where": where}


def convert_rows(ds, convert: Callable, *, source: str, from_text: bool = True, desc: str = "",
                 **opts) -> list[tuple[str, Any, str]]:
    """Run `convert(row, where, **opts)` over a `datasets.Dataset` in a cached `.map`.

    Returns [(where, converted, error)] per non-blank row: `converted` is None when `error` is set.
    `from_text`: rows are JSONL lines from `read_text` (else dict rows, e.g. from the Hub).
    The map is cached by `datasets`, keyed on the file, the options and the converter's source.
    """
    mapped = ds.map(_convert_one, with_indices=True, remove_columns=ds.column_names,
                    fn_kwargs={"convert": convert, "source": source, "from_text": from_text, "opts": opts,
                               "code_version": code_version(convert)},
                    desc=desc or f"reading {Path(source).name}")
    out = []
    for where, o, e in zip(mapped["_where"], mapped["_out"], mapped["_err"]):
        if o or e:
            out.append((where, json.loads(o) if o else None, e))
    return out


def read_text(path: Path):
    """A local JSONL file as a `datasets.Dataset` of lines (column "text"; row i = line i + 1)."""
    from datasets import load_dataset  # late import: heavy

    return load_dataset("text", data_files=str(path), split="train")


def read_converted(path: Path, convert: Callable, invalid: InvalidRows, **opts) -> list[tuple[str, Any]]:
    """[(where, converted)] for the good rows of a JSONL file; bad rows go through `invalid`."""
    good = []
    for where, obj, err in convert_rows(read_text(path), convert, source=str(path), **opts):
        invalid.rows += 1
        if err:
            invalid.bad(err)
        else:
            good.append((where, obj))
    return good


# ----------------------------------------------------------------------------- splits


def subsample(items: list, n: int | None, seed: int, salt: str = "") -> list:
    """`n` items drawn with `seed`, kept in their original order; all of them if n is None or >= len."""
    if n is None or n >= len(items):
        return list(items)
    rng = random.Random(f"{seed}:{salt}")
    keep = sorted(rng.sample(range(len(items)), n))
    return [items[i] for i in keep]


def holdout(problems: list[Problem], fraction: float, seed: int) -> tuple[list[Problem], list[Problem]]:
    """(train, eval): a seeded `fraction` of the problems held out, disjoint by question text."""
    questions = sorted({p.question for p in problems})
    rng = random.Random(f"{seed}:holdout")
    rng.shuffle(questions)
    n_eval = round(len(questions) * fraction)
    held = set(questions[:n_eval])
    return [p for p in problems if p.question not in held], [p for p in problems if p.question in held]


def pairs_for(pairs: Iterable[StepPair], problems: Iterable[Problem]) -> list[StepPair]:
    """The pairs whose question is one of `problems`' (pairs follow their problems into a split)."""
    qs = {p.question for p in problems}
    return [p for p in pairs if p.question in qs]


def dedupe_problems(problems: Iterable[Problem]) -> list[Problem]:
    """First problem per question text (several rows often share a problem: PRM800K, Step-DPO)."""
    seen: set[str] = set()
    out = []
    for p in problems:
        if p.question not in seen:
            seen.add(p.question)
            out.append(p)
    return out


def problem_from(d: dict) -> Problem:
    return Problem(id=d["id"], question=d["question"], answer=d["answer"], steps=d["steps"], meta=d.get("meta", {}))


def split_files(path: str | None, eval_path: str | None, eval_fraction: float | None, *, train_names: Sequence[str],
                eval_names: Sequence[str], key: str = "dataset.path") -> tuple[Path, Path | None, float | None]:
    """(train file, eval file or None, held-out fraction or None) from a loader's path options.

    A directory gives its train and test files; a single file is the train split, with eval from
    `eval_path` or a held-out `eval_fraction` of it (exactly one of the two).
    """
    check_fraction(eval_fraction, "dataset.eval_fraction")
    p = resolve_path(path, key)
    if eval_path is not None and eval_fraction is not None:
        raise ValueError("dataset.eval_path and dataset.eval_fraction both set: keep one (eval_fraction=null to "
                         "evaluate on eval_path, eval_path=null to hold out a fraction of the training file)")
    train = pick_file(p, train_names, key)
    if eval_path is not None:
        ev = resolve_path(eval_path, "dataset.eval_path")
        return train, pick_file(ev, eval_names, "dataset.eval_path"), None
    if eval_fraction is not None:
        return train, None, eval_fraction
    if p.is_dir():
        return train, pick_file(p, eval_names, key), None
    raise ValueError(f"{key}={path} is a single file: set dataset.eval_path (a test file) or dataset.eval_fraction "
                     "(hold out that share of its problems) so there is something to evaluate on")


def read_train_eval(read: Callable, path: str | None, eval_path: str | None, eval_fraction: float | None, *,
                    on_invalid: str, seed: int, **opts) -> tuple[list[Problem], list[Problem]]:
    """Train and eval problems from a loader's path options: train.jsonl + test.jsonl in a directory,
    a file plus `eval_path`, or a file with a held-out `eval_fraction`. `read(file, invalid, split=, **opts)`."""
    train_file, eval_file, frac = split_files(path, eval_path, eval_fraction, train_names=("train.jsonl",),
                                              eval_names=("test.jsonl",))

    def one(file: Path, split: str) -> list[Problem]:
        invalid = InvalidRows(on_invalid, str(file))
        problems = read(file, invalid, split=split, **opts)
        invalid.log()
        return problems

    train = one(train_file, "train")
    if eval_file is not None:
        return train, one(eval_file, "test")
    return holdout(train, frac or 0.0, seed)
