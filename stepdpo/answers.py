"""Final-answer extraction and equivalence (math-verify), shared by rewards and evaluation."""

from __future__ import annotations

import re
from functools import lru_cache

# "The answer is x", "The final answer is: x", "Final Answer: x", "**Answer:** x", Minerva's
# "Final Answer: The final answer is $18$. I hope it is correct." (the last phrase wins).
_ANSWER_PHRASE = re.compile(r"(?:\bthe\s+(?:final\s+)?answer\s+is|\bfinal\s+answer\s+is"
                            r"|^[ \t*#]*(?:final\s+)?answer[ \t*]*:)(?:\s*:)?[ \t*]*",
                            re.IGNORECASE | re.MULTILINE)  # "Answer:" only opening a line: not "check our answer: ..."
_GSM8K = re.compile(r"####[ \t]*([^\n]+)")
_SENTENCE_END = re.compile(r"\.(?=\s|$)")  # a period that ends a sentence (not 3.5)
_TRAILING = re.compile(r"(?:\s|\.|,|;|!|\*\*?)+$")
_LEADING = re.compile(r"^(?:\s|\*\*?|:)+")
_WRAPPERS = ((r"\(", r"\)"), (r"\[", r"\]"), ("$$", "$$"), ("$", "$"))


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


def clean_answer(s: str) -> str:
    """An extracted answer without the dressing around it: surrounding whitespace and bold, a
    trailing period/comma, one pair of math delimiters ($18$, \\(18\\)), a leading currency
    sign ("\\$18", "$18"). "1,080" keeps its commas (`answers_match` reads them as thousands)."""
    s = _TRAILING.sub("", _LEADING.sub("", s))
    for a, b in _WRAPPERS:
        if len(s) > len(a) + len(b) and s.startswith(a) and s.endswith(b):
            s = _TRAILING.sub("", s[len(a):-len(b)].strip())
            break
    if s.startswith("\\$"):
        s = s[2:]
    elif s.startswith("$") and s.count("$") == 1:
        s = s[1:]
    return s.strip()


def _phrase_answer(text: str) -> tuple[int, str] | None:
    """(position, answer) of the last "answer is ..." phrase: the rest of its line, up to the end of
    the sentence ("... is $18$. I hope it is correct." -> "$18$"); a \\boxed{} in it wins."""
    m = None
    for m in _ANSWER_PHRASE.finditer(text):
        pass
    if m is None:
        return None
    rest = text[m.end():].split("\n", 1)[0]
    boxed = last_boxed(rest)
    if boxed is not None:
        return m.start(), boxed
    if (inner := _ANSWER_PHRASE.search(rest)) is not None:  # "Final Answer: The final answer is 18"
        rest = rest[inner.end():]
    cut = _SENTENCE_END.search(rest)
    rest = rest[:cut.start()] if cut else rest
    return (m.start(), rest) if rest.strip() else None


def extract_answer(text: str) -> str | None:
    """The final answer of a solution: the latest of '\\boxed{x}', '#### x' and an "answer is x"
    phrase ("The answer is x", "The final answer is: x", "Final Answer: x", Minerva's "Final Answer:
    The final answer is $x$. I hope it is correct."), cleaned by `clean_answer`; None when none is
    there. The one extractor: evaluation, pair grading and reward=rule all call it."""
    found: list[tuple[int, str]] = []
    start = max(text.rfind("\\boxed{"), text.rfind("\\fbox{"))
    if start >= 0 and (boxed := last_boxed(text)) is not None:
        found.append((start, boxed))
    gsm = list(_GSM8K.finditer(text))
    if gsm:
        found.append((gsm[-1].start(), gsm[-1].group(1)))
    if (phrase := _phrase_answer(text)) is not None:
        found.append(phrase)
    for _, ans in sorted(found, key=lambda f: -f[0]):
        ans = clean_answer(ans)
        if ans:
            return ans
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
