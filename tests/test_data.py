"""Problem files, bad input, FastCuRL's split, the sampler, the toy task and tokenizer."""
import json
import os
import random
import subprocess
import sys

import pytest

import data
from reward import math_reward

sys.path.insert(0, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "assets", "toy"))
import make_toy  # noqa: E402

ROOT = data.os.path.dirname(data.os.path.abspath(data.__file__))


def write(path, text):
    path.write_text(text) if isinstance(text, str) else path.write_bytes(text)
    return str(path)


def test_formats_and_answers(tmp_path):
    rows = [{"problem": "1+1?", "answer": "2"}, {"problem": "p", "answer": 142.0}, {"problem": "q", "answer": [1, "x"]},
            {"problem": "r", "answer": 0.5}]
    js = write(tmp_path / "a.json", json.dumps(rows))
    jl = write(tmp_path / "a.jsonl", "\n".join(json.dumps(r) for r in rows) + "\n\n")
    for f in (js, jl):
        ps = data.load_problems(f)
        assert [p.answer for p in ps] == ["2", "142", ["1", "x"], "0.5"]
        assert ps[0].problem == "1+1?"


def test_parquet_deepscaler_and_verl(tmp_path):
    pa = pytest.importorskip("pyarrow")
    import pyarrow.parquet as pq
    pq.write_table(pa.Table.from_pylist([{"problem": "a", "answer": "1"}]), tmp_path / "d.parquet")
    assert data.load_problems(str(tmp_path / "d.parquet"))[0].answer == "1"
    verl = [{"data_source": "x", "prompt": [{"role": "user", "content": "What is 2+2?" + data.R1_SUFFIX}],
             "reward_model": {"style": "rule", "ground_truth": "4"}},
            {"data_source": "x", "prompt": [{"role": "user", "content": "Name it."}],
             "reward_model": {"style": "rule", "ground_truth": "b"}}]
    pq.write_table(pa.Table.from_pylist(verl), tmp_path / "v.parquet")
    ps = data.load_problems(str(tmp_path / "v.parquet"))
    assert ps[0].problem == "What is 2+2?" and ps[0].answer == "4"  # the instruction is not doubled
    assert ps[1].answer == "b"
    listed = [{"prompt": [{"role": "user", "content": "Name them."}], "reward_model": {"ground_truth": ["a", "b"]}}]
    pq.write_table(pa.Table.from_pylist(listed), tmp_path / "l.parquet")
    assert data.load_problems(str(tmp_path / "l.parquet"))[0].answer == ["a", "b"]


@pytest.mark.parametrize("content,msg", [
    ('{"problem": "a", "answer": "1"}\n{"problem": "b", "answer": \n', r"x.jsonl:2: invalid JSON"),
    ('{"problem": "a", "answer": "1"}\n{"problem": "b"}\n', r"x.jsonl:2: missing field 'answer'"),
    ('{"question": "a", "answer": "1"}\n', r"x.jsonl:1: missing field 'problem'"),
    ('{"problem": "a", "answer": null}\n', r"x.jsonl:1: field 'answer'"),
    ('{"problem": "", "answer": "1"}\n', r"x.jsonl:1: field 'problem' must be a non-empty string"),
    ("\n\n", r"x.jsonl: no problems"),
    (b'{"problem": "a", "answer": "1"}\n{"problem": "\xff\xfe", "answer": "1"}\n', r"x.jsonl:2: bytes that are not UTF-8"),
])
def test_bad_input_names_file_line_field(tmp_path, content, msg):
    f = write(tmp_path / "x.jsonl", content)
    with pytest.raises(ValueError, match=msg):
        data.load_problems(f)


def test_bad_json_list_item(tmp_path):
    f = write(tmp_path / "x.json", json.dumps([{"problem": "a", "answer": "1"}, {"problem": "b"}]))
    with pytest.raises(ValueError, match=r"x.json:item 2: missing field 'answer'"):
        data.load_problems(f)


def test_split_known_distribution(tmp_path):
    """300 problems of user-turn length 10, 100 of 30, 100 of 50: mean 22 -> 300 short, 200 long."""
    rows = [{"problem": "x" * n, "answer": "1"} for n in [10] * 300 + [30] * 100 + [50] * 100]
    random.Random(0).shuffle(rows)
    f = write(tmp_path / "p.jsonl", "\n".join(map(json.dumps, rows)))
    sets, mean, _ = data.split_by_length(data.load_problems(f), "toy")
    assert mean == 22 and len(sets["L1"]) == 300 and len(sets["L3"]) == 200 and len(sets["L2"]) == 500
    out = subprocess.run([sys.executable, f"{ROOT}/data.py", "split", f, "--out", str(tmp_path / "s"),
                          "--template", "toy"], capture_output=True, text=True, check=True).stdout
    assert "mean user-turn length 22.0" in out and "L1: 300" in out and "L3: 200" in out
    assert len((tmp_path / "s" / "L3.jsonl").read_text().splitlines()) == 200
    # with the R1 instruction appended every length shifts equally: the same cut
    sets_r1, mean_r1, _ = data.split_by_length(data.load_problems(f), "r1")
    assert mean_r1 == 22 + len(data.R1_SUFFIX) and len(sets_r1["L1"]) == 300


def test_split_keeps_every_field_of_a_row(tmp_path):
    rows = [{"problem": "x" * n, "answer": 142.0, "solution": f"s{n}", "level": n} for n in range(1, 9)]
    f = write(tmp_path / "p.json", json.dumps(rows))
    data.main(["split", f, "--out", str(tmp_path / "s"), "--template", "toy"])
    back = [json.loads(line) for line in (tmp_path / "s" / "L2.jsonl").read_text().splitlines()]
    assert back == rows  # the answer too, as it was written (142.0, not "142")


def test_sampler_shards_reshuffles_and_resumes():
    full = data.Sampler(10, 4, 0, 1, seed=3)
    r0, r1 = data.Sampler(10, 4, 0, 2, seed=3), data.Sampler(10, 4, 1, 2, seed=3)
    seen = []
    for _ in range(5):
        b = full.next()
        a, c = r0.next(), r1.next()
        assert sorted(a + c) == sorted(b) and not set(a) & set(c)
        seen.append(b)
    assert full.epoch == 2  # 2 batches of 4 per epoch of 10 (ragged tail dropped)
    assert seen[0] != seen[2]  # a new permutation each epoch
    st = full.state()
    nxt = [full.next() for _ in range(3)]
    again = data.Sampler(10, 4, 0, 1, seed=3)
    again.load_state(st)
    assert [again.next() for _ in range(3)] == nxt
    with pytest.raises(ValueError, match="not divisible"):
        data.Sampler(10, 3, 0, 2)


def test_toy_task_deterministic_and_graded():
    tr1, ev1 = make_toy.toy_sets(0, n_train=500, n_eval=50)
    tr2, ev2 = make_toy.toy_sets(0, n_train=500, n_eval=50)
    assert [p.problem for p in tr1] == [p.problem for p in tr2] and [p.problem for p in ev1] == [p.problem for p in ev2]
    assert not {p.problem for p in ev1} & {p.problem for p in tr1}
    rng = random.Random(0)
    for p in tr1[:100]:
        clean = make_toy.toy_trace(p.problem, rng)
        assert math_reward(clean, p.answer) == 1.0
        assert clean.count(",") == p.problem.count("+") - 1  # one step per added term
    slips = [math_reward(make_toy.toy_trace(p.problem, rng, slip_p=1.0), p.answer) for p in tr1]
    assert sum(slips) < 0.1 * len(slips)
    wordy = make_toy.toy_trace("1+2+3+4", random.Random(1), repeat_p=1.0)
    assert wordy == "1+2=3,1+2=3,3+3=6,3+3=6,6+4=10,6+4=10.\\boxed{10}"


def test_shipped_toy_files_and_tokenizer():
    tok = data.Tokenizer(f"{ROOT}/assets/toy/model")
    assert tok.template == "toy" and tok.eos_ids == [1]
    text = "3+5+2=3+5=8,8+2=10.\\boxed{10}"
    assert tok.decode(tok.encode(text)) == text
    assert len(tok.encode("\\boxed{")) == 1
    train = data.load_problems(f"{ROOT}/assets/toy/train.jsonl")
    held = data.load_problems(f"{ROOT}/assets/toy/eval.jsonl")
    assert len(train) == 20000 and len(held) == 512
    tr, ev = make_toy.toy_sets(0)
    assert [p.problem for p in ev] == [p.problem for p in held]  # the generator reproduces the shipped files
    prompts, dropped = data.encode_problems(held, tok, "toy", 12)
    assert dropped == sum(len(p.problem) + 1 > 12 for p in held) and len(prompts) + dropped == 512


@pytest.mark.slow
def test_make_toy_script_is_deterministic(tmp_path):
    """The script that built the shipped checkpoint runs, and twice gives the same bytes (a short run here;
    the shipped model is its default 1000 steps)."""
    outs = []
    for name in ("a", "b"):
        r = subprocess.run([sys.executable, f"{ROOT}/assets/toy/make_toy.py", "--out", str(tmp_path / name),
                            "--steps", "3", "--eval-k", "1"], capture_output=True, text=True, timeout=600)
        assert r.returncode == 0, r.stderr[-2000:]
        outs.append((tmp_path / name / "model" / "model.safetensors").read_bytes())
    assert outs[0] == outs[1]
    card = json.loads((tmp_path / "a" / "model" / "toy_card.json").read_text())
    assert 0 <= card["pass@1"] <= 1 and card["steps"] == 3
    assert (tmp_path / "a" / "eval.jsonl").read_text() == open(f"{ROOT}/assets/toy/eval.jsonl").read()
    assert (tmp_path / "a" / "model" / "tokenizer.json").read_text() == open(
        f"{ROOT}/assets/toy/model/tokenizer.json").read()
