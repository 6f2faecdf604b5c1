"""`dataset=prm800k`: PRM800K step labels (Lightman et al., 2023) -> problems and preference pairs.

Each line of phase1_*.jsonl / phase2_*.jsonl is one labelled solution (layout: README of
github.com/openai/prm800k):

    {"labeler", "timestamp", "generation", "is_quality_control_question", "is_initial_screening_question",
     "question": {"problem", "ground_truth_answer", "ground_truth_solution"?, "pre_generated_steps"?, ...},
     "label": {"steps": [{"completions": [{"text", "rating": -1|0|1, "flagged"}],
                          "human_completion": null | {"text", ...}, "chosen_completion": int | null}],
               "total_time", "finish_reason": "solution" | "found_error" | "give_up" | "bad_problem"}}

Pairs built (StepPair.source "prm800k", `meta["where"]` = file:line):
- step pairs (`step_pairs`): at a step where alternative completions were rated +1 and -1, the
  prefix is the solution's chosen steps so far, chosen a +1 completion (or the labeler's own
  `human_completion`, +1 by definition), rejected a -1 completion; one score each, from
  `rating_scores`.
- whole-solution pairs (`whole_solution_pairs`): per problem, a solution labelled to the end
  without a -1 step ("solution") against one with a -1 step, empty prefix, every step's rating
  mapped to a score.

The trajectory of a labelled solution is, per step, the chosen completion, else the human
completion, else a lone completion; at a step with several completions and none chosen (phase 2
"found_error"), the first -1 completion ends it. A final step's "\\n\\n# Answer\\n\\n5" becomes
"The answer is $\\boxed{5}$" (`answer_style: boxed`) so evaluation can extract it.
"""

from __future__ import annotations

import hashlib
import itertools
import logging
import re
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

from ..answers import last_boxed
from ..data import DatasetBundle, Problem, StepPair, check_field
from ..steps import MODES, clean_step, segment
from .common import (InvalidRows, check_choice, check_count, check_fraction, check_policies, dedupe_problems, holdout,
                     pairs_for, problem_from, read_converted, resolve_path, row_number, row_stem, subsample)

log = logging.getLogger(__name__)

FINISH_REASONS = ("solution", "found_error", "give_up", "bad_problem")
RATINGS = (-1, 0, 1)
DEFAULT_RATING_SCORES = {-1: 0.0, 0: 0.5, 1: 1.0}
_ANSWER_TAIL = re.compile(r"\s*#\s*Answer\s*\n\s*(.+?)\s*$", re.DOTALL)


def problem_id(question: str) -> str:
    return "prm800k-" + hashlib.sha1(question.encode("utf-8")).hexdigest()[:12]


def rating_map(rating_scores: dict | None) -> dict[int, float]:
    """{-1: s, 0: s, 1: s} from config (keys may arrive as strings from the command line)."""
    if rating_scores is None:
        return dict(DEFAULT_RATING_SCORES)
    if not isinstance(rating_scores, dict):
        raise ValueError("dataset.rating_scores: must be a mapping like {-1: 0.0, 0: 0.5, 1: 1.0}, "
                         f"got {rating_scores!r}")
    out = {}
    for k, v in rating_scores.items():
        try:
            key = int(k)
        except (TypeError, ValueError):
            key = None
        if key not in RATINGS:
            raise ValueError(f"dataset.rating_scores: key {k!r} is not a PRM800K rating {RATINGS}")
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not 0.0 <= v <= 1.0:
            raise ValueError(f"dataset.rating_scores[{key}]: must be a number in [0, 1], got {v!r}")
        out[key] = float(v)
    missing = set(RATINGS) - set(out)
    if missing:
        raise ValueError(f"dataset.rating_scores: missing ratings {sorted(missing)}; "
                         f"give a score for each of {RATINGS}")
    if not out[-1] < out[1]:
        raise ValueError(f"dataset.rating_scores: the score of -1 ({out[-1]}) must be below that of +1 ({out[1]})")
    from ..weights import WRONG, is_wrong

    if not is_wrong(out[-1]) or is_wrong(out[1]):  # else first_error finds no wrong step, or every step wrong
        raise ValueError(f"dataset.rating_scores: -1 must score below {WRONG} (a wrong step) and +1 at least {WRONG}; "
                         f"got {out[-1]} and {out[1]}")
    return out


def clean_text(text: str, *, answer_style: str = "boxed", single_line: bool = True) -> str:
    """A completion's text as a step: answer tail rewritten (boxed), inner newlines folded."""
    if answer_style == "boxed":
        m = _ANSWER_TAIL.search(text)
        if m:
            ans = m.group(1).strip()
            text = f"{text[:m.start()].rstrip()}\nThe answer is $\\boxed{{{ans}}}$".lstrip()
    return clean_step(text, single_line=single_line)


# ----------------------------------------------------------------------------- one row


def _bool(row: dict, key: str, where: str) -> bool:
    v = row.get(key)
    if v is None:
        return False
    if not isinstance(v, bool):
        raise ValueError(f"{where}: field '{key}' must be true/false, got {type(v).__name__}")
    return v


def _human_text(h: Any, where: str, field: str) -> str | None:
    if h is None:
        return None
    if isinstance(h, str):
        return h
    if isinstance(h, dict) and isinstance(h.get("text"), str):
        return h["text"]
    raise ValueError(f"{where}: field '{field}' must be null, a string or an object with 'text', "
                     f"got {type(h).__name__}")


def convert(row: dict, where: str, *, rating_scores: dict, answer_style: str = "boxed", single_line: bool = True,
            skip_flagged: bool = True, use_human_completions: bool = True, max_pairs_per_step: int | None = 4,
            solution_step_mode: str = "sentences", split: str = "train") -> dict:
    """One labelled solution -> {problem, flags, step_pairs, trajectory}; ValueError naming the field."""
    rs = {int(k): v for k, v in rating_scores.items()}
    q = check_field(row, "question", dict, where)
    question = check_field(q, "problem", str, f"{where}: question").strip()
    gt_solution = q.get("ground_truth_solution")
    if gt_solution is not None and not isinstance(gt_solution, str):
        raise ValueError(f"{where}: field 'question.ground_truth_solution' must be a string or absent")
    answer = q.get("ground_truth_answer")
    if answer is None and gt_solution:
        answer = last_boxed(gt_solution)
    if not isinstance(answer, str) or not answer.strip():
        raise ValueError(f"{where}: field 'question.ground_truth_answer' must be a non-empty string, got {answer!r}")
    answer = answer.strip()
    label = check_field(row, "label", dict, where)
    finish = label.get("finish_reason")
    if finish not in FINISH_REASONS:
        raise ValueError(f"{where}: field 'label.finish_reason' is {finish!r}; expected one of {FINISH_REASONS}")
    steps = label.get("steps")
    if not isinstance(steps, list):
        raise ValueError(f"{where}: field 'label.steps' must be a list, got {type(steps).__name__}")
    pid = problem_id(question)
    gen = row.get("generation")
    phase = 1 if gen is None else 2
    base_meta = {"where": where, "problem_id": pid, "labeler": row.get("labeler"), "phase": phase,
                 "generation": gen, "finish_reason": finish}
    clean = lambda t: clean_text(t, answer_style=answer_style, single_line=single_line)  # noqa: E731

    prefix: list[str] = []
    traj_scores: list[float] = []
    traj_ratings: list[int] = []
    pairs: list[dict] = []
    complete = True  # the trajectory covers every labelled step
    for i, step in enumerate(steps):
        f = f"label.steps[{i}]"
        if not isinstance(step, dict):
            raise ValueError(f"{where}: field '{f}' must be an object, got {type(step).__name__}")
        comps = step.get("completions")
        if comps is None:
            complete = False
            break
        if not isinstance(comps, list):
            raise ValueError(f"{where}: field '{f}.completions' must be a list, got {type(comps).__name__}")
        parsed = []  # (text, rating, flagged)
        for j, c in enumerate(comps):
            cf = f"{f}.completions[{j}]"
            if not isinstance(c, dict) or not isinstance(c.get("text"), str):
                raise ValueError(f"{where}: field '{cf}.text' must be a string")
            r = c.get("rating")
            if r is not None and (isinstance(r, bool) or r not in RATINGS):
                raise ValueError(f"{where}: field '{cf}.rating' must be -1, 0, 1 or null, got {r!r}")
            parsed.append((clean(c["text"]), r, bool(c.get("flagged"))))
        human = _human_text(step.get("human_completion"), where, f"{f}.human_completion")
        human = clean(human) if human is not None else None
        chosen_idx = step.get("chosen_completion")
        if chosen_idx is not None and (isinstance(chosen_idx, bool) or not isinstance(chosen_idx, int)
                                       or not 0 <= chosen_idx < len(parsed)):
            raise ValueError(f"{where}: field '{f}.chosen_completion' must be null or an index into its "
                             f"{len(parsed)} completions, got {chosen_idx!r}")

        usable = [(t, r) for t, r, fl in parsed if t and not (skip_flagged and fl)]
        good = [t for t, r in usable if r == 1] + ([human] if use_human_completions and human else [])
        bad = [t for t, r in usable if r == -1]
        made = 0
        for c_text, r_text in itertools.product(dict.fromkeys(good), dict.fromkeys(bad)):
            if c_text == r_text or (max_pairs_per_step is not None and made >= max_pairs_per_step):
                continue
            pairs.append({"id": f"{pid}-{row_stem(where)}-{row_number(where)}-s{i}-{made}",
                          "question": question, "answer": answer, "prefix": list(prefix), "chosen": [c_text],
                          "rejected": [r_text], "chosen_scores": [rs[1]], "rejected_scores": [rs[-1]],
                          "source": "prm800k", "meta": {**base_meta, "kind": "step", "step": i}})
            made += 1

        # advance along the labelled trajectory
        if chosen_idx is not None:
            nxt, rating = parsed[chosen_idx][0], parsed[chosen_idx][1]
        elif human:
            nxt, rating = human, 1
        elif len(parsed) == 1:
            nxt, rating = parsed[0][0], parsed[0][1]
        else:
            err = next((t for t, r, _ in parsed if r == -1 and t), None)
            if err is not None:  # phase 2 "found_error": the first -1 completion ends the solution
                prefix.append(err)
                traj_ratings.append(-1)
                traj_scores.append(rs[-1])
            complete = err is not None and i == len(steps) - 1
            break
        if rating is None or not nxt:  # unrated (or empty) step: the labelled solution ends before it
            complete = False
            break
        prefix.append(nxt)
        traj_ratings.append(rating)
        traj_scores.append(rs[rating])

    gold = segment(gt_solution, solution_step_mode, single_line=single_line) if gt_solution else []
    return {
        "problem": {"id": pid, "question": question, "answer": answer, "steps": gold,
                    "meta": {"source": "prm800k", "split": split, "where": where, "has_gold_solution": bool(gold)}},
        "flags": {"qc": _bool(row, "is_quality_control_question", where),
                  "screening": _bool(row, "is_initial_screening_question", where), "finish": finish},
        "step_pairs": pairs,
        "trajectory": {"steps": prefix, "scores": traj_scores, "ratings": traj_ratings, "complete": complete,
                       "meta": base_meta},
    }


# ----------------------------------------------------------------------------- files


def _files(path: str | list[str], key: str = "dataset.path") -> list[Path]:
    paths = path if isinstance(path, (list, tuple)) else [path]
    out: list[Path] = []
    for p in paths:
        rp = resolve_path(p, key)
        if rp.is_dir():
            found = sorted(rp.glob("phase*_train.jsonl")) or sorted(rp.glob("*.jsonl"))
            if not found:
                raise FileNotFoundError(f"{key}: directory {rp} has no phase*_train.jsonl (or any .jsonl) files")
            out += found
        else:
            out.append(rp)
    return out


def read_rows(files: list[Path], on_invalid: str, **opts) -> tuple[list[dict], dict]:
    rows, reports = [], []
    for f in files:
        invalid = InvalidRows(on_invalid, str(f))
        rows += [d for _, d in read_converted(f, convert, invalid, **opts)]
        invalid.log()
        reports.append(invalid.report())
    return rows, {"files": reports}


def read_problems(path: Path, invalid: InvalidRows, *, split: str = "eval", single_line: bool = True,
                  **_) -> list[Problem]:
    """The distinct problems of a PRM800K label file (for `eval_path`)."""
    rows = read_converted(path, convert, invalid, rating_scores=DEFAULT_RATING_SCORES, single_line=single_line,
                          split=split)
    return dedupe_problems(problem_from(d["problem"]) for _, d in rows)


def build_whole_solution_pairs(rows: list[dict]) -> list[StepPair]:
    """Per problem: each solution with a -1 step against a clean finished one (round robin)."""
    by_problem: dict[str, list[dict]] = defaultdict(list)
    for r in rows:
        by_problem[r["problem"]["id"]].append(r)
    out = []
    for pid, rs in by_problem.items():
        good = [r for r in rs if r["flags"]["finish"] == "solution" and r["trajectory"]["complete"]
                and r["trajectory"]["steps"] and min(r["trajectory"]["ratings"]) >= 0]
        bad = [r for r in rs if -1 in r["trajectory"]["ratings"]]
        if not good:
            continue
        for k, b in enumerate(bad):
            g = good[k % len(good)]
            gt, bt = g["trajectory"], b["trajectory"]
            if gt["steps"] == bt["steps"]:
                continue
            p = g["problem"]
            out.append(StepPair(id=f"{pid}-whole-{k}", question=p["question"], answer=p["answer"], prefix=[],
                                chosen=list(gt["steps"]), rejected=list(bt["steps"]),
                                chosen_scores=list(gt["scores"]), rejected_scores=list(bt["scores"]), source="prm800k",
                                meta={"where": bt["meta"]["where"], "chosen_where": gt["meta"]["where"],
                                      "problem_id": pid, "kind": "whole", "rejected_ratings": bt["ratings"],
                                      "chosen_ratings": gt["ratings"]}))
    return out


def load(*, path: str | list[str] = "???", eval_path: str | None = "../shared/data/math500/test.jsonl",
         eval_fraction: float | None = None, n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
         on_invalid: str = "error", truncation: str = "error", rating_scores: dict | None = None,
         step_pairs: bool = True, whole_solution_pairs: bool = False, max_pairs_per_step: int | None = 4,
         max_pairs: int | None = None,
         skip_flagged: bool = True, use_human_completions: bool = True, drop_quality_control: bool = True,
         drop_initial_screening: bool = True, bad_problem: str = "drop_problem", give_up: str = "keep_steps",
         answer_style: str = "boxed", single_line: bool = True, solution_step_mode: str = "sentences",
         dedupe: bool = True) -> DatasetBundle:
    """PRM800K problems and pairs (see the module docstring and conf/dataset/prm800k.yaml)."""
    check_policies(on_invalid, truncation)
    for key, n in (("n_train", n_train), ("n_eval", n_eval), ("max_pairs", max_pairs),
                   ("max_pairs_per_step", max_pairs_per_step)):
        check_count(n, f"dataset.{key}")
    check_fraction(eval_fraction, "dataset.eval_fraction")
    check_choice(bad_problem, ("drop_problem", "drop_row", "keep"), "dataset.bad_problem")
    check_choice(give_up, ("keep_steps", "drop_row"), "dataset.give_up")
    check_choice(answer_style, ("boxed", "keep"), "dataset.answer_style")
    check_choice(solution_step_mode, MODES, "dataset.solution_step_mode")
    if not step_pairs and not whole_solution_pairs:
        raise ValueError("dataset.step_pairs and dataset.whole_solution_pairs are both false: no pairs to build")
    if eval_path is not None and eval_fraction is not None:
        raise ValueError("dataset.eval_path and dataset.eval_fraction both set: keep one")
    rs = rating_map(rating_scores)
    files = _files(path)
    rows, _ = read_rows(files, on_invalid, rating_scores=rs, answer_style=answer_style, single_line=single_line,
                        skip_flagged=skip_flagged, use_human_completions=use_human_completions,
                        max_pairs_per_step=max_pairs_per_step, solution_step_mode=solution_step_mode)

    counts: Counter = Counter(rows=len(rows))
    bad_questions = {r["problem"]["question"] for r in rows if r["flags"]["finish"] == "bad_problem"}
    kept = []
    for r in rows:
        fl = r["flags"]
        if drop_quality_control and fl["qc"]:
            counts["dropped_quality_control"] += 1
        elif drop_initial_screening and fl["screening"]:
            counts["dropped_initial_screening"] += 1
        elif bad_problem == "drop_problem" and r["problem"]["question"] in bad_questions:
            counts["dropped_bad_problem"] += 1
        elif bad_problem == "drop_row" and fl["finish"] == "bad_problem":
            counts["dropped_bad_problem"] += 1
        elif give_up == "drop_row" and fl["finish"] == "give_up":
            counts["dropped_give_up"] += 1
        else:
            kept.append(r)

    problems = _problems(kept)
    pairs: list[StepPair] = []
    if step_pairs:
        pairs += [StepPair.from_dict(p) for r in kept for p in r["step_pairs"]]
    if whole_solution_pairs:  # a give_up solution is never the finished, chosen one
        pairs += build_whole_solution_pairs(kept)
    if dedupe:
        pairs = _dedupe(pairs, counts)

    if eval_path is not None:
        from .eval_file import train_and_eval  # late: eval_file imports this module

        train, ev = train_and_eval(problems, eval_path, seed=seed, on_invalid=on_invalid, single_line=single_line)
        counts["dropped_eval_overlap_problems"] = len(problems) - len(train)
    else:
        train, ev = holdout(problems, eval_fraction or 0.0, seed)
    train = subsample(train, n_train, seed, "train")
    pairs = pairs_for(pairs, train)
    pairs = subsample(pairs, max_pairs, seed, "pairs")
    counts.update(problems=len(problems), train=len(train), pairs=len(pairs),
                  step_pairs=sum(p.meta.get("kind") == "step" for p in pairs),
                  whole_pairs=sum(p.meta.get("kind") == "whole" for p in pairs))
    log.info("prm800k: %s", dict(counts))
    return DatasetBundle(name="prm800k", train=train, eval=subsample(ev, n_eval, seed, "eval"), pairs=pairs,
                         answer_format="boxed")


def _problems(rows: list[dict]) -> list[Problem]:
    """One Problem per question; gold steps from any row that carries ground_truth_solution."""
    by_q: dict[str, Problem] = {}
    for r in rows:
        p = problem_from(r["problem"])
        have = by_q.get(p.question)
        if have is None:
            by_q[p.question] = p
        elif not have.steps and p.steps:
            have.steps = p.steps
    return list(by_q.values())


def _dedupe(pairs: list[StepPair], counts: Counter) -> list[StepPair]:
    seen: set = set()
    out = []
    for p in pairs:
        key = (p.question, tuple(p.prefix), tuple(p.chosen), tuple(p.rejected))
        if key in seen:
            counts["dropped_duplicate_pairs"] += 1
            continue
        seen.add(key)
        out.append(p)
    return out
