"""Step segmentation with character spans.

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

GSM8K's "<<48/2=24>>" calculator annotations (stripped with `strip_annotations=True`) are read and
checked in `stepdpo.calculator`.
"""

from __future__ import annotations

import re
from typing import Sequence

from .calculator import strip_annotation_marks

MODES = ("lines", "paragraphs", "markers", "auto", "sentences", "regex", "none")

_BLANK_LINE = re.compile(r"\n[ \t\r\f\v]*\n")
STEP_MARKER = re.compile(r"(?<![A-Za-z])Step\s+\d+\s*[:.]", re.IGNORECASE)
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
