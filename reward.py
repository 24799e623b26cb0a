"""The math answer verifier: extract the last \\boxed{} answer, normalise, decide equivalence.

    math_reward(text, gt) = 1.0 if is_equiv(extract_answer(text), g) for some acceptable g else 0.0
"""
from __future__ import annotations

import re


def _balanced(s: str, i: int) -> tuple[str, int] | None:
    """s[i] == '{': -> (content, index after the closing brace), or None when it never closes."""
    depth = 0
    for j in range(i, len(s)):
        c = s[j]
        if c == "{":
            depth += 1
        elif c == "}":
            depth -= 1
            if depth == 0:
                return s[i + 1:j], j + 1
    return None


def extract_answer(text: str) -> str | None:
    """Content of the last \\boxed{...} / \\fbox{...} / \\boxed x, after </think> when there is one."""
    if not isinstance(text, str):
        return None
    if "<think>" in text and "</think>" not in text:
        return None  # the model never finished thinking
    if "</think>" in text:
        text = text.rsplit("</think>", 1)[1]
    best = None
    for m in re.finditer(r"\\(?:boxed|fbox)\s*(\{)?", text):
        if m.group(1):
            got = _balanced(text, m.end() - 1)
            if got is not None:
                best = got[0]
        else:
            m2 = re.match(r"\s*([^\s$]+)", text[m.end():]) if text[m.end() - 1:m.end()].isspace() else None
            if m2:
                best = m2.group(1).rstrip(".")
    return None if best is None else best.strip()


def _norm(s: str) -> str:
    s = s.strip().replace(" ", "")
    s = re.sub(r"^\\?\(|\\?\)$", "", s) if s.startswith("\\(") else s
    return s.rstrip(".")


def is_equiv(pred: str | None, gt: str) -> bool:
    if pred is None:
        return False
    a, b = _norm(pred), _norm(str(gt))
    if a == b:
        return True
    try:
        return abs(float(a) - float(b)) < 1e-9
    except ValueError:
        return False


def math_reward(text: str, gt) -> float:
    golds = gt if isinstance(gt, (list, tuple)) else [gt]
    pred = extract_answer(text)
    return float(any(is_equiv(pred, str(g)) for g in golds))
