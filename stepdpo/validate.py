"""Check pairs and problems before training; bad rows raise (on_invalid=error) or are dropped and counted.

    kept, report = validate_pairs(pairs, tokenizer=tok, max_length=512, truncation="truncate_left",
                                  on_invalid="skip", source="data/pairs.jsonl")

Every message names where the row came from (`meta["where"]`, file:line, set by the loaders; else
the source and the pair's index and id), the field, and the fix:

    data/pairs.jsonl:7: field 'chosen_scores' has 3 scores for 2 steps; give one score per step

The report: rows in and kept, dropped rows counted by reason with the first few messages of each,
and how many pairs were truncated. Lengths are counted as `stepdpo.batching.encode_pair` builds
rows: BOS (if the tokenizer has one) + prompt + the longer response + EOS.
"""

from __future__ import annotations

import dataclasses
import math
from collections import Counter, defaultdict
from typing import Any, Sequence

from .data import Problem, StepPair, encode_text, pair_prompt_ids, response_text, truncated_prompt_ids

TRUNCATION = ("error", "drop", "truncate_left")
ON_INVALID = ("error", "skip")
N_EXAMPLES = 3  # messages kept per reason


class Invalid(ValueError):
    def __init__(self, reason: str, message: str):
        super().__init__(message)
        self.reason = reason


def _type_name(t: type | tuple[type, ...]) -> str:
    return t.__name__ if isinstance(t, type) else " or ".join(x.__name__ for x in t)


def _get(obj: Any, key: str) -> Any:
    if isinstance(obj, dict):
        return obj.get(key)
    return getattr(obj, key, None)


def _field(obj: Any, key: str, typ: type | tuple[type, ...], where: str, *, nonempty: bool = True,
           optional: bool = False) -> Any:
    v = _get(obj, key)
    if v is None:
        if optional:
            return None
        raise Invalid("missing_field", f"{where}: field '{key}' missing; add it")
    if isinstance(v, bool) or not isinstance(v, typ):
        raise Invalid("wrong_type", f"{where}: field '{key}' must be {_type_name(typ)}, got {type(v).__name__}")
    if nonempty and isinstance(v, (str, list)) and not (v.strip() if isinstance(v, str) else v):
        raise Invalid("empty", f"{where}: field '{key}' must be non-empty")
    return v


def _steps(obj: Any, key: str, where: str, *, nonempty: bool = True) -> list[str]:
    steps = _field(obj, key, list, where, nonempty=nonempty)
    for i, s in enumerate(steps):
        if not isinstance(s, str):
            raise Invalid("wrong_type", f"{where}: field '{key}[{i}]' must be str (one step), got {type(s).__name__}")
        if not s.strip():
            raise Invalid("empty_step", f"{where}: field '{key}[{i}]' is an empty step; remove it or fill it in")
    return steps


def _scores(obj: Any, key: str, n_steps: int, where: str, *, required: bool) -> None:
    scores = _get(obj, key)
    if scores is None:
        if required:
            raise Invalid("missing_scores", f"{where}: field '{key}' missing; give one score in [0, 1] per step "
                                            "(or score the pairs with a reward option)")
        return
    if not isinstance(scores, list):
        raise Invalid("wrong_type", f"{where}: field '{key}' must be a list of numbers, got {type(scores).__name__}")
    if len(scores) != n_steps:
        raise Invalid("score_count", f"{where}: field '{key}' has {len(scores)} scores for {n_steps} steps; "
                                     "give one score per step")
    for i, s in enumerate(scores):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not math.isfinite(s) or not 0.0 <= s <= 1.0:
            raise Invalid("score_value", f"{where}: field '{key}[{i}]' must be a finite number in [0, 1], got {s!r}")


def _where(obj: Any, i: int, source: str, kind: str = "pair") -> str:
    meta = _get(obj, "meta")
    if isinstance(meta, dict) and meta.get("where"):
        return str(meta["where"])
    return f"{source}: {kind} {i} (id {_get(obj, 'id')!r})"


def check_pair(obj: Any, where: str, *, require_scores: bool = False) -> StepPair:
    """Field checks for one pair (a StepPair or a dict); raises `Invalid(reason, message)`."""
    _field(obj, "id", str, where)
    _field(obj, "question", str, where)
    _field(obj, "answer", str, where, nonempty=False)
    if _get(obj, "prefix") is not None:
        _steps(obj, "prefix", where, nonempty=False)
    chosen = _steps(obj, "chosen", where)
    rejected = _steps(obj, "rejected", where)
    if response_text(chosen) == response_text(rejected):
        raise Invalid("chosen_equals_rejected", f"{where}: fields 'chosen' and 'rejected' are the same text; a pair "
                                                "needs two different continuations (fix or drop this row)")
    _scores(obj, "chosen_scores", len(chosen), where, required=require_scores)
    _scores(obj, "rejected_scores", len(rejected), where, required=require_scores)
    meta = _get(obj, "meta")
    if meta is not None and not isinstance(meta, dict):
        raise Invalid("wrong_type", f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    if isinstance(obj, StepPair):
        return obj
    return StepPair.from_dict({**obj, "prefix": obj.get("prefix") or [], "meta": meta or {}})


def pair_length(pair: StepPair, tokenizer) -> tuple[int, int]:
    """(prompt tokens incl. BOS, longer response tokens incl. EOS), as `batching.encode_pair` counts them."""
    def n(text: str) -> int:
        return len(encode_text(tokenizer, text)["input_ids"])

    n_prompt = len(pair_prompt_ids(tokenizer, pair.question, pair.prefix)[0])
    return n_prompt, 1 + max(n(response_text(pair.chosen)), n(response_text(pair.rejected)))


class _Report:
    def __init__(self, source: str, on_invalid: str, n_in: int):
        if on_invalid not in ON_INVALID:
            raise ValueError(f"on_invalid: {on_invalid!r} is not one of {ON_INVALID}")
        self.source, self.on_invalid, self.n_in = source, on_invalid, n_in
        self.reasons: Counter = Counter()
        self.examples: dict[str, list[str]] = defaultdict(list)

    def drop(self, reason: str, message: str, *, policy: bool = False) -> None:
        """Count a dropped row; with on_invalid=error (and not dropped by an explicit policy), raise."""
        if self.on_invalid == "error" and not policy:
            raise ValueError(message + "  (on_invalid=skip drops such rows and reports them)")
        self.reasons[reason] += 1
        if len(self.examples[reason]) < N_EXAMPLES:
            self.examples[reason].append(message)

    def as_dict(self, kept: int, **extra) -> dict[str, Any]:
        return {"source": self.source, "rows": self.n_in, "kept": kept, "dropped": sum(self.reasons.values()),
                "dropped_by_reason": dict(self.reasons), "examples": dict(self.examples), **extra}


def validate_pairs(pairs: Sequence[StepPair | dict], *, tokenizer=None, max_length: int | None = None,
                   truncation: str = "error", on_invalid: str = "error", source: str = "pairs",
                   require_scores: bool = False) -> tuple[list[StepPair], dict[str, Any]]:
    """Check every pair; return (kept pairs, report).

    Checks: required fields present with the right types, non-empty question/chosen/rejected and
    steps, chosen != rejected, one score per step, scores finite and in [0, 1] (None = not scored
    yet, unless `require_scores`), and with a tokenizer and `max_length`, the length:
      truncation=error          a too-long pair is invalid (raises, or is dropped with on_invalid=skip)
      truncation=drop           too-long pairs are dropped and counted
      truncation=truncate_left  kept; batching drops the oldest prompt tokens (counted in the report
                                and in `meta["truncated_prompt_tokens"]`); a pair whose responses
                                alone don't fit is invalid
    """
    if truncation not in TRUNCATION:
        raise ValueError(f"truncation: {truncation!r} is not one of {TRUNCATION}")
    if max_length is not None and (isinstance(max_length, bool) or not isinstance(max_length, int) or max_length < 2):
        raise ValueError(f"max_length: must be null or an integer >= 2, got {max_length!r}")
    rep = _Report(source, on_invalid, len(pairs))
    kept: list[StepPair] = []
    truncated = 0
    seen_ids: set[str] = set()
    for i, obj in enumerate(pairs):
        where = _where(obj, i, source)
        try:
            pair = check_pair(obj, where, require_scores=require_scores)
            if pair.id in seen_ids:
                raise Invalid("duplicate_id", f"{where}: field 'id' {pair.id!r} is used by an earlier pair; ids must "
                                              "be unique")
        except Invalid as e:
            rep.drop(e.reason, str(e))
            continue
        if tokenizer is not None and max_length is not None:
            n_prompt, n_resp = pair_length(pair, tokenizer)
            total = n_prompt + n_resp
            if total > max_length:
                msg = (f"{where}: pair is {total} tokens (prompt {n_prompt} + longest response {n_resp}, incl. "
                       f"BOS/EOS) > max_length={max_length}; raise trainer.max_length, shorten the pair, or "
                       "choose truncation=drop|truncate_left")
                if truncation == "drop":
                    rep.drop("too_long", msg, policy=True)
                    continue
                if truncation == "error":
                    rep.drop("too_long", msg)
                    continue
                try:  # only the question is cut: BOS, system/user header and prefix stay whole
                    truncated_prompt_ids(tokenizer, pair.question, pair.prefix, max_length - n_resp)
                except ValueError as e:
                    rep.drop("responses_too_long", f"{where}: the responses are {n_resp} tokens and {e}")
                    continue
                pair = dataclasses.replace(pair, meta={**pair.meta, "truncated_prompt_tokens": total - max_length})
                truncated += 1
        seen_ids.add(pair.id)
        kept.append(pair)
    return kept, rep.as_dict(len(kept), truncated=truncated, truncation=truncation, max_length=max_length)


def check_problem(obj: Any, where: str, *, require_steps: bool = False, require_answer: bool = True) -> Problem:
    _field(obj, "id", str, where)
    _field(obj, "question", str, where)
    _field(obj, "answer", str, where, nonempty=require_answer)
    _steps(obj, "steps", where, nonempty=require_steps)
    meta = _get(obj, "meta")
    if meta is not None and not isinstance(meta, dict):
        raise Invalid("wrong_type", f"{where}: field 'meta' must be an object, got {type(meta).__name__}")
    if isinstance(obj, Problem):
        return obj
    return Problem(id=obj["id"], question=obj["question"], answer=obj["answer"], steps=obj["steps"], meta=meta or {})


def validate_problems(problems: Sequence[Problem | dict], *, on_invalid: str = "error", source: str = "problems",
                      require_steps: bool = False, require_answer: bool = True) -> tuple[list[Problem], dict[str, Any]]:
    """Check every problem (id unique, question and answer non-empty, steps a list of non-empty
    strings, non-empty with `require_steps`); return (kept problems, report)."""
    rep = _Report(source, on_invalid, len(problems))
    kept: list[Problem] = []
    seen: set[str] = set()
    for i, obj in enumerate(problems):
        where = _where(obj, i, source, "problem")
        try:
            p = check_problem(obj, where, require_steps=require_steps, require_answer=require_answer)
            if p.id in seen:
                raise Invalid("duplicate_id", f"{where}: field 'id' {p.id!r} is used by an earlier problem; ids "
                                              "must be unique")
        except Invalid as e:
            rep.drop(e.reason, str(e))
            continue
        seen.add(p.id)
        kept.append(p)
    return kept, rep.as_dict(len(kept))
