"""Grading a model's answer against a reference answer.

Two kinds of reference answers are met in the bundled data sets:

- numbers (GSM8K, AIME): the predicted answer is compared *as a number*; thousands separators,
  currency signs, units, ``\\boxed{}`` and a ``Final answer:`` lead are stripped first;
- LaTeX expressions (MATH-500): both sides are normalised (``\\dfrac``/``\\tfrac`` to ``\\frac``,
  ``\\frac12`` to ``\\frac{1}{2}``, ``\\left``/``\\right``, spacing commands, degrees, ``\\text{}``
  units, ``x =`` leads) and compared as strings, then element-wise for tuples and intervals, and
  finally by sympy equivalence (``simplify(a - b) == 0``) as a fallback.

`extract_answer` finds the answer in free model output: the last ``\\boxed{...}``, else the text
after the last ``Final answer:`` / ``The answer is``, else the last number.
"""

from __future__ import annotations

import logging
import math
import re
import threading
from dataclasses import dataclass
from fractions import Fraction
from typing import Literal

AnswerKind = Literal["auto", "number", "math"]

_ANSWER_LEADS = re.compile(
    r"(?:final\s+answer|the\s+(?:final\s+)?answer\s+is|answer)\s*[:=]?\s*", re.IGNORECASE
)
_NUMBER = re.compile(r"(?<![\w.])[-−]?\s?(?:\d{1,3}(?:,\d{3})+|\d+)(?:\.\d+)?(?:/\d+)?(?![\d])")


@dataclass(frozen=True)
class Grade:
    """The verdict on one answer.

    Attributes:
        correct: whether the predicted answer matches the reference.
        predicted: the answer extracted from the model's text, normalised (``None`` when none
            could be found).
        reference: the normalised reference answer.
        method: how the verdict was reached (``"number"``, ``"string"``, ``"elements"``,
            ``"sympy"`` or ``"none"``).
    """

    correct: bool
    predicted: str | None
    reference: str
    method: str


# ---------------------------------------------------------------------------- extraction
def last_boxed(text: str) -> str | None:
    """Content of the last ``\\boxed{...}`` (or ``\\fbox{...}``) in ``text``, braces balanced."""
    start = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
    if start < 0:
        return None
    i = text.find("{", start)
    if i < 0:
        # "\boxed 5" form
        m = re.match(r"\\boxed\s+([^\s$]+)", text[start:])
        return m.group(1) if m else None
    depth = 0
    for j in range(i, len(text)):
        if text[j] == "{":
            depth += 1
        elif text[j] == "}":
            depth -= 1
            if depth == 0:
                return text[i + 1 : j]
    return None  # unbalanced: the model was cut off inside the box


def extract_answer(
    text: str | None, *, fallback: Literal["last_number", "last_line"] = "last_number"
) -> str | None:
    """The final answer in a model's output, or ``None`` when it holds none.

    Order: the last ``\\boxed{}``; the text after the last ``Final answer:`` (or ``The answer
    is``) up to the end of that line; then the ``fallback``: the last number anywhere, or the
    last non-empty line (for an answer already cut out of its output, such as MATH's
    ``\\frac{\\pi}{2}``).
    """
    if not text or not text.strip():
        return None
    boxed = last_boxed(text)
    if boxed is not None and boxed.strip():
        return boxed.strip()
    leads = list(_ANSWER_LEADS.finditer(text))
    for lead in reversed(leads):
        rest = text[lead.end() :].strip()
        line = rest.split("\n", 1)[0].strip()
        if line:
            return line.strip().rstrip(".").strip()
    if fallback == "last_line":
        return [line for line in text.strip().splitlines() if line.strip()][-1].strip()
    numbers = _NUMBER.findall(text)
    if numbers:
        return numbers[-1].replace("−", "-").replace(" ", "")
    return None


# ---------------------------------------------------------------------------- numbers
def parse_number(text: str) -> float | None:
    """A number written in ``text``: ``"1,234"``, ``"$18.00"``, ``"-3"``, ``"7/2"``, ``"50%"``,
    ``"\\frac{7}{2}"``, ``"x = 12 dollars"``. When several numbers appear, the one after the last
    ``=`` (or else the last one) is taken. ``None`` when there is none."""
    s = _strip_wrappers(text)
    s = re.sub(r"\\[dt]?frac\{(-?\d+)\}\{(\d+)\}", r"\1/\2", s)
    s = s.replace("−", "-").replace("\\$", "").replace("$", "").replace("\\%", "%")
    s = s.replace("\\!", "").replace("{,}", ",").replace("\\,", "")
    if "=" in s:
        s = s.rsplit("=", 1)[1]
    found = _NUMBER.findall(s)
    if not found:
        return None
    token = found[0] if len(found) == 1 else found[-1]
    token = token.replace(",", "").replace(" ", "")
    try:
        if "/" in token:
            return float(Fraction(token))
        return float(token)
    except (ValueError, ZeroDivisionError):
        return None


def numbers_equal(a: float, b: float, *, rel_tol: float = 1e-6) -> bool:
    return math.isclose(a, b, rel_tol=rel_tol, abs_tol=1e-9)


def _is_plain_number(reference: str) -> bool:
    s = reference.strip().replace(",", "").replace("$", "")
    return bool(re.fullmatch(r"-?\d+(?:\.\d+)?", s))


# ---------------------------------------------------------------------------- LaTeX
_TEXT_COMMANDS = re.compile(
    r"\\(?:text|textbf|textit|mathrm|mathbf|mbox|operatorname)\s*\{([^{}]*)\}"
)
_UNIT_WORDS = (
    "degrees",
    "degree",
    "units",
    "unit",
    "square",
    "sq",
    "cm",
    "meters",
    "meter",
    "inches",
    "inch",
    "feet",
    "foot",
    "miles",
    "mile",
    "hours",
    "hour",
    "minutes",
    "minute",
    "seconds",
    "second",
    "dollars",
    "dollar",
    "cents",
    "cent",
    "km",
    "mph",
)


def _strip_wrappers(text: str) -> str:
    s = text.strip()
    boxed = last_boxed(s)
    if boxed is not None:
        s = boxed
    s = _ANSWER_LEADS.sub("", s, count=1) if _ANSWER_LEADS.match(s) else s
    s = s.strip()
    if s.startswith("$") and s.endswith("$") and len(s) > 1:
        s = s.strip("$")
    if s.startswith("\\(") and s.endswith("\\)"):
        s = s[2:-2]
    if s.startswith("\\[") and s.endswith("\\]"):
        s = s[2:-2]
    return s.strip().rstrip(".").strip()


def _fix_fracs(s: str) -> str:
    r"""``\frac12`` -> ``\frac{1}{2}``, ``\frac1{b}`` -> ``\frac{1}{b}``, ``\sqrt3`` -> ``\sqrt{3}``."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\sqrt\s*(\d+|[a-zA-Z])", r"\\sqrt{\1}", s)
    return s


def normalize_latex(text: str) -> str:
    """A canonical string for a LaTeX answer (MATH-style), for exact comparison."""
    s = _strip_wrappers(text)
    s = s.replace("\n", " ").replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    for cmd in ("\\!", "\\,", "\\;", "\\:", "\\quad", "\\qquad", "~"):
        s = s.replace(cmd, "")
    s = re.sub(r"\^\s*\{?\\circ\}?", "", s)
    s = s.replace("°", "").replace("\\degree", "")
    s = s.replace("\\%", "").replace("%", "").replace("\\$", "").replace("$", "")
    # \text{...}: units are dropped, other text kept ("\text{Evelyn}" -> "Evelyn")
    s = _TEXT_COMMANDS.sub(lambda m: m.group(1), s)
    s = re.sub(r"\\(?:mathbf|mathrm|boldsymbol)\b", "", s)
    words = "|".join(sorted(_UNIT_WORDS, key=len, reverse=True))
    s = re.sub(rf"(?<=[\d}}\s])\s*(?:{words})(?:\^\{{?\d\}}?|\^\d)?\b\.?", "", s, flags=re.I)
    s = s.replace(" ", "")
    # a lone "x=" / "k=" lead (but not "x=1,y=2" systems or inequalities)
    if re.match(r"^[a-zA-Z]\\?[a-z]*=", s) and s.count("=") == 1:
        s = s.split("=", 1)[1]
    s = _fix_fracs(s)
    s = re.sub(r"\\(le|ge)(?:q|qq|qslant|slant)?(?![a-z])", r"\\\1q", s)
    s = s.replace("\\neq", "\\ne")
    s = s.replace("\\infinity", "\\infty").replace("infinity", "\\infty")
    # 0.5 -> .5 and 1.0 -> 1 style differences
    s = re.sub(r"(?<![\d.])0+(\d)", r"\1", s)
    s = re.sub(r"(\d\.\d*?)0+(?!\d)", r"\1", s)
    s = re.sub(r"(\d)\.(?!\d)", r"\1", s)
    s = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", s)  # thousands separators
    if s.endswith("."):
        s = s[:-1]
    return s


def _split_elements(s: str) -> tuple[str, list[str], str] | None:
    """Split a normalised tuple / interval / list ``(a,b]`` into brackets and elements."""
    if len(s) >= 2 and s[0] in "([{" and s[-1] in ")]}":
        inner = s[1:-1]
        parts, depth, current = [], 0, ""
        for ch in inner:
            if ch in "([{":
                depth += 1
            elif ch in ")]}":
                depth -= 1
            if ch == "," and depth == 0:
                parts.append(current)
                current = ""
            else:
                current += ch
        parts.append(current)
        if len(parts) > 1:
            return s[0], parts, s[-1]
    if "," in s and not re.search(r"[([{]", s):
        return "", s.split(","), ""
    return None


def _latex_to_sympy_source(s: str) -> str:
    """Translate simple normalised LaTeX into sympy's Python syntax."""
    out = s
    for _ in range(6):  # nested fractions and roots, innermost first
        new = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", out)
        new = re.sub(r"\\sqrt\[([^\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", new)
        new = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", new)
        if new == out:
            break
        out = new
    replacements = {
        "\\cdot": "*",
        "\\times": "*",
        "\\div": "/",
        "\\pi": "pi",
        "\\infty": "oo",
        "\\ln": "log",
        "\\log": "log",
        "\\sin": "sin",
        "\\cos": "cos",
        "\\tan": "tan",
        "\\exp": "exp",
        "^": "**",
        "{": "(",
        "}": ")",
        "\\": "",
    }
    for old, new_text in replacements.items():
        out = out.replace(old, new_text)
    return out


def sympy_equal(a: str, b: str, *, timeout_terms: int = 400) -> bool:
    """Whether two normalised LaTeX expressions are equal by sympy (``False`` when either does
    not parse, or the expressions are too large to simplify quickly)."""
    try:
        import sympy
        from sympy.parsing.sympy_parser import (
            convert_xor,
            implicit_multiplication_application,
            parse_expr,
            standard_transformations,
        )
    except ImportError:  # the "eval" extra is not installed
        return False
    if len(a) > timeout_terms or len(b) > timeout_terms:
        return False
    transformations = (
        *standard_transformations,
        implicit_multiplication_application,
        convert_xor,
    )
    try:
        ea = parse_expr(_latex_to_sympy_source(a), transformations=transformations, evaluate=True)
        eb = parse_expr(_latex_to_sympy_source(b), transformations=transformations, evaluate=True)
        if ea == eb:
            return True
        diff = sympy.simplify(ea - eb)
        if diff == 0:
            return True
        value = complex(sympy.N(diff))
        return abs(value) < 1e-9
    except Exception:  # any parse or evaluation failure means "not shown equal"
        return False


# ---------------------------------------------------------------------------- verdict
def _equal_math(pred: str, ref: str) -> str | None:
    """How ``pred`` equals ``ref`` (normalised strings), or ``None``."""
    if pred == ref:
        return "string"
    p_num, r_num = parse_number_exact(pred), parse_number_exact(ref)
    if p_num is not None and r_num is not None:
        return "number" if numbers_equal(p_num, r_num) else None
    p_parts, r_parts = _split_elements(pred), _split_elements(ref)
    if p_parts and r_parts:
        p_open, p_items, p_close = p_parts
        r_open, r_items, r_close = r_parts
        if len(p_items) != len(r_items):
            return None
        if (p_open, p_close) != (r_open, r_close) and {p_open, r_open} - {"", "("}:
            return None  # (a,b) vs [a,b] differ for intervals; a bare list matches a tuple
        if all(_equal_math(x, y) for x, y in zip(p_items, r_items, strict=True)):
            return "elements"
        return None
    if sympy_equal(pred, ref):
        return "sympy"
    return None


def parse_number_exact(s: str) -> float | None:
    """``s`` as a number when it is nothing but one (``"3"``, ``"-2.5"``, ``"\\frac{7}{2}"``)."""
    m = re.fullmatch(r"(-?)\\frac\{(\d+)\}\{(\d+)\}", s)
    if m:
        try:
            value = float(Fraction(int(m.group(2)), int(m.group(3))))
        except ZeroDivisionError:
            return None
        return -value if m.group(1) else value
    if re.fullmatch(r"-?(?:\d+(?:\.\d*)?|\.\d+)(?:/\d+)?", s):
        try:
            return float(Fraction(s)) if "/" in s else float(s)
        except (ValueError, ZeroDivisionError):
            return None
    return None


def grade(predicted: str | None, reference: str, *, kind: AnswerKind = "auto") -> Grade:
    """Whether ``predicted`` (a model's answer, or its whole output) matches ``reference``.

    Args:
        predicted: the model's answer; a ``\\boxed{}`` or ``Final answer:`` inside is found.
        reference: the data set's answer.
        kind: ``"number"`` compares numbers, ``"math"`` LaTeX expressions; ``"auto"`` picks
            ``"number"`` when the reference is a plain number.
    """
    if kind == "auto":
        kind = "number" if _is_plain_number(reference) else "math"
    answer = extract_answer(predicted, fallback="last_line")
    if kind == "number":
        ref_value = parse_number(reference)
        value = parse_number(answer) if answer is not None else None
        if value is None and predicted:
            # the answer line held no number: fall back to the last number of the output
            numbers = _NUMBER.findall(predicted)
            value = parse_number(numbers[-1]) if numbers else None
        shown = None if value is None else _format_number(value)
        ref_shown = reference.strip() if ref_value is None else _format_number(ref_value)
        if value is None or ref_value is None:
            return Grade(False, shown, ref_shown, "none")
        return Grade(numbers_equal(value, ref_value), shown, ref_shown, "number")
    ref_norm = normalize_latex(reference)
    if answer is None:
        return Grade(False, None, ref_norm, "none")
    pred_norm = normalize_latex(answer)
    how = _equal_math(pred_norm, ref_norm)
    if how is None and math_verify_equal(answer, reference):
        how = "math-verify"  # what the rules above miss: sets, intervals, equations, ...
    return Grade(how is not None, pred_norm, ref_norm, how or "none")


def math_verify_equal(answer: str, reference: str) -> bool:
    """Whether math-verify (Hugging Face's maintained verifier) parses both LaTeX answers and
    finds them equal. False when it is not installed, parses nothing, or finds them different:
    then this module's own rules decide (units, text answers, element lists)."""
    try:
        from math_verify import parse, verify
    except ImportError:
        return False
    # Its timeouts use SIGALRM, which only the main thread may set; elsewhere run without one.
    timeout = 5 if threading.current_thread() is threading.main_thread() else None
    if timeout is None:
        logging.getLogger("math_verify").setLevel(logging.ERROR)  # "timeout is disabled"
    try:
        gold = parse(f"${reference}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        pred = parse(f"${answer}$", parsing_timeout=timeout)  # type: ignore[arg-type]
        return bool(gold and pred and verify(gold, pred, timeout_seconds=timeout))
    except Exception:  # a parse or comparison failure means "not shown equal"
        return False


def is_correct(predicted: str | None, reference: str, *, kind: AnswerKind = "auto") -> bool:
    """Shorthand for ``grade(predicted, reference, kind=kind).correct``."""
    return grade(predicted, reference, kind=kind).correct


def _format_number(value: float) -> str:
    if value == int(value) and abs(value) < 1e15:
        return str(int(value))
    return repr(value)
