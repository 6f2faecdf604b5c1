"""Final-answer extraction and equivalence (math-verify), shared by rewards and evaluation."""

from __future__ import annotations

import re
from functools import lru_cache

_ANSWER_LINE = re.compile(r"(?:The answer is|Answer:)\s*([^\n]+?)\s*\.?\s*$", re.IGNORECASE | re.MULTILINE)
_GSM8K = re.compile(r"####\s*([^\n]+)")


def last_boxed(text: str) -> str | None:
    """Content of the last \\boxed{...} (or \\fbox{...}) with balanced braces, or None."""
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start < 0:
        return None
    i = text.index("{", start) + 1
    depth = 1
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i:j]
    return None


def extract_answer(text: str) -> str | None:
    """The final answer of a generated solution, trying in order: \\boxed{}, '#### x', 'The answer is x'."""
    boxed = last_boxed(text)
    if boxed is not None:
        return boxed.strip()
    m = _GSM8K.findall(text)
    if m:
        return m[-1].strip()
    m = _ANSWER_LINE.findall(text)
    if m:
        return m[-1].strip()
    return None


def _normalize_number(s: str) -> str:
    s = s.strip().rstrip(".").replace(",", "").replace("$", "")
    return s


@lru_cache(maxsize=65536)
def answers_match(pred: str | None, gold: str) -> bool:
    """True if `pred` and `gold` are the same answer: exact/numeric first, math-verify otherwise."""
    if pred is None:
        return False
    a, b = _normalize_number(pred), _normalize_number(gold)
    if a == b:
        return True
    try:
        return float(a) == float(b)
    except ValueError:
        pass
    from math_verify import parse, verify  # late import: heavy (sympy)

    try:
        return bool(verify(parse(f"${gold}$"), parse(f"${pred}$")))
    except Exception:  # math-verify raises on unparsable LaTeX; treat as no match
        return False
