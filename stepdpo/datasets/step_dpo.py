"""`dataset=step_dpo`: Math-Step-DPO-10K (Lai et al., 2024) -> step pairs and problems.

Rows (Hub: xinlai/Math-Step-DPO-10K, 10,795 rows, one "train" split):

    {"dataset": "MATH_Rephrased", "prompt": <question>,
     "initial_reason_steps": "Let's think step by step.\\nStep 1: ...\\nStep 2: ...\\nStep 3:",
     "chosen": <correct step 3>, "rejected": <wrong step 3>,
     "full_chosen": <correct step 3 and the rest of that solution>, "full_rejected": <...>,
     "answer": <final answer>}

`initial_reason_steps` ends with the marker ("Step 3:") of the step where the two continue
differently. The pair's prefix is its steps before that (segmented on "Step k:" markers; the
"Let's think step by step." preamble is a step of its own); chosen/rejected are the single steps
"Step 3: <chosen>" / "Step 3: <rejected>" (or, with `full_continuation`, every remaining step of
full_chosen / full_rejected). Scores: `chosen_score` for every chosen step, `rejected_score` for
every rejected step (the first wrong one and everything built on it).

A Problem per distinct prompt: its steps are the prefix followed by full_chosen (a correct
solution), its answer the `answer` field or the last \\boxed{} of full_chosen.
"""

from __future__ import annotations

import hashlib
import logging
import re
from pathlib import Path

from ..answers import last_boxed
from ..data import DatasetBundle, Problem, StepPair, check_field
from ..steps import STEP_MARKER, clean_steps, segment
from .common import (InvalidRows, check_count, check_fraction, check_policies, convert_rows, dedupe_problems, holdout,
                     pairs_for, problem_from, read_converted, resolve_path, row_number, subsample)
from .eval_file import train_and_eval

log = logging.getLogger(__name__)

HUB_ID = "xinlai/Math-Step-DPO-10K"
_TRAILING_MARKER = re.compile(r"(?<![A-Za-z])(Step\s+\d+\s*[:.])\s*$", re.IGNORECASE)


def split_initial(initial: str, *, single_line: bool = True) -> tuple[list[str], str]:
    """(prefix steps, open marker): "A.\\nStep 1: x\\nStep 2:" -> (["A.", "Step 1: x"], "Step 2:")."""
    m = _TRAILING_MARKER.search(initial)
    lead = m.group(1).strip() if m else ""
    body = initial[:m.start()] if m else initial
    return segment(body, "markers", single_line=single_line), lead


def _with_lead(lead: str, text: str) -> str:
    text = text.strip()
    if not lead or STEP_MARKER.match(text):
        return text
    return f"{lead} {text}"


def convert(row: dict, where: str, *, full_continuation: bool = False, chosen_score: float = 1.0,
            rejected_score: float = 0.0, single_line: bool = True) -> dict:
    """One Step-DPO row -> {pair, problem}; ValueError naming where and the field when malformed."""
    prompt = check_field(row, "prompt", str, where).strip()
    initial = check_field(row, "initial_reason_steps", str, where, nonempty=False)
    chosen_step = check_field(row, "chosen", str, where)
    rejected_step = check_field(row, "rejected", str, where)
    full_chosen = row.get("full_chosen")
    full_rejected = row.get("full_rejected")
    for key, v in (("full_chosen", full_chosen), ("full_rejected", full_rejected)):
        if v is not None and not isinstance(v, str):
            raise ValueError(f"{where}: field '{key}' must be a string or absent, got {type(v).__name__}")
    prefix, lead = split_initial(initial, single_line=single_line)

    def continuation(single: str, full: str | None) -> list[str]:
        if full_continuation and full:
            return clean_steps(segment(_with_lead(lead, full), "markers"), single_line=single_line)
        return clean_steps([_with_lead(lead, single)], single_line=single_line)

    chosen = continuation(chosen_step, full_chosen)
    rejected = continuation(rejected_step, full_rejected)
    if full_continuation and not (full_chosen and full_rejected):
        raise ValueError(f"{where}: field 'full_chosen'/'full_rejected' missing; dataset.full_continuation=true "
                         "needs both (or set it to false to use the single chosen/rejected steps)")
    if chosen == rejected:
        raise ValueError(f"{where}: field 'chosen' equals field 'rejected'; a pair needs two different steps")
    answer = row.get("answer")
    if answer is not None and not isinstance(answer, (str, int, float)):
        raise ValueError(f"{where}: field 'answer' must be a string, got {type(answer).__name__}")
    answer = str(answer).strip() if answer is not None else (last_boxed(full_chosen or chosen_step) or "").strip()
    gold = []  # the problem's gold solution: prefix + the whole chosen continuation
    if full_chosen:
        gold = prefix + clean_steps(segment(_with_lead(lead, full_chosen), "markers"), single_line=single_line)
    meta = {"where": where, "dataset": row.get("dataset")}
    pid = "step_dpo-" + hashlib.sha1(prompt.encode("utf-8")).hexdigest()[:12]
    pair = {"id": f"step_dpo-{row_number(where)}", "question": prompt, "answer": answer,
            "prefix": prefix, "chosen": chosen, "rejected": rejected,
            "chosen_scores": [chosen_score] * len(chosen), "rejected_scores": [rejected_score] * len(rejected),
            "source": "step_dpo", "meta": {**meta, "problem_id": pid}}
    problem = {"id": pid, "question": prompt, "answer": answer, "steps": gold,
               "meta": {**meta, "source": "step_dpo"}}
    return {"pair": pair, "problem": problem}


def read_problems(path: Path, invalid: InvalidRows, *, split: str = "eval", single_line: bool = True,
                  **_) -> list[Problem]:
    rows = read_converted(path, convert, invalid, single_line=single_line)
    return dedupe_problems(problem_from(d["problem"]) for _, d in rows)


def _read(path: str | None, hub_id: str, on_invalid: str, opts: dict) -> list[dict]:
    if path is None:
        from datasets import load_dataset  # late import: heavy; needs network the first time

        source, ds, from_text = f"{hub_id}:train", load_dataset(hub_id, split="train"), False
    else:
        p = resolve_path(path, "dataset.path")
        if p.is_dir():
            p = next((p / n for n in ("train.jsonl", "train.parquet") if (p / n).exists()), p / "train.jsonl")
        if p.suffix == ".parquet":
            from datasets import load_dataset

            source, ds, from_text = str(p), load_dataset("parquet", data_files=str(p), split="train"), False
        else:
            source, ds, from_text = str(p), None, True
    invalid = InvalidRows(on_invalid, source)
    if ds is None:
        rows = [d for _, d in read_converted(Path(source), convert, invalid, **opts)]
    else:
        rows = []
        for _, d, err in convert_rows(ds, convert, source=source, from_text=from_text, **opts):
            invalid.rows += 1
            if err:
                invalid.bad(err)
            else:
                rows.append(d)
    invalid.log()
    return rows


def load(*, path: str | None = "???", hub_id: str = HUB_ID, eval_path: str | None = "../shared/data/math500/test.jsonl",
         eval_fraction: float | None = None, n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
         on_invalid: str = "error", truncation: str = "error", full_continuation: bool = False,
         chosen_score: float = 1.0,
         rejected_score: float = 0.0, single_line: bool = True, max_pairs: int | None = None) -> DatasetBundle:
    """Step-DPO pairs and their problems. `path`: a local .jsonl/.parquet file (or a directory with
    train.jsonl/train.parquet); None downloads `hub_id` from the Hugging Face Hub."""
    check_policies(on_invalid, truncation)
    for key, n in (("n_train", n_train), ("n_eval", n_eval), ("max_pairs", max_pairs)):
        check_count(n, f"dataset.{key}")
    check_fraction(eval_fraction, "dataset.eval_fraction")
    for key, s in (("chosen_score", chosen_score), ("rejected_score", rejected_score)):
        if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 <= s <= 1.0:
            raise ValueError(f"dataset.{key}: must be a number in [0, 1], got {s!r}")
    from ..weights import WRONG, is_wrong

    if not is_wrong(rejected_score) or is_wrong(chosen_score):  # else the pairs' first error is lost
        raise ValueError(f"dataset.rejected_score must be below {WRONG} (a wrong step) and dataset.chosen_score at "
                         f"least {WRONG}; got {rejected_score} and {chosen_score}")
    if eval_path is not None and eval_fraction is not None:
        raise ValueError("dataset.eval_path and dataset.eval_fraction both set: keep one")
    rows = _read(path, hub_id, on_invalid, {"full_continuation": full_continuation, "chosen_score": float(chosen_score),
                                            "rejected_score": float(rejected_score), "single_line": single_line})
    problems = dedupe_problems(problem_from(r["problem"]) for r in rows)
    pairs = [StepPair.from_dict(r["pair"]) for r in rows]
    if eval_path is not None:
        train, ev = train_and_eval(problems, eval_path, seed=seed, on_invalid=on_invalid, single_line=single_line)
        if len(train) < len(problems):
            log.warning("step_dpo: dropped %d training problems that are in the eval set", len(problems) - len(train))
    else:
        train, ev = holdout(problems, eval_fraction or 0.0, seed)
    train = subsample(train, n_train, seed, "train")
    pairs = subsample(pairs_for(pairs, train), max_pairs, seed, "pairs")
    return DatasetBundle(name="step_dpo", train=train, eval=subsample(ev, n_eval, seed, "eval"), pairs=pairs,
                         answer_format="boxed")
