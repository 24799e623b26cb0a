"""The verifier on what real models write: every row of the gaps table of issue 24, both ways where the
convention is symmetric, the wrong answers beside each right one, and perturbed right answers."""
import json
import os

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import data
import reward
from reward import extract_answer, is_equiv, math_reward

reward.start_workers()

RIGHT = [  # (prediction, gold): accepted
    # mixed numbers
    ("\\frac{9}{5}", "1\\frac{4}{5}"), ("137.5", "137 \\frac{1}{2}"), ("3/2", "1 1/2"), ("-1\\frac12", "-1.5"),
    # prefixes
    ("(x, y) = (3, 2)", "(3,2)"), ("f(x) = 2x + 3", "2x+3"), ("h^{-1}(x) = \\frac{x+2}{7}", "\\frac{x+2}{7}"),
    ("|AB| = 5", "5"), ("A:B = 2:1", "2:1"), ("(p,q)=(3,2)", "(3,2)"), ("x \\in [-2,7]", "[-2,7]"),
    ("x = 5+5+1 = 11", "11"), ("x = \\frac{1}{\\sqrt{3}} \\approx 0.577", "\\frac{\\sqrt{3}}{3}"),
    # base subscripts
    ("4210_7", "4210_{7}"), ("204_{5}", "204_5"),
    # matrices
    ("\\begin{pmatrix} 1/2 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{bmatrix} \\frac12 & 0 \\\\ 0 & 1 \\end{bmatrix}"),
    ("\\begin{pmatrix} 0.5 \\\\ -2 \\end{pmatrix}", "\\begin{pmatrix} \\frac{1}{2} \\\\ -2 \\end{pmatrix}"),
    ("\\left[\\begin{array}{cc}1 & 2 \\\\3 & 4\\end{array}\\right]", "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}"),
    # plus-minus
    ("1 \\pm \\sqrt{19}", "1+\\sqrt{19}, 1-\\sqrt{19}"), ("\\pm 2021", "\\{-2021, 2021\\}"),
    ("\\{1\\pm\\sqrt{5},-2\\}", "-2, 1-\\sqrt{5}, 1+\\sqrt{5}"),
    # spaces are products, never towers
    ("2^6 3^5 5^4", "2^6 \\cdot 3^5 \\cdot 5^4"), ("2^6 3^5 5^4", "9720000"),
    # units and words
    ("125\\textnormal{ miles}", "125"), ("7 \\text{ any text}", "7"), ("12 square units", "12"),
    ("28 percent", "28\\%"), ("0.003^{\\prime\\prime}", "0.003"), ("1950^\\circ C", "1950"),
    ("6.43 \\times 10^{16} \\text{ cm}^{-3}", "6.43 \\times 10^{16}"),
    # relations and equations
    ("x \\ge 5", "5 \\le x"), ("-2 \\le x \\le 7", "x \\in [-2,7]"), ("0 < f(x) < 1", "(0,1)"),
    ("2x+4y-3=0", "y=-x/2+3/4"), ("-x > -1", "x < 1"), ("x \\neq 3", "x != 3"), ("-793 < a < 10", "(-793, 10)"),
    ("34x+45y-20z+100=0", "-34x-45y+20z-100=0"),
    # notation
    ("\\cfrac{1}{3}", "1/3"), ("\\sec^2(y)", "\\tan^2(y)+1"), ("\\sin 30^\\circ", "\\frac{1}{2}"),
    ("\\cos(60^{\\circ})", "0.5"), ("1 + i\\sqrt{3}", "1+\\sqrt{3} i"), ("(1+i)^2", "2i"),
    ("8.7e8", "8.7 \\times 10^{8}"), ("1.39e-10", "1.39 \\times 10^{-10}"), ("4.4 \\times 10^7", "44000000"),
    ("\\frac{1}{12}", "0.0833333333333333"), ("\\frac{1}{12}", "0.083333"), ("\\sqrt{17}", "4.123105625617661"),
    ("\\frac{1}{L C s^{2}+R C s+1}", "\\frac{1}{LCs^2 + RCs + 1}"), ("\\frac{2 \\pi}{\\omega}", "2\\pi/\\omega"),
    ("\\ln 2 + i\\pi / 3", "\\ln 2 + i\\frac{\\pi}{3}"), ("E_{1},E_{2}", "E_1, E_2"),
    # lists: several boxes, and/or, thousands
    ("12\\text{ and }13", "12, 13"), ("(11,7)or(7,11)", "(7,11),(11,7)"), ("11,\\! 111,\\! 100", "11111100"),
    ("a_{37} = 19, \\quad a_3 = 2", "a_3 = 2, a_{37} = 19"), ("\\{2, 1, 2\\}", "1,2"),
]
WRONG = [  # (prediction, gold): refused
    ("\\frac{4}{5}", "1\\frac{4}{5}"), ("68.5", "137 \\frac{1}{2}"), ("11/2", "1 1/2"), ("4/5", "1\\frac45"),
    ("\\frac{9}{5}", "2\\frac{4}{5}"), ("(3, 2)", "(x, y) = (2, 3)"), ("2x+4", "f(x) = 2x + 3"),
    ("4210_8", "4210_{7}"), ("42107", "4210_7"),
    ("\\begin{pmatrix} 1 & 0 \\\\ 0 & 1 \\end{pmatrix}", "\\begin{pmatrix} 1 & 0 \\\\ 0 & 2 \\end{pmatrix}"),
    ("\\begin{pmatrix} 1 & 0 \\end{pmatrix}", "\\begin{pmatrix} 1 \\\\ 0 \\end{pmatrix}"),
    ("1 + \\sqrt{19}", "1 \\pm \\sqrt{19}"), ("2021", "\\pm 2021"), ("x > 5", "x \\ge 5"), ("x \\le 5", "x \\ge 5"),
    ("(-2,7)", "-2 \\le x \\le 7"), ("[0,1]", "0 < f(x) < 1"), ("2x+4y-3=0", "y=-x/2+3/2"),
    ("x < 1", "-x < -1"), ("x = 5", "x = 6"), ("0.33", "\\frac{1}{3}"), ("1.414", "\\sqrt{2}"),
    ("0.0833", "\\frac{1}{12}"), ("0.08333", "\\frac{1}{12}"), ("\\sin 30^\\circ", "\\frac{\\sqrt3}{2}"),
    ("32, 349", "32349"), ("1.22", "1,22"), ("1.3", "1,3"), ("(1,3)", "\\{1,3\\}"), ("1", "1, 2"), ("1, 2", "1, 2, 3"),
    ("x = 1/3 \\approx 11", "11"), ("5 \\text{ or } 7", "5"), ("1 - i", "1 + i"), ("8.7e7", "8.7 \\times 10^{8}"),
    ("\\boxed{}", ""), ("", ""), ("", " "), ("1", " "), ("1+\\frac{1}{e}", "1-\\frac{1}{e}"), ("f(y)", "f(x)"),
]


@pytest.mark.parametrize("pred,gold", RIGHT)
def test_right_answers_score_1(pred, gold):
    assert is_equiv(pred, gold) and math_reward(f"so \\boxed{{{pred}}}", gold) == 1.0


@pytest.mark.parametrize("pred,gold", RIGHT)
def test_right_answers_score_1_with_the_roles_swapped(pred, gold):
    assert is_equiv(gold, pred)


@pytest.mark.parametrize("pred,gold", WRONG)
def test_wrong_answers_score_0(pred, gold):
    assert not is_equiv(pred, gold) and math_reward(f"so \\boxed{{{pred}}}", gold) == 0.0


@pytest.mark.parametrize("gold", ["", " ", "\n", "\\text{}", [""], [" ", ""]])
def test_an_empty_gold_accepts_nothing(gold):
    for text in ("\\boxed{}", "\\boxed{ }", "\\boxed{0}", "\\boxed{\\text{}}"):
        assert math_reward(text, gold) == 0.0


@pytest.mark.parametrize("answer", ["", "  ", "\t"])
def test_an_empty_gold_is_a_data_error_at_load(tmp_path, answer):
    path = tmp_path / "problems.jsonl"
    path.write_text(json.dumps({"problem": "1+1?", "answer": "2"}) + "\n"
                    + json.dumps({"problem": "2+2?", "answer": answer}) + "\n")
    with pytest.raises(ValueError, match=r"problems.jsonl:2: field 'answer' is empty or blank"):
        data.load_problems(str(path))
    path.write_text(json.dumps([{"problem": "2+2?", "answer": ["4", answer]}]))
    with pytest.raises(ValueError, match=r"problems.jsonl:item 1: field 'answer' is empty or blank"):
        data.load_problems(str(path))


@pytest.mark.parametrize("text,want", [
    ("so $x=\\boxed{-2}$ and $\\boxed{1}$.", "-2, 1"),                    # boxes joined by "and": one list
    ("\\boxed{(2, 2)} \\quad \\text{and} \\quad \\boxed{(6, 2)}", "(2, 2), (6, 2)"),
    ("first \\boxed{3}. On reflection the answer is \\boxed{5}", "5"),    # prose between: the last only
    ("\\framebox{204} minutes", "204"), ("\\boxed{\\boxed{7}}", "7"),
])
def test_several_boxes(text, want):
    assert extract_answer(text) == want


@pytest.mark.parametrize("text,want", [
    ("Answer \\( (9+1) \\)", "10"), ("Therefore $x \\geq 5$ is the solution.", "x \\ge 5"),
    ("The final answer is $14{,}916$. I hope it is correct.", "14916"), ("the answer is 2/3.", "2/3"),
    ("$1$ and $2$ and $3$", "1,2,3"), ("Answer $ \n 9 \n $", None), ("we get $x=2$ and then $y=3$", None),
])
def test_unboxed_text_is_read_by_its_math(text, want):
    if want is None:
        assert not is_equiv(text, "9") and not is_equiv(text, "3")
    else:
        assert is_equiv(text, want)
    assert math_reward(text, "10") == 0.0  # the reward itself needs a box


def test_minerva_and_aime_reference_solutions_and_every_gold():
    with open(os.path.join(os.path.dirname(__file__), "..", "bench", "data", "benchmark_answers.jsonl")) as f:
        rows = [json.loads(line) for line in f]
    minerva = [r for r in rows if r["set"] == "minerva"]
    assert sum(math_reward(r["solution"], r["answer"]) for r in minerva) >= 233
    golds = [g for r in rows for g in (r["answer"] if isinstance(r["answer"], list) else [r["answer"]])]
    assert sum(math_reward(f"\\boxed{{{g}}}", g) for g in golds) == len(golds)


# ---- never a wrong accept: right answers perturbed into wrong ones --------------------------

def _perturbations(draw):
    """(right, wrong, gold): a random right answer of one shape and the same answer with one thing
    changed (a digit, a sign, a bracket, a matrix entry, the whole part of a mixed number)."""
    n = draw(st.integers(1, 999))
    m = draw(st.integers(1, 999).filter(lambda v: v != n))
    a, b = draw(st.integers(-50, 50)), draw(st.integers(-50, 50))
    whole, num = draw(st.integers(1, 99)), draw(st.integers(1, 8))
    den = draw(st.integers(num + 1, 9))
    kind = draw(st.sampled_from(["digit", "sign", "bracket", "matrix", "mixed", "fraction", "tuple"]))
    if kind == "digit":
        return str(n), str(m), f"{n}"
    if kind == "sign":
        return f"{n}\\sqrt{{2}}", f"-{n}\\sqrt{{2}}", f"\\sqrt{{{2 * n * n}}}"
    if kind == "bracket":
        lo, hi = min(a, b) - 1, max(a, b) + 1
        left, right = draw(st.sampled_from(["(", "["])), draw(st.sampled_from([")", "]"]))
        other = {"(": "[", "[": "("}[left]
        return f"{left}{lo}, {hi}{right}", f"{other}{lo}, {hi}{right}", f"{left}{lo},{hi}{right}"
    if kind == "matrix":
        entries = [a, b, n, m]
        wrong = list(entries)
        wrong[draw(st.integers(0, 3))] += draw(st.sampled_from([-1, 1]))
        matrix = "\\begin{{pmatrix}} {} & {} \\\\ {} & {} \\end{{pmatrix}}"
        return matrix.format(*entries), matrix.format(*wrong), matrix.format(*entries).replace("pmatrix", "bmatrix")
    if kind == "mixed":
        return (f"\\frac{{{whole * den + num}}}{{{den}}}", f"{whole + draw(st.sampled_from([-1, 1]))}\\frac{{{num}}}{{{den}}}",
                f"{whole}\\frac{{{num}}}{{{den}}}")
    if kind == "fraction":
        return f"\\frac{{{num}}}{{{den}}}", f"\\frac{{{den}}}{{{num}}}", f"{num}/{den}"
    return f"({a}, {n})", f"({n}, {a})" if a != n else f"({a}, {m})", f"(x, y) = ({a},{n})"


@settings(max_examples=60, deadline=None, derandomize=True, suppress_health_check=list(HealthCheck))
@given(st.data())
def test_perturbed_right_answers_score_0(case):
    right, wrong, gold = _perturbations(case.draw)
    assert math_reward(f"\\boxed{{{right}}}", gold) == 1.0, (right, gold)
    assert math_reward(f"\\boxed{{{wrong}}}", gold) == 0.0, (wrong, gold)


# ---- conventions added for Math-Verify's labelled cases and the Minerva solutions --------------

@pytest.mark.parametrize("pred,gold", [
    ("1000,99", "1000.99"), ("2,74", "2.74"), ("0,111", "0.111"),  # a decimal comma in the prediction only
    ("\\boxed{(3, 3)} \\text{ for part (a) and } \\boxed{(1, 1)}", "(3, 3), (1, 1)"),
    ("\\boxed{1} papers and \\boxed{2} bins", "1, 2"),
    ("so \\boxed{200} and later. The final answer is $10,455$. I hope it is correct.", "10455"),
    ("Many words here $x$. So there are 12 distinct sequences that work.", "12"),
    ("\\boxed{12 $ and $13 }", "12\\text{ and }13"), ("$221,$8$", "221, 8"), ("14 {, }916", "14{,}916"),
    ("\\frac{1}{2} = \\frac{10}{9}", "\\frac{10}{9}"), ("(0.6,2.6667]", "(\\frac{3}{5},\\frac{8}{3}]"),
    ("\\frac{10\\sqrt{10.5}}{27}", "\\frac{5\\sqrt{42}}{27}"), ("np.arcsin(10/13)", "\\arcsin{\\frac{1}{1.3}}"),
    ("\\arcsin{1.3 \\sin{\\theta_w}}", "\\arcsin(1.3\\sin(\\theta_w))"),
    ("x_{0} \\cos (\\omega t)+\\dot{x}_{0} \\sin (\\omega t) / \\omega",
     "x_{0} \\cos (\\omega t)+\\frac{\\dot{x}_{0}}{\\omega} \\sin (\\omega t)"),
    ("\\frac{2-\\omega^{2}-\\omega i / 4}{\\omega^{4}+4}", "\\frac{2-\\omega^{2}-\\frac{\\omega i}{4}}{\\omega^{4}+4}"),
    ("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix} + \\begin{pmatrix}5 & 6 \\\\ 7 & 8\\end{pmatrix}",
     "\\begin{pmatrix}6 & 8 \\\\ 10 & 12\\end{pmatrix}"),
])
def test_added_conventions_accept(pred, gold):
    assert is_equiv(pred, gold)


@pytest.mark.parametrize("pred,gold", [
    ("1.22", "1,22"), ("1,3", "1.3, 2"), ("1,220", "1.22"),  # a comma in the gold is a list or thousands
    ("\\boxed{1} no no no no no \\boxed{2}", "1, 2"), ("\\boxed{1}. Then \\boxed{2}", "1, 2"),
    ("11a+c", "7 = 11a+c"), ("\\frac{1}{2} = \\frac{10}{9}", "\\frac{1}{2}"), ("(0.6,2.667]", "(0.6,\\frac{8}{3}]"),
    ("\\frac{10\\sqrt{10.4}}{27}", "\\frac{5\\sqrt{42}}{27}"), ("np.arcsin(10/12)", "\\arcsin{\\frac{1}{1.3}}"),
    ("\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix} \\begin{pmatrix}0 & 1 \\\\ 1 & 0\\end{pmatrix}",
     "\\begin{pmatrix}1 & 2 \\\\ 3 & 4\\end{pmatrix}"), ("(t + \\frac{1}{2} \\sin{2t}) u(t)", "(t - \\frac{1}{2}\\sin(2t))u(t)"),
])
def test_added_conventions_stay_strict(pred, gold):
    assert not is_equiv(pred, gold)
