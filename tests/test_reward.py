"""The verifier: MATH-convention equivalences both ways, extraction, and hostile input that must stay fast."""
import time

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import reward
from reward import final_answer, extract_answer, is_equiv, math_reward, score_batch

reward.start_workers()

EQUIV = [  # (prediction, ground truth): a careful grader accepts
    ("\\frac{1}{2}", "\\dfrac{1}{2}"), ("\\tfrac12", "\\frac{1}{2}"), ("\\frac12", "0.5"), ("1/2", "\\frac{1}{2}"),
    ("0.5", ".5"), ("-\\frac{3}{4}", "-0.75"), ("\\frac{-3}{4}", "-\\frac{3}{4}"), ("6/8", "\\frac34"),
    ("\\left( 1, 2 \\right)", "(1,2)"), ("(1, 2)", "(1,2)"), ("[0, 1)", "[0,1)"), ("(-\\infty, 3]", "(-\\infty,3]"),
    ("\\text{(B)}", "(B)"), ("\\mbox{yes}", "yes"), ("5\\text{ cm}", "5"), ("5 \\text{ inches}", "5"),
    ("12\\text{ square units}", "12"), ("90^\\circ", "90"), ("90^{\\circ}", "90"), ("45°", "45"),
    ("25\\%", "25"), ("\\$12.50", "12.50"), ("12.5", "12.50"), ("1,000", "1000"), ("1{,}000", "1000"),
    ("1,234,567", "1234567"), ("x = 5", "5"), ("k=-2", "-2"), ("  7 ", "7"), ("7.", "7"), ("007", "7"),
    ("3.0", "3"), ("1e3", "1000"), ("2^{10}", "1024"), ("2^10", "1024"), ("\\sqrt[3]{8}", "2"),
    ("\\sqrt{4}", "2"), ("\\sqrt2", "\\sqrt{2}"), ("\\frac{\\sqrt{2}}{2}", "\\frac{1}{\\sqrt{2}}"),
    ("2\\sqrt{3}", "\\sqrt{12}"), ("x^2+2x+1", "(x+1)^2"), ("2 \\cdot 3", "6"), ("2\\times 3", "6"),
    ("\\pi", "\\pi"), ("2\\pi", "2 \\pi"), ("\\frac{\\pi}{2}", "\\pi/2"), ("3, 1, 2", "1,2,3"),
    ("\\{3, 1\\}", "\\{1, 3\\}"), ("(1,\\frac{1}{2})", "(1, 0.5)"), ("\\left[ 2, 5 \\right]", "[2,5]"),
    ("\\text{5}", "5"), ("a+b", "b+a"), ("\\dfrac{x}{2}", "x/2"),
    ("\\frac{10}{4}", "\\frac{5}{2}"), ("-0", "0"), ("10^{-2}", "0.01"), ("\\infty", "\\infty"),
    ("(3, -1)", "\\left(3,-1\\right)"), ("\\text{Monday}", "Monday"), ("x=\\frac{1}{3}", "\\frac13"),
]
NOT_EQUIV = [  # a careful grader refuses
    ("\\frac{1}{3}", "0.333"), ("0.33", "\\frac13"), ("(1,2]", "(1,2)"), ("[1,2]", "(1,2)"), ("(2,1)", "(1,2)"),
    ("(1,2,3)", "(1,2)"), ("5", "-5"), ("1000", "100"), ("1,001", "1001.5"), ("\\sqrt{2}", "1.414"),
    ("2^{10}", "1000"), ("x^2", "x^3"), ("x+1", "y+1"), ("\\pi", "3.14"), ("1,2", "1,2,3"),
    ("\\{1,2\\}", "\\{1,3\\}"), ("(B)", "(C)"), ("12", "21"), ("", "0"),
    ("\\frac{1}{0}", "1"), ("11\\%", "10"), ("3", "3.01"),
    ("\\infty", "-\\infty"), ("__import__('os')", "0"), ("yes", "no"),
]


@pytest.mark.parametrize("pred,gt", EQUIV)
def test_equivalent(pred, gt):
    assert is_equiv(pred, gt) and is_equiv(gt, pred)


@pytest.mark.parametrize("pred,gt", NOT_EQUIV)
def test_not_equivalent(pred, gt):
    assert not is_equiv(pred, gt) and not is_equiv(gt, pred)


def test_case_count():
    assert len(EQUIV) + len(NOT_EQUIV) >= 60


@pytest.mark.parametrize("text,want", [
    ("so the answer is \\boxed{42}.", "42"),
    ("\\boxed{1} then \\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),           # the last box
    ("\\boxed{\\{1, {2}\\}}", "\\{1, {2}\\}"),                          # nested braces
    ("the answer is \\boxed 5.", "5"), ("\\fbox{7}", "7"), ("\\boxed {  9 }", "9"),
    ("<think>try \\boxed{1}</think> final \\boxed{2}", "2"),            # only after </think>
    ("<think>try \\boxed{1}</think> no box", None),
    ("<think>never closed \\boxed{3}", None),
    ("no box at all", None), ("cut off \\boxed{12", None), ("", None),
])
def test_extraction(text, want):
    assert extract_answer(text) == want


def test_math_reward_forms():
    assert math_reward("\\boxed{142}", 142.0) == 1.0
    assert math_reward("\\boxed{142}", "142") == 1.0
    assert math_reward("\\boxed{b}", ["a", "b"]) == 1.0
    assert math_reward("\\boxed{c}", ["a", "b"]) == 0.0
    assert math_reward(None, "1") == 0.0
    assert math_reward("\\boxed{1}", None) == 0.0
    # a gold that states nothing ("The final answer is ."): no answer, and the other golds still count
    assert final_answer("The final answer is . ") == ""
    assert math_reward("\\boxed{5}", ["The final answer is . ", "5"]) == 1.0


HOSTILE = ["9^{9^{9^{9^{9}}}}", "10^{10^{10^{10}}}", "{" * 5000 + "1" + "}" * 5000, "\\frac{1}{0}", "1/0",
           "x" * 1_000_000, "\\sqrt{" * 2000 + "2" + "}" * 2000, "(" * 3000 + ")" * 3000, "2^" * 5000 + "2",
           "1," * 20000, "\\boxed{" * 10000, "((((((((x+1)**99)**99)**99)**99)", "99999999999**99999999999",
           "factorial(100000)", "\\frac{" * 300 + "1" + "}{2}" * 300, ", ".join(str(i) for i in range(3000))]


SLOW_BY_DESIGN = {0, 1, 12}  # each runs into the time limit several times (about 5 s in all)


@pytest.mark.parametrize("s", [pytest.param(h, marks=pytest.mark.slow) if i in SLOW_BY_DESIGN else h
                               for i, h in enumerate(HOSTILE)], ids=range(len(HOSTILE)))
def test_hostile_inputs_return_fast(s):
    for a, b in ((s, "1"), ("1", s), (s, s + "1")):
        t = time.monotonic()
        assert is_equiv(a, b) in (True, False)
        assert math_reward(f"\\boxed{{{a}}}", b) in (0.0, 1.0)
        assert time.monotonic() - t < 2.5  # two calls, each bounded by about a second


def test_bound_holds_in_threads():
    from concurrent.futures import ThreadPoolExecutor
    t = time.monotonic()
    with ThreadPoolExecutor(4) as ex:
        out = list(ex.map(lambda s: is_equiv(s, "1"), ["9^{9^{9^{9}}}"] * 4 + ["2^{10}"] * 4))
    assert out == [False] * 8 and time.monotonic() - t < 3.0


def test_bound_holds_in_worker_processes():
    import multiprocessing as mp
    t = time.monotonic()
    with mp.get_context("spawn").Pool(2) as pool:  # daemonic workers: the verifier still bounds itself
        out = pool.starmap(is_equiv, [("10^{10^{10^{10}}}", "1"), ("2^{10}", "1024")])
    assert out == [False, True]
    assert time.monotonic() - t < 15  # includes starting two interpreters and sympy


def test_score_batch_matches_one_by_one():
    texts = [f"\\boxed{{{i % 7}}}" for i in range(100)] + ["\\boxed{2^{10}}", "\\boxed{x^2}"]
    gts = [str(i % 5) for i in range(100)] + ["1024", "x^3"]
    assert score_batch(texts, gts) == [math_reward(t, g) for t, g in zip(texts, gts)]


@settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(st.lists(st.sampled_from(list("0123456789+-*/^{}()[]\\,.=x e") + ["\\frac", "\\sqrt", "\\boxed", "^{",
                                                                          "\\pi", "</think>"]), max_size=60).map("".join),
       st.text(max_size=20))
def test_random_strings_return_a_bool_quickly(a, b):
    t = time.monotonic()
    assert is_equiv(a, b) in (True, False)
    assert math_reward(a, b) in (0.0, 1.0)
    assert extract_answer(a) is None or isinstance(extract_answer(a), str)
    assert time.monotonic() - t < 2.5
