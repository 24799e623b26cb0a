"""A damaged model folder (tensors, shapes, dtypes, config.json keys and types, the shard index, the
tokenizer) stops the plan with one line naming the file, before anything is written under --out; the
CLI exits non-zero with that line and no traceback, and the command runs once the folder is fixed."""
import json
import os
import shutil
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file, save_file

import data
import grpo

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
QUICK = ["--steps", "1", "--batch", "4", "--n-samples", "2", "--eval-k", "0", "--rollout", "torch",
         "--device", "cpu"]
EMBED = "model.embed_tokens.weight"
UP = "model.layers.1.mlp.up_proj.weight"


def edit_config(folder, **changes):
    """Set (or with None, delete) config.json fields."""
    cfg = json.loads((folder / "config.json").read_text())
    for k, v in changes.items():
        if v is None:
            del cfg[k]
        else:
            cfg[k] = v
    (folder / "config.json").write_text(json.dumps(cfg))


def edit_tensors(folder, change):
    """Rewrite model.safetensors with change(tensors) applied."""
    tensors = load_file(folder / "model.safetensors")
    change(tensors)
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})


def edit_header(folder, change):
    """Rewrite model.safetensors' JSON header with change(header) applied, the bytes kept."""
    raw = (folder / "model.safetensors").read_bytes()
    n = int.from_bytes(raw[:8], "little")
    header = json.loads(raw[8:8 + n])
    change(header)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    (folder / "model.safetensors").write_bytes(len(text).to_bytes(8, "little") + text + raw[8 + n:])


def write_index(folder, index):
    (folder / "model.safetensors.index.json").write_text(json.dumps(index))


def all_in_one_shard(folder):
    names = load_file(folder / "model.safetensors").keys()
    write_index(folder, {"metadata": {}, "weight_map": dict.fromkeys(names, "model.safetensors")})


# (name, damage(folder), the file named, words in the line)
CASES = [
    ("missing tensor", lambda m: edit_tensors(m, lambda t: t.pop(UP)),
     "model.safetensors", ["lacks 1 tensor(s)", UP]),
    ("wrong shape", lambda m: edit_tensors(m, lambda t: t.__setitem__(UP, t[UP][:, :128].clone())),
     "model.safetensors", [UP, "has shape (640, 128), config.json implies (640, 256)"]),
    ("extra tensor", lambda m: edit_tensors(m, lambda t: t.__setitem__("model.extra", torch.ones(2))),
     "model.safetensors", ["unexpected tensor 'model.extra'"]),
    ("integer tensor", lambda m: edit_tensors(m, lambda t: t.__setitem__(UP, t[UP].to(torch.int8))),
     "model.safetensors", [UP, "dtype 'I8'"]),
    ("header shape", lambda m: edit_header(m, lambda h: h[UP].__setitem__("shape", [640, 255])),
     "model.safetensors", ["damaged", UP]),
    ("missing key", lambda m: edit_config(m, hidden_size=None),
     "config.json", ["missing field(s) hidden_size"]),
    ("string for a number", lambda m: edit_config(m, hidden_size="256"),
     "config.json", ["hidden_size is '256', expected int"]),
    ("string for a float", lambda m: edit_config(m, rms_norm_eps="1e-6"),
     "config.json", ["rms_norm_eps is '1e-6', expected float"]),
    ("string for a boolean", lambda m: edit_config(m, tie_word_embeddings="false"),
     "config.json", ["tie_word_embeddings is 'false', expected bool"]),
    ("string for an EOS id", lambda m: edit_config(m, eos_token_id="</s>"),
     "config.json", ["eos_token_id is '</s>', expected int | list[int]"]),
    ("zero heads", lambda m: edit_config(m, num_attention_heads=0),
     "config.json", ["num_attention_heads is 0, expected at least 1"]),
    ("heads not a multiple", lambda m: edit_config(m, num_key_value_heads=3),
     "config.json", ["num_attention_heads 4 is not a multiple of num_key_value_heads 3"]),
    ("odd head_dim", lambda m: edit_config(m, head_dim=63),
     "config.json", ["head_dim 63", "must be even"]),
    ("rope scaling a string", lambda m: edit_config(m, rope_scaling="yarn"),
     "config.json", ["rope scaling yarn is not supported"]),
    ("config a list", lambda m: (m / "config.json").write_text("[1, 2]"),
     "config.json", ["not a JSON object"]),
    ("config not UTF-8", lambda m: (m / "config.json").write_bytes(b'{"model_type": "\xff"}'),
     "config.json", ["not UTF-8 text"]),
    ("index without weight_map", lambda m: write_index(m, {"metadata": {}}),
     "model.safetensors.index.json", ["weight_map"]),
    ("index weight_map a list", lambda m: write_index(m, {"weight_map": ["model.safetensors"]}),
     "model.safetensors.index.json", ["weight_map"]),
    ("index naming a missing file", lambda m: write_index(m, {"weight_map": {EMBED: "gone.safetensors"}}),
     "gone.safetensors", ["missing (named by model.safetensors.index.json)"]),
    pytest.param("malformed tokenizer.json",
                 lambda m: (m / "tokenizer.json").write_text('{"model": {"type": "BPE"'),
                 "tokenizer.json", ["not a readable tokenizer"]),
    pytest.param("malformed generation_config.json",
                 lambda m: (m / "generation_config.json").write_text('{"eos_token_id": '),
                 "generation_config.json", ["not a JSON object"]),
]


def damaged(tmp_path, damage):
    folder = tmp_path / "model"
    shutil.copytree(data.TOY_MODEL, folder)
    damage(folder)
    return folder


def plan_of(*argv):
    options, stage_flags = grpo.parse_args(list(argv))
    return grpo.make_plan(options, stage_flags, rank=0, world=1, device=torch.device("cpu"))


@pytest.mark.parametrize("name,damage,file,words", CASES, ids=[
    c.values[0] if hasattr(c, "values") else c[0] for c in CASES])
def test_a_damaged_model_folder_stops_the_plan_with_one_line(tmp_path, name, damage, file, words):
    model, out = damaged(tmp_path, damage), tmp_path / "out"
    with pytest.raises(SystemExit) as e:
        plan_of("--model", str(model), "--out", str(out), *QUICK)
    line = str(e.value.code)
    assert "\n" not in line and line.startswith("[fastcurl] "), line
    assert os.path.join(str(model), file) in line, line
    for w in words:
        assert w in line, (w, line)
    assert not out.exists()


def test_a_sharded_folder_whose_index_names_every_tensor_plans(tmp_path):
    model = damaged(tmp_path, all_in_one_shard)
    assert plan_of("--model", str(model), "--out", str(tmp_path / "out"), *QUICK).stages


def run_grpo(*args):
    return subprocess.run([sys.executable, os.path.join(ROOT, "grpo.py"), *args, *QUICK], cwd=ROOT,
                          capture_output=True, text=True, timeout=600,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))


@pytest.mark.slow
def test_the_cli_says_one_line_then_the_fixed_folder_runs(tmp_path):
    out = tmp_path / "out"
    model = tmp_path / "model"
    shutil.copytree(data.TOY_MODEL, model)
    for damage, needle in [(lambda: edit_tensors(model, lambda t: t.pop(UP)), "lacks 1 tensor(s)"),
                           (lambda: edit_config(model, hidden_size="256"), "hidden_size is '256'")]:
        damage()
        r = run_grpo("--model", str(model), "--out", str(out))
        assert r.returncode == 1 and "Traceback" not in r.stderr, r.stderr[-3000:]
        assert r.stderr.strip().count("\n") == 0 and needle in r.stderr, r.stderr
        assert str(model) in r.stderr and not out.exists()
        shutil.rmtree(model)
        shutil.copytree(data.TOY_MODEL, model)
    r = run_grpo("--model", str(model), "--out", str(out))
    assert r.returncode == 0, r.stderr[-3000:]
    assert json.loads(open(out / "stage1" / "metrics.jsonl").readline())["step"] == 1
