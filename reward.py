"""The math answer verifier: extract the last \\boxed{} answer, normalise it, decide equivalence.

    math_reward(text, gt) = 1.0 if is_equiv(extract_answer(text), g) for some acceptable g, else 0.0

is_equiv tries, in order, each cheaper than the next:
  1. the normalised strings are equal (MATH conventions: \\dfrac -> \\frac, \\left/\\right,
     \\text{units}, degrees, \\%, \\$, thousands separators, a leading "x =", spaces);
  2. both are exact numbers (integers, decimals, fractions) and equal as rationals;
  3. tuples and intervals: same brackets, same length, equal element by element; a ground truth
     that is a bare list or a set ("1, 2" or \\{1, 2\\}) matches the same elements in any order;
  4. both translate to sympy (\\frac, \\sqrt, \\sqrt[n], ^, \\cdot, \\times, \\pi, \\infty,
     implicit multiplication) and sympy finds a - b = 0, in a separate worker process killed after
     a time limit.
Nothing here raises or hangs: every call returns within about a second, from any thread or process.
"""
from __future__ import annotations

import os
import queue
import re
import subprocess
import sys
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from fractions import Fraction

SYMPY_TIMEOUT = 0.8  # seconds for one symbolic comparison
_POOL_LOCK = threading.Lock()
MAX_SYMBOLIC_LEN = 400  # characters; longer answers are compared as strings and numbers only


# ---- extraction ------------------------------------------------------------------------------

def extract_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} / \\boxed x; after </think> when the text
    has one."""
    try:
        if not isinstance(text, str):
            return None
        if "</think>" in text:
            text = text.rsplit("</think>", 1)[1]
        elif "<think>" in text:
            return None  # the model never finished thinking
        i = max(text.rfind("\\boxed"), text.rfind("\\fbox"))
        if i < 0:
            return None
        j = i + (6 if text.startswith("\\boxed", i) else 5)
        rest = text[j:]
        if rest.lstrip().startswith("{"):
            k = j + len(rest) - len(rest.lstrip())
            depth = 0
            for e in range(k, len(text)):
                c = text[e]
                if c == "{":
                    depth += 1
                elif c == "}":
                    depth -= 1
                    if depth == 0:
                        return text[k + 1:e].strip()
            return None  # never closed: a cut-off answer
        m = re.match(r"\s+([^\s$]+)", rest)  # "\boxed 5"
        return m.group(1).rstrip(".") if m else None
    except Exception:
        return None


# ---- normalisation ---------------------------------------------------------------------------

_UNIT_WORDS = (r"(?:units?|cm|centimeters?|m|meters?|km|kilometers?|mm|inches|inch|in|feet|foot|"
               r"ft|miles?|yards?|seconds?|sec|minutes?|min|hours?|hrs?|days?|weeks?|years?|"
               r"degrees?|dollars?|cents?|"
               r"square|sq|cubic|mph|kg|g|grams?|pounds?|lbs?|liters?|ml|people|students|ways)")


def _fix_fracs(s: str) -> str:
    """\\frac12 -> \\frac{1}{2}, \\frac1{b} -> \\frac{1}{b}, \\sqrt2 -> \\sqrt{2}."""
    s = re.sub(r"\\frac\s*(\d)\s*(\d)", r"\\frac{\1}{\2}", s)
    s = re.sub(r"\\frac\s*(\d)\s*\{", r"\\frac{\1}{", s)
    s = re.sub(r"\\frac\s*\{([^{}]*)\}\s*(\w)", r"\\frac{\1}{\2}", s)
    return re.sub(r"\\sqrt\s*(\w)", r"\\sqrt{\1}", s)


def normalize(s: str) -> str:
    s = str(s).strip()
    s = s.replace("\n", "").replace("\\!", "").replace("\\\\", "\\")
    s = re.sub(r"\\[,;:]|\\quad|\\qquad|~", " ", s)
    s = s.replace("\\dfrac", "\\frac").replace("\\tfrac", "\\frac")
    s = s.replace("\\left", "").replace("\\right", "").replace("\\displaystyle", "")
    s = re.sub(r"\^\s*\{\s*\\circ\s*\}|\^\s*\\circ|°|\\degree", "", s)
    s = s.replace("\\$", "").replace("$", "").replace("\\%", "").replace("%", "")
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|textrm|operatorname)\s*\{\s*" + _UNIT_WORDS
               + r"(?:\s+" + _UNIT_WORDS + r")*(?:\s*\^?\s*\{?\d\}?)?\s*\}\s*(\^\s*\{?\d\}?)?\s*$",
               "", s)  # trailing units
    s = re.sub(r"\\(?:text|textbf|mbox|mathrm|textrm|mathbf)\s*\{([^{}]*)\}", r"\1", s)
    s = re.sub(r"(?<=\d)\s+" + _UNIT_WORDS + r"(\^\d)?\s*$", "", s)  # "5 cm"
    s = s.strip()
    s = re.sub(r"^[a-zA-Z]\w{0,2}\s*(?:=|:=)\s*(?=\S)", "", s)  # "x = 5" -> "5"
    s = _fix_fracs(s)
    s = s.replace(" ", "")
    s = re.sub(r"\{,\}", ",", s)
    if re.fullmatch(r"-?\d{1,3}(,\d{3})+(\.\d+)?", s):
        s = s.replace(",", "")  # 1,000 -> 1000
    s = re.sub(r"(?<![\d}])\.(?=\d)", "0.", s)  # .5 -> 0.5
    s = s.rstrip(".")
    if re.fullmatch(r"\{[^{}]*\}", s):
        s = s[1:-1]
    return s


# ---- exact numbers ---------------------------------------------------------------------------

def to_number(s: str) -> Fraction | None:
    """An exact rational from an integer, decimal, a/b or \\frac{a}{b} (signs allowed), else
    None."""
    m = re.fullmatch(r"(-?)\\frac\{(-?\d+(?:\.\d+)?)\}\{(-?\d+(?:\.\d+)?)\}", s)
    if m:
        num, den = Fraction(m.group(2)), Fraction(m.group(3))
        return None if den == 0 else (-1 if m.group(1) else 1) * num / den
    m = re.fullmatch(r"(-?\d+(?:\.\d+)?)/(-?\d+(?:\.\d+)?)", s)
    if m:
        den = Fraction(m.group(2))
        return None if den == 0 else Fraction(m.group(1)) / den
    if re.fullmatch(r"[-+]?\d+(\.\d+)?([eE][-+]?\d{1,3})?", s) and len(s) < 200:
        return Fraction(s)
    return None


# ---- tuples, intervals, sets -----------------------------------------------------------------

def _split_top(s: str) -> list[str]:
    parts, depth, cur = [], 0, []
    for c in s:
        if c in "([{":
            depth += 1
        elif c in ")]}":
            depth -= 1
        if c == "," and depth == 0:
            parts.append("".join(cur))
            cur = []
        else:
            cur.append(c)
    parts.append("".join(cur))
    return parts


def _bracketed(s: str):
    """'(1,2]' -> ('(', ']', ['1', '2']); '\\{1,2\\}' -> ('{', '}', ...); None when not a
    bracketed list."""
    if s.startswith("\\{") and s.endswith("\\}"):
        return "{", "}", _split_top(s[2:-2])
    if len(s) >= 2 and s[0] in "([" and s[-1] in ")]":
        inner = s[1:-1]
        depth = 0
        for c in inner:  # "(1)+(2)" is not a tuple: the outer pair must enclose everything
            depth += c in "([{"
            depth -= c in ")]}"
            if depth < 0:
                return None
        parts = _split_top(inner)
        if len(parts) > 1:
            return s[0], s[-1], parts
    return None


def _unordered_equal(ps: list[str], gs: list[str], depth: int, deadline: float) -> bool:
    if len(ps) != len(gs) or len(gs) > 64:
        return False
    left = list(gs)
    for p in ps:
        hit = next((i for i, g in enumerate(left) if _equiv(p, g, depth + 1, deadline)), None)
        if hit is None:
            return False
        left.pop(hit)
    return True


# ---- symbolic (sympy, in a killable worker process) ------------------------------------------

_FUNCS = {"sqrt", "pi", "oo", "log", "ln", "sin", "cos", "tan", "exp", "E", "I", "Abs"}


def to_sympy_str(s: str) -> str | None:
    """LaTeX -> a sympy expression string over a small allow-list, or None (unknown commands,
    odd characters)."""
    if len(s) > MAX_SYMBOLIC_LEN or s.count("{") > 40:
        return None
    s = s.replace("\\cdot", "*").replace("\\times", "*").replace("\\div", "/")
    s = (s.replace("\\infty", "oo").replace("\\pi", "pi").replace("\\ln", "log")
         .replace("\\log", "log"))
    s = re.sub(r"\\(sin|cos|tan|exp)", r"\1", s)
    for _ in range(40):  # innermost-first rewrites of \frac and \sqrt; bounded
        t = re.sub(r"\\frac\{([^{}]*)\}\{([^{}]*)\}", r"((\1)/(\2))", s)
        t = re.sub(r"\\sqrt\[([^{}\[\]]*)\]\{([^{}]*)\}", r"((\2)**(1/(\1)))", t)
        t = re.sub(r"\\sqrt\{([^{}]*)\}", r"sqrt(\1)", t)
        t = re.sub(r"\^\{([^{}]*)\}", r"**(\1)", t)
        # plain grouping, not a command's argument
        t = re.sub(r"(?<![}\]a-zA-Z])\{([^{}]*)\}", r"(\1)", t)
        if t == s:
            break
        s = t
    s = s.replace("^", "**")
    if "\\" in s or "__" in s or not re.fullmatch(r"[0-9a-zA-Z+\-*/(). ]*", s) or not s.strip():
        return None
    for name in re.findall(r"[a-zA-Z]+", s):
        if len(name) > 1 and name not in _FUNCS:
            return None
    return s


_WORKER_CODE = r'''
import resource, sys
try:
    resource.setrlimit(resource.RLIMIT_AS, (2 << 30, 2 << 30))
except Exception:
    pass
import sympy
from sympy.parsing.sympy_parser import (parse_expr, standard_transformations,
                                        implicit_multiplication_application, convert_xor)
T = standard_transformations + (implicit_multiplication_application, convert_xor)
NS = {"ln": sympy.log, "E": sympy.E, "I": sympy.I, "pi": sympy.pi, "oo": sympy.oo}
sys.stdout.write("ready\n"); sys.stdout.flush()
for line in sys.stdin:
    try:
        a, b = line.rstrip("\n").split("\t")
        x, y = (parse_expr(a, local_dict=dict(NS), transformations=T),
                parse_expr(b, local_dict=dict(NS), transformations=T))
        ok = x == y or sympy.simplify(x - y) == 0
    except BaseException:
        ok = False
    sys.stdout.write("1\n" if ok else "0\n"); sys.stdout.flush()
'''


class _Worker:
    """A python process running sympy; a request that overruns its time is answered False and the
    process is killed and replaced (the new one warms up in the background). Pipes and a
    subprocess, so it works from threads and from daemonic worker processes alike."""

    def __init__(self):
        self.proc, self.ready = None, False

    def start(self):
        self.proc = subprocess.Popen([sys.executable, "-c", _WORKER_CODE], stdin=subprocess.PIPE,
                                     stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True,
                                     bufsize=1)
        self.ready = False

    def wait_ready(self, timeout: float) -> bool:
        if not self.ready:
            self.ready = self._read_line(timeout) == "ready\n"
        return self.ready

    def _read_line(self, timeout: float) -> str | None:
        import selectors
        with selectors.DefaultSelector() as sel:
            sel.register(self.proc.stdout, selectors.EVENT_READ)
            if not sel.select(max(0.0, timeout)):
                return None
        return self.proc.stdout.readline()

    def restart(self):
        self.proc.kill()
        self.proc.wait()
        self.start()

    def equal(self, a: str, b: str, timeout: float) -> bool:
        end = time.monotonic() + timeout
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        if not self.wait_ready(end - time.monotonic()):
            return False  # still starting: this answer is lost, the worker is kept
        try:
            self.proc.stdin.write(f"{a}\t{b}\n")
            self.proc.stdin.flush()
            line = self._read_line(end - time.monotonic())
        except (OSError, ValueError):
            line = None
        if not line:
            self.restart()  # overran (or died)
            _count_error()
            return False
        return line.strip() == "1"


# symbolic checks that overran their time, and exceptions caught (read by reward_errors())
_ERRORS = [0]


def _count_error():
    with _POOL_LOCK:
        _ERRORS[0] += 1


def reward_errors() -> int:
    """Errors and time-outs since the last call (each scored 0), for the reward/errors metric."""
    with _POOL_LOCK:
        n, _ERRORS[0] = _ERRORS[0], 0
    return n


_POOL: queue.Queue | None = None
_POOL_PID = None


def start_workers(n: int = 2):
    """Start n sympy workers now (the trainer does this at start-up, so no scoring call pays for
    it)."""
    global _POOL, _POOL_PID
    with _POOL_LOCK:
        if _POOL is None or _POOL_PID != os.getpid():  # a forked child gets its own workers
            _POOL, _POOL_PID = queue.Queue(), os.getpid()
            workers = [_Worker() for _ in range(n)]
            for w in workers:
                w.start()
            for w in workers:
                w.wait_ready(30.0)
                _POOL.put(w)


def _symbolic_equal(a: str, b: str, deadline: float) -> bool:
    sa, sb = to_sympy_str(a), to_sympy_str(b)
    if sa is None or sb is None:
        return False
    start_workers()
    try:
        w = _POOL.get(timeout=max(0.0, deadline - time.monotonic()))
    except queue.Empty:
        return False
    try:
        return w.equal(sa, sb, max(0.05, min(SYMPY_TIMEOUT, deadline - time.monotonic())))
    finally:
        _POOL.put(w)


# ---- equivalence -----------------------------------------------------------------------------

def _equiv(pred: str, gt: str, depth: int, deadline: float) -> bool:
    if depth > 3 or time.monotonic() > deadline:
        return False
    a, b = normalize(pred), normalize(gt)
    if a == b:
        return True
    if not a or not b:
        return False
    na, nb = to_number(a), to_number(b)
    if na is not None and nb is not None:
        return na == nb
    ta, tb = _bracketed(a), _bracketed(b)
    if tb is not None or ta is not None:
        if ta is None or tb is None:
            return False
        if tb[0] == "{":  # a set: any order
            return ta[0] == "{" and _unordered_equal(ta[2], tb[2], depth, deadline)
        return ta[:2] == tb[:2] and len(ta[2]) == len(tb[2]) and all(
            _equiv(x, y, depth + 1, deadline) for x, y in zip(ta[2], tb[2]))
    pa, pb = _split_top(a), _split_top(b)
    if len(pb) > 1 or len(pa) > 1:  # "1,2,3": a list of answers, in any order
        return _unordered_equal(pa, pb, depth, deadline)
    return _symbolic_equal(a, b, deadline)


def is_equiv(pred: str | None, gt: str) -> bool:
    """True when a careful grader would accept pred for gt. Never raises; returns within about a
    second."""
    if pred is None or gt is None:
        return False
    try:
        return _equiv(str(pred), str(gt), 0, time.monotonic() + SYMPY_TIMEOUT)
    except Exception:
        return False


def math_reward(text: str, gt) -> float:
    """1.0 when the last boxed answer of text matches gt (a string, a number or a list of
    acceptable answers)."""
    try:
        pred = extract_answer(text)
        if pred is None:
            return 0.0
        golds = gt if isinstance(gt, (list, tuple)) else [gt]
        deadline = time.monotonic() + SYMPY_TIMEOUT  # one budget for all acceptable answers
        return float(any(_equiv(pred, str(g), 0, deadline) for g in golds if g is not None))
    except Exception:
        _count_error()
        return 0.0


def score_batch(texts: list[str], gts: list, threads: int = 4) -> list[float]:
    """math_reward over a batch in threads; the symbolic checks among them run in parallel in the
    sympy workers (started on first need, or ahead by start_workers(n))."""
    if len(texts) < 16:
        return [math_reward(t, g) for t, g in zip(texts, gts)]
    with ThreadPoolExecutor(threads) as ex:
        return list(ex.map(math_reward, texts, gts))


def score_completions(comps, answers: list, decode) -> list[float]:
    """Rewards of sampled completions (objects with response_ids and finish_reason), answers[i]
    for comps[i]: math_reward of the decoded response, and 0 for a response cut at the budget (it
    never finished)."""
    scores = score_batch([decode(c.response_ids) for c in comps], answers)
    return [0.0 if c.finish_reason == "length" else s for c, s in zip(comps, scores)]
