"""Step segmentation (every mode, spans), GSM8K annotations (safe recomputation), and the exact
annotation figures of the real GSM8K data in ../shared/data."""

from __future__ import annotations

from fractions import Fraction
from pathlib import Path

import pytest

from stepdpo.data import read_jsonl
from stepdpo.calculator import (annotation_status, annotations, check_annotation, evaluate_expression, format_number,
                                parse_number, strip_annotation_marks)
from stepdpo.steps import MODES, clean_steps, segment, spans

DATA = Path(__file__).parents[1].parent / "shared" / "data"
needs_data = pytest.mark.skipif(not (DATA / "gsm8k" / "train.jsonl").exists(), reason=f"shared data not at {DATA}")


def _check_spans(text: str, mode: str, **kw) -> list[str]:
    sp = spans(text, mode, **kw)
    assert all(0 <= a < b <= len(text) for a, b in sp)
    assert all(b1 <= a2 for (_, b1), (a2, _) in zip(sp, sp[1:])), "spans overlap or are out of order"
    raw = [text[a:b] for a, b in sp]
    assert raw == [r.strip() for r in raw], "spans are whitespace-trimmed"
    return raw


def test_lines_keep_annotations_and_answer_line():
    text = "Natalia sold 48/2 = <<48/2=24>>24 clips in May.\n\nShe sold 48+24 = <<48+24=72>>72.\n#### 72"
    assert _check_spans(text, "lines") == segment(text, "lines") == [
        "Natalia sold 48/2 = <<48/2=24>>24 clips in May.", "She sold 48+24 = <<48+24=72>>72.", "#### 72"]
    assert segment(text, "lines", strip_annotations=True)[:2] == ["Natalia sold 48/2 = 24 clips in May.",
                                                                    "She sold 48+24 = 72."]


def test_paragraphs_keep_asy_and_display_blocks_whole():
    text = ("First we note $x = 2$.\nThen $y = 3$.\n\n[asy]\ndraw((0,0)--(1,1));\n\nlabel(\"A\");\n[/asy]\n\n"
            "\\[\na = 1\n\n b = 2\n\\]\n\n  \nSo the answer is $\\boxed{5}$.")
    raw = _check_spans(text, "paragraphs")
    assert len(raw) == 4
    assert raw[1].startswith("[asy]") and raw[1].endswith("[/asy]")
    assert raw[2].startswith("\\[") and raw[2].endswith("\\]")
    steps = segment(text, "paragraphs", single_line=True)
    assert steps[0] == "First we note $x = 2$. Then $y = 3$."
    assert all("\n" not in s for s in steps)


def test_step_markers_with_preamble():
    text = "Let's think step by step. Step 1: Add 2 and 3 to get 5.\nStep 2: Double it: 10.\nStep 10: Done."
    assert _check_spans(text, "markers") == ["Let's think step by step.", "Step 1: Add 2 and 3 to get 5.",
                                             "Step 2: Double it: 10.", "Step 10: Done."]
    assert segment("Step 1: a\nStep 2: b", "markers") == ["Step 1: a", "Step 2: b"]  # no preamble step
    assert segment("no markers here", "markers") == ["no markers here"]


def test_auto_prefers_markers_else_paragraphs():
    assert segment("Step 1: a.\nStep 2: b.", "auto") == ["Step 1: a.", "Step 2: b."]
    assert segment("One.\nStill one.\n\nTwo.", "auto") == ["One.\nStill one.", "Two."]


def test_sentences_respect_math():
    text = ("We have that $r = \\sqrt{0^2 + 3^2} = 3.$  Also, the angle is $\\frac{\\pi}{2}$. The value $3.5$ "
            "stays whole, e.g. here. Then \\begin{align*} a &= 1. \\\\ B &= 2.\\end{align*} So $\\boxed{3}$.")
    assert segment(text, "sentences") == [
        "We have that $r = \\sqrt{0^2 + 3^2} = 3.$", "Also, the angle is $\\frac{\\pi}{2}$.",
        "The value $3.5$ stays whole, e.g. here.", "Then \\begin{align*} a &= 1. \\\\ B &= 2.\\end{align*}",
        "So $\\boxed{3}$."]
    _check_spans(text, "sentences")


def test_regex_separator_and_none():
    assert _check_spans("a; b;; c", "regex", pattern=r";") == ["a", "b", "c"]
    assert segment("x1 THEN x2", "regex", pattern=r"\s*THEN\s*") == ["x1", "x2"]
    assert segment("  all of it \n here ", "none") == ["all of it \n here"]
    with pytest.raises(ValueError, match="needs a separator `pattern`"):
        segment("a", "regex")
    with pytest.raises(ValueError, match="invalid separator pattern"):
        segment("a", "regex", pattern="(")
    with pytest.raises(ValueError, match="unknown mode 'words'"):
        segment("a", "words")
    assert set(MODES) >= {"lines", "paragraphs", "markers", "sentences", "regex"}


def test_empty_text_and_clean_steps():
    for mode in ("lines", "paragraphs", "markers", "auto", "sentences", "none"):
        assert segment("", mode) == [] and segment(" \n\n ", mode) == []
    assert clean_steps([" a\n b ", "", "  ", "c"], single_line=True) == ["a b", "c"]


# ----------------------------------------------------------------------------- annotations


def test_annotations_listed_and_stripped():
    step = "He pays 3 * 4 = $<<3*4=12>>12 and 12 + 1 = <<12+1=13>>13."
    assert annotations(step) == [("3*4", "12"), ("12+1", "13")]
    assert strip_annotation_marks(step) == "He pays 3 * 4 = $12 and 12 + 1 = 13."
    assert annotations("no annotation") == []


@pytest.mark.parametrize("expr,claimed,status", [
    ("48/2", "24", "ok"),
    ("0.2*50", "10", "ok"),
    ("0.1+0.2", "0.3", "ok"),                 # exact rational arithmetic, no float noise
    ("100/3", "33.33", "ok"),                 # rounded to the decimals the claim shows
    ("100/3", "33", "ok"),
    ("5/3", "1", "wrong"),                    # truncated, not rounded
    ("2**3", "8", "ok"),
    ("-(3-5)*2", "4", "ok"),
    ("1,000/4", "250", "ok"),                 # thousands separators
    ("05+1", "6", "ok"),                      # leading zeros
    ("48/2", "25", "wrong"),
    ("48/2", "$24", "ok"),
    ("560//10", "56", "unparsable"),          # floor division is not in the whitelist
    ("1/0", "1", "unparsable"),
    ("2**10**10", "1", "unparsable"),         # exponent limit: no huge powers
    ("x+1", "2", "unparsable"),
    ("__import__('os').getcwd()", "1", "unparsable"),
    ("(lambda: 1)()", "1", "unparsable"),
    ("[1][0]", "1", "unparsable"),
    ("48/2", "twenty", "unparsable"),
])
def test_check_annotation(expr, claimed, status):
    assert annotation_status(expr, claimed) == status
    assert check_annotation(expr, claimed) is (status == "ok")


def test_no_code_runs(tmp_path):
    target = tmp_path / "pwned"
    for expr in (f"open({str(target)!r}, 'w')", f"__import__('pathlib').Path({str(target)!r}).touch()"):
        assert evaluate_expression(expr) is None
        assert not check_annotation(expr, "1")
    assert not target.exists()


def test_numbers():
    assert evaluate_expression("(1+2)*3/4") == Fraction(9, 4)
    assert parse_number("1,080") == 1080 and parse_number(".5") == Fraction(1, 2) and parse_number("5.") == 5
    assert parse_number("12 apples") is None
    assert format_number(Fraction(9, 4)) == "2.25" and format_number(Fraction(24)) == "24"
    assert format_number(Fraction(100, 3)) == "33.3333"


# ----------------------------------------------------------------------------- real data


def _annotation_counts(path: Path) -> tuple[int, dict[str, int], list]:
    counts = {"ok": 0, "wrong": 0, "unparsable": 0}
    bad, rows = [], 0
    for lineno, row in read_jsonl(path):
        rows += 1
        steps = segment(row["answer"], "lines")
        assert steps and steps[-1].startswith("####"), f"{path}:{lineno}"
        for s in steps:
            for e, c in annotations(s):
                st = annotation_status(e, c)
                counts[st] += 1
                if st != "ok":
                    bad.append((lineno, e, c, st))
    return rows, counts, bad


@needs_data
def test_gsm8k_train_annotations_recompute():
    """Measured: 23,716 annotations in 7,473 solutions; every parsable one is exactly right
    (0 arithmetically wrong); 2 use floor division '//', outside the whitelist."""
    rows, counts, bad = _annotation_counts(DATA / "gsm8k" / "train.jsonl")
    print(f"\nGSM8K train: {rows} rows, annotations {counts}, not ok: {bad}")
    assert rows == 7473
    assert counts == {"ok": 23714, "wrong": 0, "unparsable": 2}
    assert [(ln, e) for ln, e, _, _ in bad] == [(395, "560//10"), (4170, "180//3")]


@needs_data
def test_gsm8k_test_annotations_recompute():
    rows, counts, bad = _annotation_counts(DATA / "gsm8k" / "test.jsonl")
    print(f"\nGSM8K test: {rows} rows, annotations {counts}, not ok: {bad}")
    assert rows == 1319
    assert counts == {"ok": 4281, "wrong": 0, "unparsable": 1}
