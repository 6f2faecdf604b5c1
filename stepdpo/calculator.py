"""GSM8K calculator annotations and the exact arithmetic that checks them.

"<<48/2=24>>" claims 48/2 = 24. `annotations(step)` lists (expr, claimed);
`check_annotation(expr, claimed)` recomputes the expression with a whitelist AST walk (numbers,
+ - * / ** and parentheses only; never eval) in exact rational arithmetic. A claim passes when it
equals the value rounded to the decimals the claim shows ("100/3=33.33" and "100/3=33" pass,
"5/3=1" does not). `parse_number` / `format_number` read and write numbers as GSM8K writes them.
"""

from __future__ import annotations

import ast
import re
from fractions import Fraction

_ANNOTATION = re.compile(r"<<([^<>]*)>>")


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
