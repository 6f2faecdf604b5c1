"""`dataset=gsm8k`: GSM8K grade-school math (Cobbe et al., 2021).

Rows are {"question", "answer"}; the answer is one reasoning step per line with calculator
annotations ("48/2 = <<48/2=24>>24 clips") and ends with "#### 72". A Problem's `answer` is the
text after "####" (thousands commas removed); its `steps` are the lines before it, plus the line
"#### 72" itself when `answer_step` is true, so the model learns to state the answer in the form
evaluation extracts (answer_format "gsm8k").

    load(path="../shared/data/gsm8k")      local train.jsonl (train) + test.jsonl (eval)
    load(path=None)                        the Hub's openai/gsm8k "main" (needs network)
"""

from __future__ import annotations

from pathlib import Path

from ..data import DatasetBundle, Problem, check_field
from ..calculator import annotations, strip_annotation_marks, strip_thousands
from ..steps import segment
from .common import (InvalidRows, check_count, check_policies, convert_rows, problem_from, read_converted,
                     read_train_eval, row_number, subsample)

HUB_ID = "openai/gsm8k"


def convert(row: dict, where: str, *, split: str = "train", strip_annotations: bool = False, answer_step: bool = True,
            single_line: bool = True) -> dict:
    """One GSM8K row -> Problem fields; ValueError naming where and the field when it is malformed."""
    question = check_field(row, "question", str, where)
    answer = check_field(row, "answer", str, where)
    if "####" not in answer:
        raise ValueError(f"{where}: field 'answer' has no '#### <final answer>' line (GSM8K answers end with one)")
    body, _, final = answer.rpartition("####")
    final = final.strip()
    if not final:
        raise ValueError(f"{where}: field 'answer' has nothing after '####' (write the final answer there)")
    raw = segment(body, "lines")
    if not raw:
        raise ValueError(f"{where}: field 'answer' has no reasoning lines before '####'")
    steps = [strip_annotation_marks(s).strip() for s in raw] if strip_annotations else list(raw)
    if answer_step:
        steps.append(f"#### {final}")
    meta = {"source": "gsm8k", "split": split, "where": where,
            "n_annotations": sum(len(annotations(s)) for s in raw)}
    if strip_annotations:  # keep them for rule checks and corruption (stepdpo.perturb)
        meta["annotated_steps"] = raw + ([f"#### {final}"] if answer_step else [])
    n = row_number(where)
    return {"id": f"gsm8k-{split}-{n}", "question": question.strip(), "answer": strip_thousands(final),
            "steps": steps, "meta": meta}


def read_problems(path: Path, invalid: InvalidRows, *, split: str = "train", **opts) -> list[Problem]:
    return [problem_from(d) for _, d in read_converted(path, convert, invalid, split=split, **opts)]


def load(*, path: str | None = "../shared/data/gsm8k", eval_path: str | None = None,
         eval_fraction: float | None = None, n_train: int | None = None, n_eval: int | None = None, seed: int = 0,
         on_invalid: str = "error", truncation: str = "error", strip_annotations: bool = False,
         answer_step: bool = True, n_pool: int = 0) -> DatasetBundle:
    """GSM8K problems. `path`: a directory with train.jsonl/test.jsonl, a JSONL file (then give
    `eval_path` or `eval_fraction`), or None for the Hub's openai/gsm8k. `n_pool`: that many of the
    training problems left out by `n_train` become answer-only pool problems (gold steps withheld)."""
    check_policies(on_invalid, truncation)
    check_count(n_train, "dataset.n_train")
    check_count(n_pool, "dataset.n_pool")
    check_count(n_eval, "dataset.n_eval")
    opts = {"strip_annotations": strip_annotations, "answer_step": answer_step}
    if path is None:
        train, ev = _from_hub(on_invalid, opts)
    else:
        train, ev = read_train_eval(read_problems, path, eval_path, eval_fraction, on_invalid=on_invalid, seed=seed,
                                    **opts)
    sft = subsample(train, n_train, seed, "train")
    pool = []
    if n_pool:
        used = {p.question for p in sft}
        rest = [p for p in train if p.question not in used]
        if n_pool > len(rest):
            raise ValueError(f"dataset.n_pool={n_pool}: only {len(rest)} training problems are left outside "
                             f"dataset.n_train={n_train}; lower dataset.n_pool or dataset.n_train")
        pool = [Problem(id=p.id, question=p.question, answer=p.answer, steps=[], meta=p.meta)
                for p in subsample(rest, n_pool, seed, "pool")]
    return DatasetBundle(name="gsm8k", train=sft, eval=subsample(ev, n_eval, seed, "eval"), answer_format="gsm8k",
                         pool=pool)


def _from_hub(on_invalid: str, opts: dict) -> tuple[list[Problem], list[Problem]]:
    """openai/gsm8k "main" from the Hugging Face Hub (cached by `datasets` after the first download)."""
    from datasets import load_dataset  # late import: heavy

    dd = load_dataset(HUB_ID, "main")
    out = []
    for split in ("train", "test"):
        invalid = InvalidRows(on_invalid, f"{HUB_ID}:{split}")
        probs = []
        for where, d, err in convert_rows(dd[split], convert, source=f"{HUB_ID}:{split}", from_text=False,
                                          split=split, **opts):
            invalid.rows += 1
            if err:
                invalid.bad(err)
            else:
                probs.append(problem_from(d))
        invalid.log()
        out.append(probs)
    return out[0], out[1]
