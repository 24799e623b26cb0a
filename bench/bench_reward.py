"""The verifier against labels no one here wrote, beside math-verify; its worst case and throughput.

    python bench/bench_reward.py                 # writes bench/results/reward.json and reward.md
    python bench/bench_reward.py --skip-math-verify --skip-speed
    python bench/bench_reward.py --extract-math-verify GIT_DIR   # rebuild bench/data/math_verify_cases.jsonl
    python bench/bench_reward.py --copy-benchmarks DIR           # rebuild bench/data/benchmark_answers.jsonl

Agreement: each labelled (gold, prediction) pair of Math-Verify's own test suite (bench/data/, Apache-2.0,
source commit in bench/data/README.md) is scored by ours on the last \\boxed{} of each side where it has
one, else the side as it is; math-verify (optional: pip install math-verify) scores the raw pair the way its
test does (the test's extraction targets, precision, strict and set-relation settings). A wrong accept is a
pair labelled 0 that is scored 1. Benchmarks: every gold of the five test sets against itself, and the AIME
and Minerva reference solutions (their last \\boxed{}) against their gold. Speed: the slowest single call of
each side, then the worst is_equiv over hostile inputs and completions per second of score_batch.
"""
import argparse
import ast
import json
import math
import os
import platform
import random
import subprocess
import sys
import time

BENCH = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(BENCH))
from bench.common import RESULTS, save_result  # noqa: E402
import reward  # noqa: E402

DATA = os.path.join(BENCH, "data")
CASES = os.path.join(DATA, "math_verify_cases.jsonl")
ANSWERS = os.path.join(DATA, "benchmark_answers.jsonl")

HOSTILE = ["9^{9^{9^{9^{9}}}}", "10^{10^{10^{10}}}", "{" * 5000 + "1" + "}" * 5000, "x" * 1_000_000,
           "\\sqrt{" * 2000 + "2" + "}" * 2000, "(" * 3000 + ")" * 3000, "2^" * 5000 + "2", "1," * 20000,
           "((((((((x+1)**99)**99)**99)**99)", "\\frac{" * 300 + "1" + "}{2}" * 300,
           ", ".join(str(i) for i in range(3000)), "x^{99999}-(x+1)^{99999}", "2^6 3^5 5^4"]


# ---- data files (rebuilt only on request; the bench and the tests read bench/data/) ----------

def extract_math_verify_cases(git_dir: str):
    """Every parametrized (gold, pred, expected) row of Math-Verify's tests/, with the settings its
    test passes to compare_strings, into bench/data/math_verify_cases.jsonl."""
    def git(*args):
        return subprocess.run(["git", "--git-dir", git_dir, *args], capture_output=True, text=True,
                              check=True).stdout
    commit, cases = git("rev-parse", "HEAD").strip(), []
    for path in sorted(f for f in git("ls-tree", "--name-only", "HEAD", "tests/").split() if f.endswith(".py")):
        tree = ast.parse(git("show", f"HEAD:{path}"))
        for function in (n for n in tree.body if isinstance(n, ast.FunctionDef)):
            for decorator in function.decorator_list:
                if not (isinstance(decorator, ast.Call) and getattr(decorator.func, "attr", "") == "parametrize"):
                    continue
                names = [n.strip() for n in ast.literal_eval(decorator.args[0]).split(",")]
                if not {"gold", "pred"} <= set(names):
                    continue
                call = next(n for n in ast.walk(function) if isinstance(n, ast.Call)
                            and getattr(n.func, "id", "") in ("compare_strings", "verify"))
                keywords = {k.arg: k.value for k in call.keywords} if call.func.id == "compare_strings" else {}
                for element in decorator.args[1].elts:
                    # rows are literals but for one f-string of math.sqrt(17)
                    values = eval(compile(ast.Expression(element), path, "eval"), {"math": math, "__builtins__": {}})
                    row = dict(zip(names, values))
                    config = {k: row[v.id] if isinstance(v, ast.Name) else ast.literal_eval(v)
                              for k, v in keywords.items()}
                    cases.append({"source": f"{path}::{function.name}", "line": element.lineno,
                                  "gold": row["gold"], "prediction": row["pred"],
                                  "label": int(row.get("expected", row.get("result"))), "config": config})
    with open(CASES, "w") as f:
        f.write("".join(json.dumps(c) + "\n" for c in cases))
    print(f"{len(cases)} cases from Math-Verify commit {commit} -> {CASES}")


def copy_benchmarks(directory: str):
    """The gold answers of the five test sets, and the AIME and Minerva reference solutions, into
    bench/data/benchmark_answers.jsonl."""
    rows = []
    for name in ("aime", "amc", "math", "minerva", "olympiad_bench"):
        with open(os.path.join(directory, name + ".json")) as f:
            for index, problem in enumerate(json.load(f)):
                row = {"set": name, "index": index, "answer": problem["answer"]}
                if name in ("aime", "minerva"):
                    row["solution"] = problem["solution"]
                rows.append(row)
    with open(ANSWERS, "w") as f:
        f.write("".join(json.dumps(r) + "\n" for r in rows))
    print(f"{len(rows)} answers -> {ANSWERS}")


# ---- agreement -------------------------------------------------------------------------------

def last_boxed_or_all(text: str) -> str:
    """The convention the agreement figures use: the last \\boxed{} where there is one, else the text."""
    return reward.extract_answer(text) or text


def math_verify_score(case: dict):
    """math-verify on the raw pair, as its own test calls it; None when it is not installed."""
    from math_verify import ExprExtractionConfig, LatexExtractionConfig, parse, verify
    config = case["config"]
    if not config:  # tests that call verify(parse(gold), parse(pred)) with the defaults
        return int(verify(parse(case["gold"]), parse(case["prediction"])))
    targets = [LatexExtractionConfig(boxed_match_priority=0) if t == "latex" else ExprExtractionConfig()
               for t in config.get("match_types", ["latex", "expr"])]
    return int(verify(parse(case["gold"], targets), parse(case["prediction"], targets),
                      float_rounding=config.get("precision", 6), strict=config.get("strict", True),
                      allow_set_relation_comp=config.get("allow_set_relation_comp", False)))


def timed(function, *args):
    start = time.monotonic()
    try:
        value = function(*args)
    except Exception as error:  # math-verify raises on some inputs; that is a 0
        value = f"error: {type(error).__name__}"
    return value, time.monotonic() - start


def agreement(use_math_verify: bool) -> dict:
    with open(CASES) as f:
        cases = [json.loads(line) for line in f]
    sides = {"ours": lambda c: int(reward.is_equiv(last_boxed_or_all(c["prediction"]),
                                                   last_boxed_or_all(c["gold"])))}
    if use_math_verify:
        sides["math_verify"] = math_verify_score
    result = {}
    for side, score in sides.items():
        agree = wrong_accepts = wrong_rejects = 0
        slowest, disagreements = (0.0, None), []
        for case in cases:
            value, seconds = timed(score, case)
            value = value if value in (0, 1) else 0
            if seconds > slowest[0]:
                slowest = (seconds, f"{case['source']}:{case['line']}")
            if value == case["label"]:
                agree += 1
                continue
            wrong_accepts += value == 1
            wrong_rejects += value == 0
            disagreements.append({"where": f"{case['source'].split('::')[1]}:{case['line']}",
                                  "label": case["label"], "gold": case["gold"][-120:],
                                  "prediction": case["prediction"][-120:]})
        result[side] = {"cases": len(cases), "agree": agree, "wrong_accepts": wrong_accepts,
                        "wrong_rejects": wrong_rejects, "slowest_call_s": round(slowest[0], 3),
                        "slowest_case": slowest[1], "disagreements": disagreements}
    return result


def benchmarks() -> dict:
    with open(ANSWERS) as f:
        rows = [json.loads(line) for line in f]
    gold_self = sum(reward.math_reward(f"\\boxed{{{g}}}", g) == 1.0 for r in rows
                    for g in (r["answer"] if isinstance(r["answer"], list) else [r["answer"]]))
    golds = sum(len(r["answer"]) if isinstance(r["answer"], list) else 1 for r in rows)
    result = {"golds_scoring_1_against_themselves": f"{gold_self}/{golds}"}
    for name in ("aime", "minerva"):
        solved = [r for r in rows if r["set"] == name]
        failed = [{"index": r["index"], "answer": r["answer"], "boxed": reward.extract_answer(r["solution"])}
                  for r in solved if reward.math_reward(r["solution"], r["answer"]) != 1.0]
        result[f"{name}_reference_solutions_scoring_1"] = f"{len(solved) - len(failed)}/{len(solved)}"
        result[f"{name}_failures"] = failed
    return result


# ---- speed -----------------------------------------------------------------------------------

def speed() -> dict:
    worst, worst_case = 0.0, None
    for hostile in HOSTILE:
        for a, b in ((hostile, "1"), ("1", hostile), (hostile, hostile + "1")):
            _, seconds = timed(reward.is_equiv, a, b)
            if seconds > worst:
                worst, worst_case = seconds, a[:40]
    rng = random.Random(0)
    texts, golds = [], []
    for i in range(10_000):
        kind = i % 4
        if kind == 0:
            value = rng.randint(0, 999)
            texts.append(f"... so \\boxed{{{value if rng.random() < .6 else value + 1}}}")
            golds.append(str(value))
        elif kind == 1:
            a, b = rng.randint(1, 9), rng.randint(2, 9)
            texts.append(f"\\boxed{{\\dfrac{{{a}}}{{{b}}}}}")
            golds.append(f"\\frac{{{a}}}{{{b}}}")
        elif kind == 2:
            texts.append(f"\\boxed{{{rng.randint(1, 5)}\\sqrt{{2}}}}")
            golds.append(f"{rng.randint(1, 5)}\\sqrt{{2}}")
        else:
            texts.append("<think>long reasoning" + " step" * 200 + "</think> \\boxed{(1, 2)}")
            golds.append("(1,2)")
    start = time.monotonic()
    scores = reward.score_batch(texts, golds, threads=4)
    seconds = time.monotonic() - start
    return {"worst_is_equiv_s": round(worst, 3), "worst_case": worst_case, "hostile_cases": len(HOSTILE) * 3,
            "batch": len(texts), "batch_s": round(seconds, 2), "completions_per_s": round(len(texts) / seconds),
            "mean_reward": sum(scores) / len(scores)}


# ---- report ----------------------------------------------------------------------------------

# Why ours disagrees with a label: the convention of reward.py's docstring that explains it.
DECIMAL_COMMA = "a comma in a gold is a list or thousands separator (OlympiadBench golds such as 1,3 are lists)"
EXPLAINED = {
    "test_number_extraction:71": DECIMAL_COMMA, "test_number_extraction:87": DECIMAL_COMMA,
    "test_number_extraction:72": "a prediction that is neither math nor prose (one word, a lone $) is read as "
                                 "it is, not searched for a number",
    "test_complex_math_expressions:586": "a decimal stands for an exact value only with at least 5 significant "
                                         "digits (0.33 for 1/3; the label uses 2-digit rounding)",
    "test_math_extraction_additional_cases:754": "an ordered pair (1,3) is not the set {1,3}",
    "test_set_rel_assymetry:907": "the issue's table makes -2 <= x <= 7 and x in [-2,7] equal both ways; "
                                  "math-verify labels this row 0 only when allow_set_relation_comp is off and "
                                  "labels the same pair 1 when it is on",
    "test_boxed:8": "boxes are joined only by commas, spacing or a short phrase with 'and' or 'or' "
                    "(here '++++++'; the label of test_open_thoughts:154 rejects 'no no no no no')",
    "test_numina_cases:24": "an absolute-value inequality (1 <= |z| <= 3/2) is not solved into a union",
    "test_numina_cases:54": "assignments separated by ';' (p=5,q=2;p=7,q=2) are not read as tuples: the "
                            "order of the names would be a guess",
    "test_numina_cases:121": "'W(x)=1orW(x)=-1' without spaces is not split on 'or' (it would split words)",
    "test_strict_variable_comparison:8": "variables are not renamed: f(x) is not f(y) (math-verify's strict=False)",
    "test_string_extraction:20": "\\sum is not evaluated or compared as a sum",
    "test_string_extraction:28": "the label is wrong: 1 - 1/e is not 1 + 1/e",
}
# Why a Minerva reference solution scores 0 against its gold (checked one by one against the problems).
EARLIER = ("the gold answers Subproblem 0, whose solution the problem text quotes; the reference solution "
           "answers the final sub-question, whose answer the data does not hold")
MINERVA_EXPLAINED = {i: EARLIER for i in (41, 55, 60, 71, 80, 84, 94, 96, 100, 104, 106, 122, 127, 128, 131,
                                          138, 142, 152, 153, 163, 165, 202, 215, 218, 219, 222, 229, 236,
                                          238, 251, 258, 266)}
MINERVA_EXPLAINED.update({
    129: "the solution is wrong: 4/(s^2(s^2+4)) = 1/s^2 - 1/(s^2+4) gives t - sin(2t)/2, it boxes t + sin(2t)/2",
    156: "two values: 0.529/2 = 0.2645, the gold rounds to 0.265 and the solution to 0.264",
    158: "the solution boxes the mantissa 4.4677 of the gold 4.4677 x 10^14 Hz",
    168: "the solution boxes 0.822 for the gold 8.224 x 10^-19 J (no power of ten)",
    170: "the solution is wrong: the coefficient of CO in 2CO + O2 -> 2CO2 is 2, it boxes 1",
    193: "the solution boxes the lattice constant 361 pm; the gold is 353 pm",
    253: "the last box is an intermediate value (erfc(0.20) = 0.7773); the gold 6.43 x 10^16 is unboxed",
})

def markdown(result: dict) -> str:
    lines = ["# The verifier against Math-Verify's own labelled cases and the benchmark files", "",
             f"Machine: {result['machine']}, Python {result['python']}; `python bench/bench_reward.py`.", "",
             "Ours scores the last \\boxed{} of each side where it has one, else the side as it is; "
             "math-verify scores the raw pair with the settings its own test passes (its suite, so its "
             "figure is by construction). Timings on a shared machine under load from other work.", "",
             "| verifier | agrees with the label | wrong accepts | wrong rejects | slowest call |",
             "| --- | --- | --- | --- | --- |"]
    for side, r in result["agreement"].items():
        lines.append(f"| {side} | {r['agree']}/{r['cases']} ({100 * r['agree'] / r['cases']:.1f}%) | "
                     f"{r['wrong_accepts']} | {r['wrong_rejects']} | {r['slowest_call_s']} s ({r['slowest_case']}) |")
    ours = result["agreement"]["ours"]
    lines += ["", "Every disagreement of ours with a label, and the convention that explains it:", "",
              "| test:line | label | gold (end) | prediction (end) | convention |", "| --- | --- | --- | --- | --- |"]
    for d in ours["disagreements"]:
        cells = [d["gold"][-50:], d["prediction"][-50:]]
        cells = [c.replace("|", "\\|").replace("\n", " ") for c in cells]
        lines.append(f"| {d['where']} | {d['label']} | `{cells[0]}` | `{cells[1]}` | "
                     f"{EXPLAINED.get(d['where'], 'not explained yet')} |")
    b = result["benchmarks"]
    lines += ["", f"Benchmark golds against themselves: {b['golds_scoring_1_against_themselves']}; AIME reference "
              f"solutions: {b['aime_reference_solutions_scoring_1']}; Minerva reference solutions: "
              f"{b['minerva_reference_solutions_scoring_1']}.", "",
              "Minerva reference solutions that score 0 (gold, the solution's last box, and why). "
              f"{sum(r == EARLIER for r in MINERVA_EXPLAINED.values())} answer another sub-question than "
              f"their gold and {sum(r != EARLIER for r in MINERVA_EXPLAINED.values())} disagree with it in "
              "value or form, so the issue's target of 260 cannot be met without accepting wrong answers; "
              "every solution whose last box states its gold's answer to the same question scores 1:", ""]
    lines += [f"- {f['index']}: `{str(f['answer'][0]).strip()}` vs `{f['boxed']}`: "
              f"{MINERVA_EXPLAINED.get(f['index'], 'not explained yet')}" for f in b["minerva_failures"]]
    lines += [""]
    if "speed" in result:
        s = result["speed"]
        lines += [f"Worst is_equiv over {s['hostile_cases']} hostile inputs: {s['worst_is_equiv_s']} s; "
                  f"score_batch: {s['completions_per_s']} completions/s.", ""]
    return "\n".join(lines) + "\n"


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--extract-math-verify", metavar="GIT_DIR")
    parser.add_argument("--copy-benchmarks", metavar="DIR")
    parser.add_argument("--skip-math-verify", action="store_true")
    parser.add_argument("--skip-speed", action="store_true")
    args = parser.parse_args()
    if args.extract_math_verify or args.copy_benchmarks:
        if args.extract_math_verify:
            extract_math_verify_cases(args.extract_math_verify)
        if args.copy_benchmarks:
            copy_benchmarks(args.copy_benchmarks)
        return
    use_math_verify = not args.skip_math_verify
    if use_math_verify:
        try:
            import math_verify  # noqa: F401
        except ImportError:
            print("math-verify is not installed (pip install math-verify): ours only")
            use_math_verify = False
    reward.start_workers(2)
    result = {"machine": f"{platform.machine()} {os.cpu_count()} cores", "python": platform.python_version(),
              "agreement": agreement(use_math_verify), "benchmarks": benchmarks()}
    if not args.skip_speed:
        result["speed"] = speed()
    save_result("reward.json", result)
    with open(os.path.join(RESULTS, "reward.md"), "w") as f:
        f.write(markdown(result))
    for side, r in result["agreement"].items():
        print(f"{side}: {r['agree']}/{r['cases']} agree, {r['wrong_accepts']} wrong accepts, "
              f"slowest {r['slowest_call_s']} s")
    print(json.dumps({k: v for k, v in result["benchmarks"].items() if not k.endswith("failures")}))


if __name__ == "__main__":
    main()
