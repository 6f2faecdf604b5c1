"""Step segmentation with character spans, and GSM8K calculator annotations.

    segment(text, mode)  -> list[str]              the steps, cleaned
    spans(text, mode)    -> list[tuple[int, int]]  where each step sits in `text`

Modes (`MODES`):
  lines       one step per non-blank line (GSM8K: "48/2 = <<48/2=24>>24 clips", "#### 72")
  paragraphs  blocks separated by blank lines (MATH solutions)
  markers     "Step k:" markers (Step-DPO); text before the first marker is a step of its own
  auto        markers when the text has at least two of them, otherwise paragraphs
  sentences   sentence ends (. ! ?) outside $...$, \\[...\\], \\(...\\) and [asy] blocks
  regex       split on a user separator regex (`pattern`); the separator itself is dropped
  none        the whole text is one step

Explicit step lists (PRM800K) need no segmentation: `clean_steps` tidies them the same way.

The model sees gold steps joined by "\\n" (`stepdpo.data.response_text`), so a step that itself
contains newlines would read as several steps to anything that splits generated text on lines;
`single_line=True` folds a step's inner line breaks into spaces.

Sampled solutions are split by `split_steps(text)`, which keeps the text exactly: one step per
non-blank line, each step carrying the line break(s) after it, so `"".join(steps) == text` and
`response_text(steps) == text` (the tokens trained are the tokens sampled).

GSM8K annotations: "<<48/2=24>>" claims 48/2 = 24. `annotations(step)` lists (expr, claimed);
`check_annotation(expr, claimed)` recomputes the expression with a whitelist AST walk (numbers,
+ - * / ** and parentheses only; never eval) in exact rational arithmetic. A claim passes when it
equals the value rounded to the decimals the claim shows ("100/3=33.33" and "100/3=33" pass,
"5/3=1" does not).
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction
from typing import Sequence

MODES = ("lines", "paragraphs", "markers", "auto", "sentences", "regex", "none")

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
STEP_MARKER = re.compile(r"(?<![A-Za-z])Step\s+\d+\s*[:.]", re.IGNORECASE)
_ANNOTATION = re.compile(r"<<([^<>]*)>>")
_INNER_NEWLINES = re.compile(r"\s*\n\s*")


# ----------------------------------------------------------------------------- segmentation


def _trim(text: str, a: int, b: int) -> tuple[int, int] | None:
    """[a, b) shrunk to exclude surrounding whitespace; None if nothing is left."""
    while a < b and text[a].isspace():
        a += 1
    while b > a and text[b - 1].isspace():
        b -= 1
    return (a, b) if a < b else None


def _split_on(text: str, seps: Sequence[tuple[int, int]]) -> list[tuple[int, int]]:
    """Spans of the pieces between separator spans (separators dropped, blanks skipped)."""
    out, pos = [], 0
    for s, e in seps:
        span = _trim(text, pos, s)
        if span:
            out.append(span)
        pos = e
    span = _trim(text, pos, len(text))
    if span:
        out.append(span)
    return out


def _marker_spans(text: str) -> list[tuple[int, int]]:
    starts = [m.start() for m in STEP_MARKER.finditer(text)]
    cuts = ([0] if not starts or starts[0] != 0 else []) + starts + [len(text)]
    out = []
    for a, b in zip(cuts, cuts[1:]):
        span = _trim(text, a, b)
        if span:
            out.append(span)
    return out


_MATH = re.compile(r"\[asy\].*?\[/asy\]|\$\$.*?\$\$|\\\[.*?\\\]|\\\(.*?\\\)"
                   r"|\\begin\{([A-Za-z]+\*?)\}.*?\\end\{\1\}|(?<!\\)\$.*?(?<!\\)\$", re.DOTALL)
_ABBREV = re.compile(r"(?:\be\.g|\bi\.e|\bvs|\bcf|\betc|\bDr|\bMr|\bMrs|\bMs|\bSt)$")


def _sentence_cuts(text: str) -> list[tuple[int, int]]:
    """Cut points after '.', '!' or '?' followed by whitespace then a capital letter, '$' or '\\'.

    Nothing inside math, environments or [asy] is cut. A period written just inside closing math
    ("$x = 3.$  So", "... = 5.\\end{align*} Then") ends a sentence too: MATH solutions put it there.
    """
    cuts, pos = [], 0
    for m in list(_MATH.finditer(text)) + [None]:
        stop = m.start() if m else len(text)
        for i in range(pos, stop):
            if text[i] in ".!?" and _sentence_follows(text, i + 1) and not _ABBREV.search(text[max(0, i - 4):i]):
                cuts.append((i + 1, i + 1))
        if m is None:
            break
        inner = re.sub(r"(\\end\{[A-Za-z]+\*?\}|\\\]|\\\)|\$+)$", "", m.group(0)).rstrip()
        if not m.group(0).startswith("[asy]") and inner[-1:] in (".", "!", "?") and _sentence_follows(text, m.end()):
            cuts.append((m.end(), m.end()))
        pos = m.end()
    return cuts


def _sentence_follows(text: str, pos: int) -> bool:
    return re.match(r"\s+[A-Z$\\\[]", text[pos:pos + 64]) is not None


_BLOCKS = re.compile(r"\[asy\].*?\[/asy\]|\$\$.*?\$\$|\\\[.*?\\\]|\\begin\{([A-Za-z]+\*?)\}.*?\\end\{\1\}", re.DOTALL)


def _paragraph_seps(text: str) -> list[tuple[int, int]]:
    """Blank-line separators outside [asy]...[/asy], $$...$$ and \\[...\\] blocks."""
    blocks = [(m.start(), m.end()) for m in _BLOCKS.finditer(text)]
    return [(m.start(), m.end()) for m in _BLANK_LINE.finditer(text)
            if not any(a < m.start() < b for a, b in blocks)]


def spans(text: str, mode: str = "lines", *, pattern: str | None = None) -> list[tuple[int, int]]:
    """Character spans [start, end) of each step of `text`, whitespace-trimmed, in order.

    `text[start:end]` is the raw step text (before `segment`'s cleaning). Blank steps are omitted.
    """
    if not isinstance(text, str):
        raise TypeError(f"steps.spans: text must be str, got {type(text).__name__}")
    if mode == "lines":
        seps = [(m.start(), m.end()) for m in re.finditer(r"\n", text)]
        return _split_on(text, seps)
    if mode == "paragraphs":
        return _split_on(text, _paragraph_seps(text))
    if mode == "markers":
        return _marker_spans(text)
    if mode == "auto":
        if len(STEP_MARKER.findall(text)) >= 2:
            return _marker_spans(text)
        return _split_on(text, _paragraph_seps(text))
    if mode == "sentences":
        out = []
        for a, b in _split_on(text, _paragraph_seps(text)):
            para = text[a:b]
            out += [(a + s, a + e) for s, e in _split_on(para, _sentence_cuts(para))]
        return out
    if mode == "regex":
        if not pattern:
            raise ValueError("steps: mode 'regex' needs a separator `pattern` (e.g. step_pattern: '\\n\\n|;')")
        try:
            rx = re.compile(pattern)
        except re.error as e:
            raise ValueError(f"steps: invalid separator pattern {pattern!r} ({e})") from None
        return _split_on(text, [(m.start(), m.end()) for m in rx.finditer(text) if m.end() > m.start()])
    if mode == "none":
        span = _trim(text, 0, len(text))
        return [span] if span else []
    raise ValueError(f"steps: unknown mode {mode!r}; choose one of {MODES}")


_AFTER_LINE_BREAKS = re.compile(r"(?<=\n)(?=[^\n])")  # just after a run of line breaks


def split_steps(text: str) -> list[str]:
    """Steps of a sampled solution, exactly as written: one per non-blank line, each ending with the
    line break(s) that follow it (".\\n\\n" stays ".\\n\\n"); blank or whitespace-only lines stay with
    the step before them (leading ones with the first step). `"".join(split_steps(t)) == t` for any
    `t` that is not all whitespace (which has no steps: []).

    Cut points sit just after a run of line breaks, where byte-level BPE pre-tokenizers (Qwen,
    Llama-3, GPT-2) always start a new pre-token, so the steps' tokens are the text's tokens."""
    out: list[str] = []
    lead = ""
    for piece in _AFTER_LINE_BREAKS.split(text):
        if not piece.strip():
            if out:
                out[-1] += piece
            else:
                lead += piece
            continue
        out.append(lead + piece)
        lead = ""
    return out


def clean_step(step: str, *, strip_annotations: bool = False, single_line: bool = False) -> str:
    if strip_annotations:
        step = strip_annotation_marks(step)
    if single_line:
        step = _INNER_NEWLINES.sub(" ", step)
    return step.strip()


def clean_steps(steps: Sequence[str], *, strip_annotations: bool = False, single_line: bool = False) -> list[str]:
    """Tidy an explicit list of steps (PRM800K, pair files): strip, optionally fold lines, drop blanks."""
    out = [clean_step(s, strip_annotations=strip_annotations, single_line=single_line) for s in steps]
    return [s for s in out if s]


def segment(text: str, mode: str = "lines", *, pattern: str | None = None, strip_annotations: bool = False,
            single_line: bool = False) -> list[str]:
    """Split `text` into steps (see the module docstring for the modes)."""
    return clean_steps([text[a:b] for a, b in spans(text, mode, pattern=pattern)],
                       strip_annotations=strip_annotations, single_line=single_line)


# ----------------------------------------------------------------------------- GSM8K annotations


def strip_annotation_marks(text: str) -> str:
    """Remove "<<a=b>>" calculator annotations: "48/2 = <<48/2=24>>24" -> "48/2 = 24"."""
    return _ANNOTATION.sub("", text)


def annotation_matches(step: str) -> list[tuple[int, int, str, str]]:
    """(start, end, expr, claimed) of every "<<expr=claimed>>" in `step` (split at the last '=')."""
    out = []
    for m in _ANNOTATION.finditer(step):
        body = m.group(1)
        expr, eq, claimed = body.rpartition("=")
        if not eq:
            expr, claimed = body, ""
        out.append((m.start(), m.end(), expr.strip(), claimed.strip()))
    return out


def annotations(step: str) -> list[tuple[str, str]]:
    """[(expr, claimed_result)] for each "<<expr=claimed_result>>" annotation in `step`."""
    return [(e, c) for _, _, e, c in annotation_matches(step)]


_LEADING_ZEROS = re.compile(r"(?<![\d.])0+(?=\d)")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"[-+]?(?:\d+\.?\d*|\.\d+)")
MAX_EXPR_CHARS = 300
MAX_EXPONENT = 64


def strip_thousands(s: str) -> str:
    """"1,080,000" -> "1080000" (only commas that group digits in threes)."""
    return _THOUSANDS.sub("", s)


def parse_number(s: str) -> Fraction | None:
    """An exact number from "1,080", "-0.5", ".5", "$12", "12." ; None if `s` is not one number."""
    s = _THOUSANDS.sub("", s.strip().lstrip("$").rstrip("."))
    if not _NUMBER.fullmatch(s):
        return None
    return Fraction(s)


def _eval(node: ast.AST) -> Fraction:
    if isinstance(node, ast.Expression):
        return _eval(node.body)
    if isinstance(node, ast.Constant) and type(node.value) in (int, float):
        return Fraction(str(node.value)) if isinstance(node.value, float) else Fraction(node.value)
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.UAdd, ast.USub)):
        v = _eval(node.operand)
        return -v if isinstance(node.op, ast.USub) else v
    if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div, ast.Pow)):
        a, b = _eval(node.left), _eval(node.right)
        if isinstance(node.op, ast.Add):
            return a + b
        if isinstance(node.op, ast.Sub):
            return a - b
        if isinstance(node.op, ast.Mult):
            return a * b
        if isinstance(node.op, ast.Div):
            if b == 0:
                raise ZeroDivisionError("division by zero")
            return a / b
        if b.denominator == 1 and abs(b) <= MAX_EXPONENT and not (a == 0 and b < 0):
            return a ** int(b)
        if a < 0 or abs(b) > MAX_EXPONENT or (a == 0 and b < 0):
            raise ValueError("unsupported power")
        return Fraction(float(a) ** float(b))  # fractional exponent: float precision
    raise ValueError(f"disallowed syntax {type(node).__name__}")


def evaluate_expression(expr: str) -> Fraction | None:
    """Value of an arithmetic expression (numbers, + - * / **, parentheses), or None if it is not one.

    Parsed with `ast` and walked over a whitelist: names, calls, attributes, comparisons and every
    other construct are rejected, so no code ever runs. Exponents are limited to |e| <= 64.
    """
    s = expr.strip()
    if not s or len(s) > MAX_EXPR_CHARS:
        return None
    s = _THOUSANDS.sub("", s)
    s = _LEADING_ZEROS.sub("", s)
    try:
        return _eval(ast.parse(s, mode="eval"))
    except (SyntaxError, ValueError, ZeroDivisionError, OverflowError, TypeError, RecursionError, MemoryError):
        return None


def _decimals(claimed: str) -> int:
    s = claimed.strip().rstrip(".")
    return len(s.split(".", 1)[1]) if "." in s else 0


def annotation_status(expr: str, claimed: str) -> str:
    """"ok" (claim = value rounded to the claim's decimals), "wrong", or "unparsable"."""
    value, claim = evaluate_expression(expr), parse_number(claimed)
    if value is None or claim is None:
        return "unparsable"
    if value == claim:
        return "ok"
    tol = Fraction(1, 2 * 10 ** _decimals(claimed))
    return "ok" if abs(value - claim) <= tol else "wrong"


def check_annotation(expr: str, claimed: str) -> bool:
    """True if `expr` recomputes to `claimed` (up to the rounding the claim shows)."""
    return annotation_status(expr, claimed) == "ok"


def format_number(v: Fraction, max_decimals: int = 4) -> str:
    """"24", "0.5", "-3.25"; non-terminating values rounded to `max_decimals`."""
    if v.denominator == 1:
        return str(v.numerator)
    s = f"{float(v):.{max_decimals}f}".rstrip("0").rstrip(".")
    return "0" if s in ("-0", "") else s
