"""Checking generated answers: GSM8K's final number, and MATH-500's `\\boxed{}` answers compared
by SymPy, as chapter 3 of "Build a Reasoning Model (From Scratch)" grades them.

    grade_answer(extract_final_candidate(text), "\\frac{14}{3}")   # "14/3" -> True
    gsm8k_answer("... So the answer is 1,234.") == "1234"
"""

from __future__ import annotations

import re
from tokenize import TokenError

import sympy
from sympy.parsing import sympy_parser
from sympy.polys.polyerrors import PolynomialError

RE_NUMBER = re.compile(r"-?(?:\d+/\d+|\d+(?:\.\d+)?(?:[eE][+-]?\d+)?)")
_SUPERSCRIPTS = str.maketrans("⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻⁽⁾", "0123456789+-()")
LATEX_FIXES = [  # (pattern, replacement), in order
    (r"\\left\s*", ""), (r"\\right\s*", ""), (r"\\[,!;:]", ""), (r"\\cdot", "*"),
    ("[\u00b7\u00d7]", "*"), (r"\\\^\\circ", ""), (r"\\[dt]frac", r"\\frac"), ("°", ""),
]  # fmt: skip


def last_boxed(text: str) -> str | None:
    """The content of the last `\\boxed{...}` (nested braces allowed), or None."""
    start = text.rfind("\\boxed")
    if start < 0:
        return None
    i = start + len("\\boxed")
    while i < len(text) and text[i].isspace():
        i += 1
    if i >= len(text) or text[i] != "{":
        return None
    depth, i = 1, i + 1
    for j in range(i, len(text)):
        depth += {"{": 1, "}": -1}.get(text[j], 0)
        if depth == 0:
            return text[i:j]
    return None  # unbalanced


def extract_final_candidate(text: str) -> str:
    """A generated solution's answer: its last box, else its last number, else all of it."""
    if not text:
        return ""
    if boxed := (last_boxed(text.strip()) or "").strip().strip("$ "):
        return boxed
    numbers = RE_NUMBER.findall(text)
    return numbers[-1] if numbers else text


def normalize_text(text: str) -> str:
    """LaTeX answer text -> a string SymPy may parse ("\\frac{3}{4}" -> "(3)/(4)")."""
    if not text:
        return ""
    text = re.sub(r"<\|[^>]+?\|>", "", text).strip()
    if m := re.match(r"^[A-Za-z]\s*[.:]\s*(.+)$", text):  # a choice's label: "c. 3"
        text = m.group(1)
    text = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°", "", text)
    if m := re.match(r"^\\text\{(?P<x>.+?)\}$", text):
        text = m.group("x")
    text = re.sub(r"\\[()\[\]]", "", text)
    for pattern, replacement in LATEX_FIXES:
        text = re.sub(pattern, replacement, text)
    power = lambda m: f"{m.group(1)}**{m.group(2).translate(_SUPERSCRIPTS)}"  # noqa: E731
    text = re.sub(r"([0-9A-Za-z)\]}])([⁰¹²³⁴⁵⁶⁷⁸⁹⁺⁻]+)", power, text)  # "2²" -> "2**2"
    text = text.translate(_SUPERSCRIPTS).replace("\\%", "%")
    text = re.sub(r"[$%]", "", text)
    text = re.sub(r"\\sqrt\s*\{([^}]*)\}", r"sqrt(\1)", text)
    text = re.sub(r"\\sqrt\s+([^\s{}\\]+)", r"sqrt(\1)", text)
    text = re.sub(r"\\frac\s*\{([^{}]*)\}\s*\{([^{}]*)\}", r"(\1)/(\2)", text)
    text = re.sub(r"\\frac\s+(\S+)\s+(\S+)", r"(\1)/(\2)", text)
    text = text.replace("^", "**")
    text = re.sub(r"(\d)\s+(\d+/\d+)", r"\1+\2", text)  # a mixed number: 2 1/2
    text = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", text)  # thousands separators
    return re.sub(r"[{}]", "", text).strip().lower()


def split_into_parts(text: str) -> list[str]:
    """A bracketed tuple or interval "(1, 2)" -> its items; anything else -> [text]."""
    if not text:
        return []
    if len(text) >= 2 and text[0] in "([" and text[-1] in ")]" and "," in text[1:-1]:
        items = [item.strip() for item in text[1:-1].split(",")]
        if all(items):
            return items
    return [text]


def sympy_parse(expr: str):
    """The expression as SymPy reads it (implicit multiplication allowed), or None."""
    if expr is None or len(expr) > 2000:
        return None
    transformations = (*sympy_parser.standard_transformations,
                       sympy_parser.implicit_multiplication_application)  # fmt: skip
    try:
        return sympy_parser.parse_expr(expr, transformations=transformations, evaluate=True)
    except (sympy.SympifyError, SyntaxError, TypeError, AttributeError, IndexError, TokenError,
            ValueError, PolynomialError):  # fmt: skip
        return None


def equality_check(expected: str, got: str) -> bool:
    """Equal strings, or expressions whose difference SymPy simplifies to 0."""
    if expected == got:
        return True
    a, b = sympy_parse(expected), sympy_parse(got)
    if a is None or b is None:
        return False
    try:
        return bool(sympy.simplify(a - b) == 0)
    except (sympy.SympifyError, TypeError):
        return False


def grade_answer(predicted: str | None, expected: str | None) -> bool:
    """Whether a predicted answer equals the expected one: both normalized and split into parts,
    the same number of parts, each pair equal in order."""
    if predicted is None or expected is None:
        return False
    got, want = (
        split_into_parts(normalize_text(predicted)),
        split_into_parts(normalize_text(expected)),
    )
    return bool(got) and len(got) == len(want) and all(map(equality_check, want, got))


def gsm8k_answer(text: str) -> str:
    """The final number of a GSM8K chain of thought: after "the answer is", else the last number;
    commas, "$" and a trailing period dropped ("" when there is none)."""
    numbers = re.findall(r"-?[$0-9.,]*[0-9]", text.split("\n\n")[0])
    said = re.search(r"answer is \$?(-?[0-9.,]*[0-9])", text)
    found = said.group(1) if said else (numbers[-1] if numbers else "")
    return found.replace(",", "").replace("$", "").rstrip(".")
