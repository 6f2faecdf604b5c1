"""Answer accuracy (greedy pass@1, optional sampled maj@k); the decoding itself is `generation.generate`.

Works for any `Problem` list: the built-in arith task, GSM8K (`#### answer`) and MATH-500
(`\\boxed{}` answer); `answers.extract_answer` finds the final answer and `answers.answers_match`
decides equivalence (exact, numeric, then math-verify). Problems whose `meta` carries `level` or
`subject` (MATH) also get per-level and per-subject accuracy.
"""

from __future__ import annotations

from collections import Counter
from typing import Sequence

from . import progress
from .answers import answers_match, extract_answer
from .outcome import solved
from .data import Problem, format_prompt
from .generation import generate, stop_from_config  # noqa: F401  (re-exported)
from .steps import split_steps  # noqa: F401  (sampled text -> exact steps; re-exported)




def majority_vote(answers: Sequence[str | None]) -> str | None:
    """The most frequent answer, counting equivalent answers ("0.5", "\\frac12") together.

    None (no answer found) never wins. Ties go to the answer seen first.
    """
    counts = Counter(a for a in answers if a is not None)  # exact duplicates first: few distinct strings remain
    clusters: list[list] = []  # [representative, votes], in order of first appearance
    for a, c in counts.items():
        for cl in clusters:
            if answers_match(a, cl[0]):
                cl[1] += c
                break
        else:
            clusters.append([a, c])
    return max(clusters, key=lambda cl: cl[1])[0] if clusters else None


def answer_of(c) -> str | None:
    """The answer a Completion states, or None when it hit max_new_tokens (finish_reason "length"):
    a cut-off solution is counted (`truncated`) and scored wrong, never read for an answer it
    may have stated on the way."""
    return None if c.finish_reason == "length" else extract_answer(c.text)


def math_accuracy(model, tokenizer, problems: Sequence[Problem], *, max_new_tokens: int = 128, batch_size: int = 64,
                  maj_k: int = 0, temperature: float = 0.7, seed: int = 0,
                  stop: Sequence[str] | None = None) -> tuple[dict[str, float], list[dict]]:
    """Greedy pass@1 (and maj@k if maj_k > 0) on `problems`.

    Returns (metrics, records); records hold question, output, predicted and gold answers, and
    correctness, one per problem. Metrics: `acc` (greedy pass@1), `n`, `no_answer` (share of
    outputs without an extractable answer, truncated ones included), `truncated` (share that hit
    max_new_tokens: raise eval.max_new_tokens when it is not ~0), `maj@k` (sampled majority vote, equivalent answers
    pooled), and `acc/level/<L>`, `acc/subject/<S>` when the problems carry those meta fields (MATH).
    """
    prompts = [format_prompt(p.question, tokenizer) for p in problems]
    # the bar's running accuracy applies the metric's own rule (countdown: every line valid, not just the answer)
    right = lambda c, p: answer_of(c) is not None and solved(c.text, p.answer, p.meta)  # noqa: E731
    with progress.bar("eval", len(prompts), unit="problem", on_outputs=progress.accuracy_so_far(problems, right)):
        outs = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size, stop=stop)
    records = []
    for p, (c,) in zip(problems, outs):
        pred = answer_of(c)
        records.append({"id": p.id, "question": p.question, "output": c.text, "pred": pred, "gold": p.answer,
                        "correct": right(c, p), "steps": split_steps(c.text),
                        "meta": p.meta,
                        "finish_reason": c.finish_reason})
    n = len(records) or float("nan")  # no held-out problem: every share is NaN, not 0 %
    metrics = {"acc": sum(r["correct"] for r in records) / n, "n": len(records),
               "no_answer": sum(r["pred"] is None for r in records) / n,
               "truncated": sum(r["finish_reason"] == "length" for r in records) / n}
    if maj_k > 0:
        samples = generate(model, tokenizer, prompts, max_new_tokens=max_new_tokens, batch_size=batch_size,
                           do_sample=True, temperature=temperature, num_return_sequences=maj_k, seed=seed, stop=stop)
        hits = 0
        for p, r, outs_k in zip(problems, records, samples):
            maj = majority_vote([answer_of(c) for c in outs_k])
            # the majority answer, right by the task's own rule in at least one sample that gives it (countdown:
            # a valid solution, not the copied target; elsewhere the same as the answer matching)
            r["maj_pred"] = maj
            r["maj_correct"] = answers_match(maj, p.answer) and any(
                answers_match(answer_of(c), maj) and solved(c.text, p.answer, p.meta) for c in outs_k)
            hits += r["maj_correct"]
        metrics[f"maj@{maj_k}"] = hits / n
    for key in ("level", "subject"):
        groups: dict[str, list[bool]] = {}
        for r in records:
            if key in r["meta"]:
                groups.setdefault(str(r["meta"][key]), []).append(r["correct"])
        for g, v in sorted(groups.items()):
            metrics[f"acc/{key}/{g}"] = sum(v) / len(v)
    return metrics, records
