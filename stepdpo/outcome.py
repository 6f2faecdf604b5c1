"""Is a solution right? The one outcome check shared by evaluation, pair building and rollout values.

For most tasks a solution is right when its final answer matches the reference (`answers.extract_answer`
+ `answers.answers_match`). A task whose question states the answer needs more: countdown gives the
target in the question, so "The answer is <target>" alone is free (a model that can't add learns to
copy it); there a solution is right only when every line is valid arithmetic on the available numbers
and the last one states the target (`stepdpo.countdown.check_steps`).
"""

from __future__ import annotations

from .answers import answers_match, extract_answer


def solved(text: str, answer: str, meta: dict | None = None) -> bool:
    """Is the solution `text` (steps one per line) right for the reference `answer` (and the problem's meta)?"""
    if (meta or {}).get("kind") == "countdown":
        from .countdown import ANSWER_RE, check_steps

        steps = [s.strip() for s in text.split("\n") if s.strip()]
        return bool(steps) and bool(ANSWER_RE.match(steps[-1])) and all(s == 1.0 for s in check_steps(meta, steps))
    return answers_match(extract_answer(text), answer)
