"""The math answer verifier: extract the final answer, normalise it, decide equivalence.

    math_reward(text, gt) = 1.0 if is_equiv(extract_answer(text), g) for some acceptable g, else 0.0

Conventions (each chosen so that a wrong answer never scores 1):
  - A response's answer is its last \\boxed{} (or \\fbox{}, \\framebox{}) after any </think> (no
    box: 0 in math_reward); a "final answer is X" after it replaces it. Boxes before it separated
    only by commas, spacing or a short one-line phrase with "and" or "or" are one list ("\\boxed{1}
    papers and \\boxed{2}" is "1, 2"); other words or a sentence end between boxes are not.
  - is_equiv and the gold answers read an unboxed text as its math: what follows its last "final
    answer is" or "is" at its end (before "I hope it is correct"), of that its one $...$ (or
    \\(...\\), \\[...\\]) span, or spans separated only by connecting words as a list. Prose whose
    last sentence (or all of it) has no math gives that part's last number. Odd dollar signs
    ("$221,$8$") or a span of connecting words only ("12 $ and $13") leave the text as it is.
  - An empty or blank gold answer accepts nothing.
  - A leading name is dropped ("x = 5", "|AB| = 5", "(x, y) = (3, 2)", "f(x) = 2x+3", "A:B = 2:1",
    "h^{-1}(x) = ...", "x \\in [-2, 7]", "x \\approx 11"), and so is a trailing "\\approx 0.577"; a
    chain "a = b = c" or "number = number" is its last part ("7 = 11a+c" is an equation).
  - Relations compare as relations: a - b (or b - a for < and <=) must be a constant multiple of the
    other's, positive for inequalities, nonzero for equations ("2x+4y-3=0" is "y=-x/2+3/4"); a chain
    "a < x <= b" over one name is the interval (a, b], so "0 < f(x) < 1" is (0, 1).
  - Numbers are exact: integers, decimals, fractions, a\\times10^{b}, 8.7e8, mixed numbers
    ("1\\frac{4}{5}" and "1 1/2" are 9/5 and 3/2), decimals in expressions (10\\sqrt{10.5} is
    5\\sqrt{42}). A decimal stands for an irrational or repeating value only with at least 5
    significant digits, rounded right (0.083333 for 1/12, 2.6667 for 8/3; never 0.33 for 1/3 nor
    1.414 for \\sqrt{2}). A comma between a gold's digits separates a list or, in threes after a
    nonzero digit, thousands; a predicted "1,22" is 1.22 only against a gold 1.22.
  - Tuples and intervals keep order and brackets; sets, bare lists, unions and \\pm expansions
    ("1 \\pm \\sqrt{19}" is "1+\\sqrt{19}, 1-\\sqrt{19}") match in any order, element by element. A
    set matches a bare list of the same elements, never a tuple; a repeated element counts once.
  - Matrices (pmatrix, bmatrix, matrix, array) compare entry by entry; sympy does their arithmetic.
  - Units and words after an answer are dropped (cm, miles, square units, percent, \\%, \\$,
    degrees, a trailing \\text{...} without digits, "and" or "or"); base 4210_7 is 4210_{7}.
  - Expressions go to sympy: \\frac, \\cfrac, \\sqrt, ^, \\cdot, \\times, \\pi, \\infty,
    trigonometry (degrees as \\pi/180; np.arcsin is \\arcsin), logarithms, Greek letters, \\dot{x}
    and the like as names, i the imaginary unit, e Euler's number, implicit products ("2^6 3^5 5^4"
    is a product, never a tower; "\\pi c" is \\pi times c); a - b must simplify to 0. Checks run in
    worker processes killed after a time limit; one not computed counts in reward_errors().
Nothing here raises or hangs: every call returns within about a second, from any thread or process.
"""
import contextlib
import os
import queue
import re
import select
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction
from itertools import accumulate

SYMPY_TIMEOUT = 0.8  # seconds for one answer's comparisons, symbolic ones included
MAX_SYMBOLIC_LEN = 400  # characters; longer answers are compared as strings and numbers only
MAX_ANSWER_LEN = 20_000  # characters; longer answers are compared as strings only
_POOL_LOCK = threading.Lock()
_POOLS: dict[int, queue.Queue] = {}  # the sympy workers of each process (by its id)
_ERRORS = [0]  # checks that overran their time or met no ready worker, and exceptions caught

# ---- extraction ------------------------------------------------------------------------------

_BOX = ("\\boxed", "\\fbox", "\\framebox")
_CONNECTORS = re.compile(
    r"(?:\s|[,;&$]|\\[()\[\]]|\\q?quad|\\[,;: ]|and|or|\\text\{\s*(?:and|or)\s*\})*")
_BOX_GAP = re.compile(_CONNECTORS.pattern + r"|(?=.*\b(?:and|or)\b)[^\n.;:!?]{0,40}", re.S)
_SPAN = re.compile(r"(?s:\$\$(.+?)\$\$)|\$([^$\n]+?)\$|\\\(([^\n]+?)\\\)|(?s:\\\[(.+?)\\\])")
_TAIL = re.compile(r"\.?\s*(?:I hope it is correct.*|<\|im_start\|>.*)?$", re.S)
_STATED = re.compile(r"(?:final answer is:?\s+((?:(?!\.\s).)*?)|\bis\s+(\$[^$]*\$|-?[\d.,/]+))\s*$",
                     re.S | re.I)
_PROSE = re.compile(r"(?<![A-Za-z'\\])(?:[A-Za-z']{2,}+\s+){3}")
_NUMBER = re.compile(r"-?\d{1,3}(?:,\d{3})+(?:\.\d+)?|-?\d+(?:\.\d+)?(?:/\d+)?")


def _box_at(text: str, start: int) -> tuple[str | None, int]:
    """The content of the box at text[start] and the index just after it (None: never closed)."""
    j = start + next(len(b) for b in _BOX if text.startswith(b, start))
    rest = text[j:]
    if not rest.lstrip().startswith("{"):
        match = re.match(r"\s+([^\s$]+)", rest)  # "\boxed 5"
        return (match.group(1).rstrip("."), j + match.end()) if match else (None, j)
    k = j + len(rest) - len(rest.lstrip())
    depths = accumulate((c == "{") - (c == "}") for c in text[k:])
    end = next((k + i for i, depth in enumerate(depths) if depth == 0), None)
    return (None, len(text)) if end is None else (text[k + 1:end].strip(), end + 1)  # None: cut off


def extract_answer(text: str) -> str | None:
    """The last boxed answer, with the boxes just before it that only connecting words separate."""
    try:
        if not isinstance(text, str) or ("<think>" in text and "</think>" not in text):
            return None  # the model never finished thinking
        text, answers = text.rsplit("</think>", 1)[-1], []
        limit = len(text)
        while len(answers) < 20 and (start := max(text.rfind(b, 0, limit) for b in _BOX)) >= 0:
            content, end = _box_at(text, start)
            gap = text[end:limit]
            stated = None if answers else _STATED.search(_TAIL.sub("", gap, count=1))
            if stated and stated.group(1):
                return stated.group(1)  # a final answer stated after the last box replaces it
            if content is None or end > limit or answers and not _BOX_GAP.fullmatch(gap):
                break
            answers.insert(0, content)
            limit = start
        return ", ".join(answers) or None
    except Exception:
        return None


def final_answer(text: str) -> str:
    """The answer a text states: its boxed answer, else its math (see the module docstring)."""
    if (boxed := extract_answer(text)) is not None:
        return boxed
    text = _TAIL.sub("", text[-MAX_ANSWER_LEN:], count=1)  # a final answer is at the end
    stated = _STATED.search(text)
    text = (stated.group(1) or stated.group(2) or "") if stated else text
    hidden = text.replace("\\$", "\0")  # an escaped dollar sign does not open math
    last_sentence = re.split(r"(?<=[.!?$])\s+(?=[A-Z])", hidden)[-1]
    for prose in (hidden, last_sentence):  # prose without math: its last number
        numbers = _NUMBER.findall(prose)
        if numbers and _PROSE.search(prose) and not _SPAN.search(prose) and (
                prose is hidden or "$" not in prose):
            return numbers[-1]
    spans = list(_SPAN.finditer(hidden))
    math = [next(g for g in span.groups() if g is not None) for span in spans]
    if not spans or hidden.count("$") % 2 or any(_CONNECTORS.fullmatch(m) for m in math) or not all(
            _CONNECTORS.fullmatch(hidden[x.end():y.start()]) for x, y in zip(spans, spans[1:])):
        return text  # odd dollars, "12 $ and $13" (the dollars close, then open), or words between
    return ", ".join(math).replace("\0", "\\$")


# ---- normalisation ---------------------------------------------------------------------------

_UNIT_WORDS = (r"(?:units?|cm|centimeters?|m|meters?|km|kilometers?|mm|inches|inch|in|feet|foot|"
               r"ft|miles?|yards?|seconds?|sec|minutes?|min|hours?|hrs?|days?|weeks?|years?|"
               r"degrees?|dollars?|cents?|square|sq|cubic|mph|kg|g|grams?|pounds?|lbs?|liters?|"
               r"ml|people|students|ways|percent|percentage|pct|Hz|eV|J|K|s|rad)")
_TEXT = r"\\(?:text\w*|mbox|mathrm|textrm|operatorname|mathbf|mathit)\s*"
_DEGREE = r"(?:\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree)"
_TRIG = r"(?:sin|cos|tan|sec|csc|cot)"

_RULES = [  # (pattern, replacement), in order; each a plain LaTeX convention
    (r"(?<=\d)\s*;\s*(?=-?\d)", ","),  # (0;-2;6)
    (r"(?s)\\begin\{([pbBvV]?matrix|array)\}(?:\{[^{}]*\})?(.*?)\\end\{\1\}",  # \mat(a,b;c,d)
     lambda m: "\\mat(" + ";".join(",".join(cell.strip() for cell in row.split("&"))
                                   for row in re.split(r"\\\\", m[2]) if row.strip()) + ")"),
    (r"\\\\(?=[a-zA-Z])", r"\\"), (r",\s*\\!\s*", ","), (r"\\!", ""),  # doubled escapes, 11,\! 111
    (r"\\[,;: ]|\\q?quad|~", " "),  # spacing
    (r"\\[dtc]frac", r"\\frac"), (r"\\left|\\right|\\displaystyle|\\[bB]igg?[lr]?", ""),
    (r"\\(" + _TRIG + r")\s*\(?\s*(-?\d+(?:\.\d+)?)\s*" + _DEGREE + r"\s*\)?", r"\\\1(\2\\pi/180)"),
    (_DEGREE + r"\s*(?:" + _TEXT + r"\{\s*[CF]\s*\}|[CF])?\s*$", ""), (_DEGREE, ""),  # 1950^\circ C
    (r"(?<=\d)\s*(?:\^\s*\{?\s*(?:\\prime\s*)+\}?|'+)\s*$", ""),  # 0.003^{\prime\prime}
    (r"\\\$|\$|\\%|%", ""),
    (_TEXT + r"\{\s*" + _UNIT_WORDS + r"(?:\s+" + _UNIT_WORDS + r")*(?:\s*\^?\s*\{?-?\d\}?)?\s*\}"
     r"\s*(\^\s*\{?-?\d\}?)?\s*$", ""),  # trailing units
    (r"(?<=[\d}])\s*\\text\s*\{(?![^{}]*\b(?:and|or)\b)[^{}\d]*\}\s*$", ""),  # "5\text{ any words}"
    (r"(?<=[)\]\d}])\s*(?:\\text\s*\{\s*(?:and|or)\s*\}|\b(?:and|or)\b)\s*"
     r"(?=[-(\[\d\\a-zA-Z])", ","),  # "(11,7) or (7,11)", "12\text{ and }13": lists
    (_TEXT + r"\{([^{}]*)\}", r"\1"),
    (r"(?<=\d)\s*" + _UNIT_WORDS + r"(?:\s+" + _UNIT_WORDS + r")*(\^-?\d)?\s*$", ""),  # "5 cm"
    (r"\\le(?:q|qslant)?(?![a-zA-Z])|<=|≤", "≤"), (r"\\ge(?:q|qslant)?(?![a-zA-Z])|>=|≥", "≥"),
    (r"\\neq?(?![a-zA-Z])|!=", "≠"), (r"\\lt(?![a-zA-Z])", "<"), (r"\\gt(?![a-zA-Z])", ">"),
    (r"\\in(?![a-zA-Z])", "∈"), (r"\\cup(?![a-zA-Z])", "∪"), (r"\\approx(?![a-zA-Z])", "≈"),
    (r"_\{(\w+)\}", r"_\1"), (r"\^\{?\\prime\}?", "'"),  # 4210_{7} -> 4210_7; \frac12, \sqrt2 below
    (r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}"), (r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{"),
    (r"\\frac\s*\{([^{}]*)\}\s*(\w)", r"\\frac{\1}{\2}"), (r"\\sqrt\s*(\w)", r"\\sqrt{\1}"),
]


def normalize(s: str) -> str:
    s = str(s).strip().replace("\n", " ")
    for pattern, replacement in _RULES:
        s = re.sub(pattern, replacement, s)
    s = s.strip()
    mixed = re.fullmatch(r"(-?)(\d+)\s*(?:\\frac\{(\d+)\}\{(\d+)\}|\s(\d+)/(\d+))", s)
    if mixed:  # 1\frac{4}{5} and "1 1/2": w + n/d as one fraction when n < d
        whole, num, den = int(mixed[2]), int(mixed[3] or mixed[5]), int(mixed[4] or mixed[6])
        s = f"{mixed[1]}\\frac{{{whole * den + num}}}{{{den}}}" if 0 < num < den else s
    s = s.replace(" ", "") if re.fullmatch(r"-?\d{1,3}( \d{3})+(\.\d+)?", s) else s  # 1 000
    s = re.sub(r"(?<=[\d}])\s+(?=\d)", "\\\\cdot ", s) if "^" in s else s  # 2^6 3^5: a product
    s = re.sub(r"\s*\{\s*,\s*\}\s*", ",", s)  # 14{,}916 and 14 {, }916
    if re.fullmatch(r"-?[1-9]\d{0,2}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # 1,000 -> 1000, but "32, 349" is a list
    s = _GREEK_SPACE.sub(r"\\\1*", s).replace(" ", "")  # \pi c is \pi*c, not \pic
    s = re.sub(r"(?<![\d}])\.(?=\d)", "0.", s).rstrip(".")  # .5 -> 0.5
    s = re.sub(r"^[(\[](\\mat\(.*\))[)\]]$", r"\1", s)
    return s[1:-1] if re.fullmatch(r"\{[^{}]*\}", s) else s


# ---- exact numbers ---------------------------------------------------------------------------

def to_number(s: str) -> Fraction | None:
    """An exact rational from an integer, a decimal, a/b, \\frac{a}{b}, a\\times10^{b}, 8.7e8."""
    number = r"-?\d+(?:\.\d+)?"
    fraction = rf"(-?)\\frac\{{({number})\}}\{{({number})\}}|({number})/({number})"
    if match := re.fullmatch(fraction, s):
        num, den = Fraction(match[2] or match[4]), Fraction(match[3] or match[5])
        return None if den == 0 else (-1 if match[1] else 1) * num / den
    if match := re.fullmatch(rf"({number})(?:\\times|\\cdot|\*)10\^\{{?(-?\d{{1,3}})\}}?", s):
        return Fraction(match[1]) * Fraction(10) ** int(match[2])
    decimal = re.fullmatch(r"[-+]?\d+(\.\d+)?([eE][-+]?\d{1,3})?", s) and len(s) < 200
    return Fraction(s) if decimal else None


def _decimal_tolerance(s: str) -> Fraction | None:
    """Half a unit in the last place of a decimal written with at least 5 significant digits."""
    match = re.fullmatch(r"-?(\d+)\.(\d+)", s)
    significant = match and len((match[1] + match[2]).lstrip("0")) >= 5
    return Fraction(1, 2 * 10 ** len(match[2])) if significant else None


# ---- structure: lists, tuples, intervals, sets, matrices, relations, names -------------------

def _split_top(s: str, separators: str = ",", keep: bool = False) -> list[str]:
    """s split at separators outside brackets (with the separators between the parts if keep)."""
    parts, depth, start = [], 0, 0
    for end, c in enumerate(s):
        depth += (c in "([{") - (c in ")]}")
        if c in separators and depth == 0:
            parts += [s[start:end]] + ([c] if keep else [])
            start = end + 1
    return parts + [s[start:]]


def _encloses(s: str) -> bool:
    """The bracket that opens s closes at its end."""
    depths = accumulate((c in "([{") - (c in ")]}") for c in s[:-1])
    return all(depth > 0 for depth in depths) and s[-1:] in ")]}"


def _bracketed(s: str):
    """'(1,2]' -> ('(', ']', ['1', '2']); '\\{1,2\\}' -> ('{', '}', ...); else None."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "{", "}", _split_top(s[2:-2])
    enclosed = len(s) >= 2 and s[0] in "([" and s[-1] in ")]" and _encloses(s)  # not "(1)+(2)"
    return (s[0], s[-1], parts) if enclosed and len(parts := _split_top(s[1:-1])) > 1 else None


def _expand_plus_minus(s: str) -> str:
    """'1\\pm\\sqrt{19}' -> '1+\\sqrt{19},1-\\sqrt{19}', element by element of a list or set."""
    parts = _split_top(s[2:-2] if s.startswith("\\{") and s.endswith("\\}") else s)
    return ",".join(part.replace("\\pm", sign, 1).lstrip("+")
                    for part in parts for sign in ("+-" if "\\pm" in part else "+"))


_NAME_ATOM = (r"(?:[a-zA-Z](?:_\w+)?(?:\^\{-1\})?(?:\([a-zA-Z](?:,[a-zA-Z])*\))?|[a-zA-Z]{2,3}|"
              r"\|[a-zA-Z]+\||"
              r"\([a-zA-Z](?:_\w+)?(?:[,;][a-zA-Z](?:_\w+)?)*\)|\\frac\{[a-zA-Z]+\}\{[a-zA-Z]+\})")
_NAME = re.compile(rf"{_NAME_ATOM}(?::{_NAME_ATOM})?")


def _answer_part(s: str) -> str:
    """A statement's answer: no leading name, an = chain's last part, a < x <= b as an interval."""
    parts = _split_top(s, "=≈∈", keep=True)
    if len(_split_top(s)) > 1 and parts.count("=") > 1:
        return s  # "a = 1, b = 2": each element on its own
    named = len(parts) >= 3 and bool(_NAME.fullmatch(parts[0]))
    parts = parts[2:] if named else parts  # "x = 5", "x \in [0, 1]", "x \approx 11"
    while len(parts) >= 3 and parts[-2] == "≈":
        parts = parts[:-2]  # a trailing approximation
    numbers = all(to_number(p) is not None for p in parts[::2])  # "\frac{20}{18} = \frac{10}{9}"
    if len(parts) >= 3 and set(parts[1::2]) == {"="} and (named or numbers or len(parts) >= 5):
        parts = parts[-1:]  # "x = 5 + 5 + 1 = 11"
    s = "".join(parts)
    tokens = _split_top(s, "<≤>≥", keep=True)
    if len(tokens) == 5 and tokens[1] in ">≥" and tokens[3] in ">≥":  # 7 >= x > -2 is -2 < x <= 7
        tokens = [{">": "<", "≥": "≤"}.get(t, t) for t in tokens[::-1]]
    if len(tokens) == 5 and _NAME.fullmatch(tokens[2]) and {tokens[1], tokens[3]} <= {"<", "≤"}:
        low, high = "(" if tokens[1] == "<" else "[", ")" if tokens[3] == "<" else "]"
        return f"{low}{tokens[0]},{tokens[4]}{high}"
    return s


# ---- symbolic (sympy, in a killable worker process) ------------------------------------------

_FUNCTIONS = set("sqrt pi oo log sin cos tan sec csc cot asin acos atan sinh cosh tanh exp".split())
_GREEK = set("alpha beta gamma delta epsilon zeta eta theta iota kappa lamda mu nu xi rho sigma "
             "tau upsilon phi chi psi omega Gamma Delta Theta Lambda Xi Sigma Phi Psi "
             "Omega".split())
_GREEK_SPACE = re.compile(r"\\(pi|%s)\s+(?=[a-zA-Z\\])" % "|".join(_GREEK | {"lambda"}))
_FUNCTION_NAMES = "|".join(sorted(_FUNCTIONS - {"pi", "oo"}, key=len, reverse=True))


def _split_name(match: re.Match) -> str:
    """Letters as one-letter symbols times a final function or Greek name ("isqrt" is i*sqrt)."""
    name = match.group(0)
    names = _FUNCTIONS | _GREEK | {"Matrix"}
    known = next((k for k in range(len(name)) if name[k:] in names), len(name))
    return "*".join(list(name[:known]) + ([name[known:]] if known < len(name) else []))


def to_sympy_str(s: str) -> str | None:
    """LaTeX -> a sympy expression string over a small allow-list, or None (unknown commands)."""
    s = re.sub(r"\\mat\(([^()]*)\)", lambda m: "Matrix(((" + m[1].replace(";", "),(") + ")))", s)
    if len(s) > MAX_SYMBOLIC_LEN or s.count("{") > 40 or re.search(r"\d_|__", s):
        return None
    s = re.sub(r"\\(?:var)?(epsilon|phi|theta)", r"\\\1", s).replace("\\lambda", "\\lamda")
    s = re.sub(r"\b(?:np|math)\.", "\\\\", s)  # np.arcsin is \arcsin
    s = re.sub(r"\\(d?dot|hat|bar|tilde|vec)\{([a-zA-Z])\}", r"\2_\1", s)  # \dot{x} is x_dot
    s = re.sub(r"\\(ln|log|arc(?:sin|cos|tan)|exp|" + _TRIG + r"h?)(?![a-zA-Z])",
               lambda m: m[1].replace("arc", "a").replace("ln", "log"), s)
    argument = r"(\\[a-zA-Z]+|[a-zA-Z](?:_\w+)?|\d+(?:\.\d+)?)(?![a-zA-Z])"
    s = re.sub(rf"(?<![a-zA-Z])({_FUNCTION_NAMES}){argument}", r"\1(\2)", s)  # \sin x -> sin(x)
    s = re.sub(r"\\(cdot|times|div|infty)", lambda m: {"div": "/", "infty": "oo"}.get(m[1], "*"), s)
    s = re.sub(r"\\([a-zA-Z]+)", lambda m: m[1] if m[1] in _GREEK or m[1] == "pi" else m[0], s)
    for _ in range(40):  # innermost-first rewrites of \frac, \sqrt, powers and braces; bounded
        t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        t = re.sub(r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", t)
        t = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", t)
        t = re.sub(rf"(?<![a-zA-Z\\])({_FUNCTION_NAMES})\{{([^{{}}]*)\}}", r"\1(\2)", t)
        t = re.sub(r"\^\{([^{}]*)\}", r"**(\1)", t)
        t = re.sub(r"(?<![}\]a-zA-Z])\{([^{}]*)\}", r"(\1)", t)  # plain grouping, not an argument
        if t == s:
            break
        s = t
    s = s.replace("^", "**").replace("[", "(").replace("]", ")").replace("'", "_p")
    power = rf"(?<![a-zA-Z])({_FUNCTION_NAMES})\*\*\((\d+)\)\(([^()]*)\)"
    s = re.sub(power, r"(\1(\3))**\2", s)  # tan^2(y) -> (tan(y))**2
    if not re.fullmatch(r"[0-9a-zA-Z_+\-*/(). ,]*", s) or not s.strip():
        return None
    s = re.sub(r"(_\d+)(?=[a-zA-Z])", r"\1*", s)  # x_0\cos(t) is x_0*cos(t)
    return re.sub(r"(?<![_a-zA-Z])[a-zA-Z]+", _split_name, s)


_WORKER_CODE = r'''
import contextlib, resource, string, sys
with contextlib.suppress(Exception):  # some systems refuse the limit
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
import sympy
from sympy.parsing.sympy_parser import (parse_expr, standard_transformations, rationalize,
                                        implicit_multiplication_application, convert_xor)
T = standard_transformations + (implicit_multiplication_application, convert_xor, rationalize)
NS = {c: sympy.Symbol(c) for c in list(string.ascii_letters) + sys.argv[1].split(",")}
NS.update({"e": sympy.E, "i": sympy.I, "pi": sympy.pi, "oo": sympy.oo})
print("ready", flush=True)
for line in sys.stdin:
    try:
        mode, a, b = line.rstrip("\n").split("\t")
        x, y = (parse_expr(t, local_dict=dict(NS), transformations=T) for t in (a, b))
        if mode == "equal":
            d = x == y or sympy.simplify(x - y)
            out = "1" if d is True or d == 0 or getattr(d, "is_zero_matrix", False) else "0"
        elif mode == "ratio":  # the sign of x / y when it is a nonzero real constant, else 0
            q = sympy.simplify(x / y)
            out = ("+" if q > 0 else "-") if q.is_number and q.is_real and q != 0 else "0"
        else:  # near:TOLERANCE, x exact and y a decimal
            out = "1" if abs(sympy.N(x - y, 30)) <= sympy.Rational(mode[5:]) else "0"
    except BaseException:
        out = "0"
    print(out, flush=True)
'''


class _Worker:
    """A python process running sympy, killed and replaced when a request overruns its time (the new
    one starts in the background); pipes work from threads and from daemonic processes alike."""

    def __init__(self):
        self.start()

    def start(self):
        pipe, command = subprocess.PIPE, [sys.executable, "-c", _WORKER_CODE, ",".join(_GREEK)]
        self.proc = subprocess.Popen(command, stdin=pipe, stdout=pipe, stderr=subprocess.DEVNULL,
                                     text=True, bufsize=1)
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        if self.proc.poll() is not None:
            self.start()
        self.ready = self.ready or self._read_line(timeout) == "ready\n"
        return self.ready

    def _read_line(self, timeout: float) -> str | None:
        poller = select.poll()
        poller.register(self.proc.stdout, select.POLLIN)
        return self.proc.stdout.readline() if poller.poll(max(0.0, timeout) * 1000) else None

    def ask(self, request: str, timeout: float) -> str | None:
        """The answer to one request line, or None (and a fresh process) when it overran."""
        with contextlib.suppress(OSError, ValueError):
            self.proc.stdin.write(request + "\n")  # line-buffered: flushed at the newline
            if line := self._read_line(timeout):
                return line.strip()
        self.proc.kill()
        self.proc.wait()
        self.start()
        return None


def _count_error():
    with _POOL_LOCK:
        _ERRORS[0] += 1


def reward_errors() -> int:
    """Errors and time-outs since the last call (each scored 0), for the reward/errors metric."""
    with _POOL_LOCK:
        n, _ERRORS[0] = _ERRORS[0], 0
    return n


def start_workers(n: int = 2):
    """Start n sympy workers now (the trainer does so at start-up: no scoring call pays for it)."""
    with _POOL_LOCK:
        if os.getpid() not in _POOLS:  # a forked child gets its own workers
            pool = _POOLS[os.getpid()] = queue.Queue()
            for worker in [_Worker() for _ in range(n)]:  # all start before the first is waited for
                worker.wait_ready(30.0)
                pool.put(worker)


def _symbolic(mode: str, a: str, b: str, deadline: float) -> str:
    """The worker's answer for (mode, a, b), or "0" (an error when not computed by the deadline)."""
    sa, sb = to_sympy_str(a), to_sympy_str(b)
    if sa is None or sb is None:
        return "0"
    start_workers()
    pool, answer = _POOLS[os.getpid()], None
    with contextlib.suppress(queue.Empty):  # every worker stayed busy until the deadline
        worker = pool.get(timeout=max(0.0, deadline - time.monotonic()))
        try:
            if not worker.wait_ready(0.0):  # a ready one instead, where the pool has one
                with contextlib.suppress(queue.Empty):
                    other = pool.get_nowait()
                    worker, other = (other, worker) if other.wait_ready(0.0) else (worker, other)
                    pool.put(other)
            if worker.wait_ready(deadline - time.monotonic()):
                budget = max(0.05, min(SYMPY_TIMEOUT, deadline - time.monotonic()))
                answer = worker.ask(f"{mode}\t{sa}\t{sb}", budget)
        finally:
            pool.put(worker)
    if answer is None:
        _count_error()
    return answer or "0"


# ---- equivalence -----------------------------------------------------------------------------

def _relations_equal(a: str, b: str, deadline: float) -> bool:
    """Two relations 'left OP right', < and ≤ turned into > and ≥, with the same OP whose sides'
    differences left - right are a constant multiple of each other."""
    differences, ops = [], []
    for relation in (a, b):
        tokens = _split_top(relation, "=<>≤≥≠", keep=True)
        if len(tokens) != 3 or not tokens[0] or not tokens[2]:
            return False
        left, op, right = tokens[::-1] if tokens[1] in "<≤" else tokens  # a < b is b > a
        differences.append(f"({left})-({right})")
        ops.append({"<": ">", "≤": "≥"}.get(op, op))
    signs = ("+", "-") if ops[0] in "=≠" else ("+",)  # = and ≠ allow a negative factor
    return ops[0] == ops[1] and _symbolic("ratio", *differences, deadline) in signs


def _equiv(pred: str, gt: str, depth: int, deadline: float) -> bool:
    if depth > 4 or time.monotonic() > deadline:
        return False
    if max(len(pred), len(gt)) > MAX_ANSWER_LEN:
        return bool(gt.strip()) and pred.strip() == gt.strip()
    a, b = normalize(pred), normalize(gt)
    if not a or not b:
        return False  # an empty gold accepts nothing
    if a == b or _relations_equal(a, b, deadline):
        return True
    a, b = _answer_part(a), _answer_part(b)
    if a == b or re.fullmatch(r"-?\d+,\d+", pred.strip()) and a.replace(",", ".") == b:
        return True  # or a decimal comma in the prediction against a decimal point in the gold
    if (na := to_number(a)) is not None and (nb := to_number(b)) is not None:
        tolerance = _decimal_tolerance(a) or _decimal_tolerance(b)
        return na == nb or tolerance is not None and abs(na - nb) <= tolerance
    if "\\pm" in a + b:
        a, b = _expand_plus_minus(a), _expand_plus_minus(b)
    if all(m.startswith("\\mat(") and _encloses(m[4:]) for m in (a, b)):
        cells_a, cells_b = ([_split_top(r) for r in _split_top(m[5:-1], ";")] for m in (a, b))
        pairs = [(x, y) for ra, rb in zip(cells_a, cells_b) for x, y in zip(ra, rb)]
        same_shape = [len(r) for r in cells_a] == [len(r) for r in cells_b]
        return same_shape and all(_equiv(x, y, depth + 1, deadline) for x, y in pairs)
    if "\\mat(" in a + b:  # matrix arithmetic: sympy's
        return "\\mat(" in a and "\\mat(" in b and _symbolic("equal", a, b, deadline) == "1"
    ta, tb = _bracketed(a), _bracketed(b)
    ordered = [t is not None and t[0] != "{" for t in (ta, tb)]
    if any(ordered):  # a tuple or interval matches only one with the same brackets, in order
        return all(ordered) and ta[:2] == tb[:2] and len(ta[2]) == len(tb[2]) and all(
            _equiv(x, y, depth + 1, deadline) for x, y in zip(ta[2], tb[2]))
    pa, pb = (t[2] if t is not None else _split_top(s, ",∪") for s, t in ((a, ta), (b, tb)))
    if len(pa) > 64 or len(pb) > 64:
        return False
    pa, pb = (list(dict.fromkeys(normalize(x) for x in p)) for p in (pa, pb))  # repeats count once
    if len(pb) > 1 or len(pa) > 1 or ta is not None:  # sets, lists and unions: any order
        if len(pa) != len(pb):
            return False
        for x in pa:
            if (hit := next((y for y in pb if _equiv(x, y, depth + 1, deadline)), None)) is None:
                return False
            pb.remove(hit)
        return True
    decimal, exact = (a, b) if _decimal_tolerance(a) else (b, a)
    if tolerance := _decimal_tolerance(decimal):
        return _symbolic(f"near:{tolerance}", exact, decimal, deadline) == "1"
    return _symbolic("equal", a, b, deadline) == "1"


def is_equiv(pred: str | None, gt: str) -> bool:
    """True when a careful grader would accept pred for gt (answers, or texts: final_answer)."""
    if pred is None or gt is None:
        return False
    try:
        deadline = time.monotonic() + SYMPY_TIMEOUT
        return _equiv(final_answer(str(pred)), final_answer(str(gt)), 0, deadline)
    except Exception:
        _count_error()
        return False


def math_reward(text: str, gt) -> float:
    """1.0 when the last boxed answer of text matches gt (a string, a number or a list of them)."""
    try:
        pred = extract_answer(text)
        if pred is None:
            return 0.0
        golds = gt if isinstance(gt, (list, tuple)) else [gt]
        deadline = time.monotonic() + SYMPY_TIMEOUT  # one budget for all acceptable answers
        golds = [final_answer(str(g)) for g in golds if g is not None]
        return float(any(_equiv(pred, g, 0, deadline) for g in golds))
    except Exception:
        _count_error()
        return 0.0


def score_batch(texts: list[str], gts: list, threads: int = 4) -> list[float]:
    """math_reward over a batch in threads; their symbolic checks run in parallel in the workers."""
    if len(texts) < 16:
        return [math_reward(t, g) for t, g in zip(texts, gts)]
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(math_reward, texts, gts))


def score_completions(comps, answers: list, decode) -> list[float]:
    """math_reward of each decoded completion against answers[i]; 0 if cut at the token budget."""
    scores = score_batch([decode(c.response_ids) for c in comps], answers)
    return [0.0 if c.finish_reason == "length" else s for c, s in zip(comps, scores)]
