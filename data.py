"""Problems in, token ids out: problem files, chat templates, FastCuRL's length split, a sampler.

  python data.py split FILE --out DIR [--template r1]   # FastCuRL: L1 (short), L2 (all), L3 (long)

The toy task's files are made by assets/toy/make_toy.py.
"""
from __future__ import annotations

import argparse
import json
import os
from dataclasses import dataclass

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
TOY_MODEL = os.path.join(HERE, "assets", "toy", "model")      # the embedded toy: checkpoint,
TOY_DATA = os.path.join(HERE, "assets", "toy", "train.jsonl")  # training problems
TOY_EVAL = os.path.join(HERE, "assets", "toy", "eval.jsonl")   # and held-out problems
# the paper's five test sets and two training sets, shipped as DeepScaleR published them
# (assets/benchmarks/README.md), by the names every problem-file flag takes
NAMED_SETS = {"aime24": "aime.json", "amc23": "amc.json", "math500": "math.json",
              "minerva": "minerva.json", "olympiadbench": "olympiad_bench.json",
              "math-train": "train_math.json", "aime-train": "train_aime.json"}
PAPER_BENCHMARKS = ["aime24", "amc23", "math500", "minerva", "olympiadbench"]
R1_SUFFIX = " Let's think step by step and output the final answer within \\boxed{}."
QWEN_SYSTEM = "Please reason step by step, and put your final answer within \\boxed{}."
# the special tokens each prompt format is written with
MARKERS = {"r1": ("<｜begin▁of▁sentence｜>", "<｜User｜>", "<｜Assistant｜>", "<think>"),
           "qwen": ("<|im_start|>", "<|im_end|>"), "toy": ()}


@dataclass
class Problem:
    problem: str
    answer: str | list[str]  # a list = any of these is accepted
    source: str = ""          # "file:line", for messages
    record: dict | None = None  # the row as read, every field (data.py split writes it back)


def _answer(v, where):
    if isinstance(v, str) and v.strip():
        return v
    if isinstance(v, (int, float)) and not isinstance(v, bool):
        return str(int(v) if isinstance(v, float) and v.is_integer() else v)  # 142.0 -> "142"
    if isinstance(v, (list, tuple)) and v:
        return [_answer(x, where) for x in v]
    if isinstance(v, str):
        raise ValueError(f"{where}: field 'answer' is empty or blank")
    kinds = "a list" if isinstance(v, bool) or v is None else "a non-empty list"
    raise ValueError(f"{where}: field 'answer' must be a string, a number or {kinds}, got {v!r}")


def _row(row, where) -> Problem:
    """One record: {problem, answer} (DeepScaleR) or {prompt: [messages], reward_model:
    {ground_truth}} (verl)."""
    if not isinstance(row, dict):
        raise ValueError(f"{where}: expected an object with 'problem' and 'answer', "
                         f"got {type(row).__name__}")
    if "problem" in row or "answer" in row:
        for field in ("problem", "answer"):
            if field not in row:
                raise ValueError(f"{where}: missing field '{field}'")
        if not isinstance(row["problem"], str) or not row["problem"].strip():
            raise ValueError(f"{where}: field 'problem' must be a non-empty string")
        return Problem(row["problem"], _answer(row["answer"], where), where, row)
    if "prompt" in row and "reward_model" in row:
        msgs = row["prompt"]
        users = [m.get("content") for m in (msgs if hasattr(msgs, "__iter__") else [])
                 if isinstance(m, dict) and m.get("role") == "user"]
        if not users or not isinstance(users[-1], str):
            raise ValueError(f"{where}: field 'prompt' has no user message")
        rm = row["reward_model"]
        if not isinstance(rm, dict) or "ground_truth" not in rm:
            raise ValueError(f"{where}: missing field 'reward_model.ground_truth'")
        text = users[-1].removesuffix(R1_SUFFIX)  # verl files carry the instruction already
        return Problem(text, _answer(rm["ground_truth"], where), where, row)
    raise ValueError(f"{where}: missing field 'problem' (or verl's 'prompt' + 'reward_model')")


def problem_file(name: str) -> str:
    """A problem file's path: a bundled set's name (NAMED_SETS), else the path as given."""
    if name in NAMED_SETS:
        return os.path.join(HERE, "assets", "benchmarks", NAMED_SETS[name])
    return name


def load_problems(path: str) -> list[Problem]:
    """Load a JSON, JSONL or parquet problem file; a bad record stops it with file, line, field."""
    if not os.path.exists(path):
        raise FileNotFoundError(f"{path}: no such problem file")
    if not os.path.isfile(path):  # a folder; a FIFO, whose open would wait for a writer
        raise ValueError(f"{path}: not a regular file")
    if path.endswith(".parquet"):
        try:
            import pyarrow.parquet as pq
        except ImportError:
            raise ImportError(f"{path}: parquet needs pyarrow (pip install pyarrow)") from None
        out = [_row(r, f"{path}:row {i}") for i, r in enumerate(pq.read_table(path).to_pylist(), 1)]
    else:
        with open(path, "rb") as f:
            raw = f.read()
        try:
            text = raw.decode("utf-8")
        except UnicodeDecodeError as e:
            line = raw[:e.start].count(b"\n") + 1
            raise ValueError(f"{path}:{line}: bytes that are not UTF-8 ({e.reason})") from None
        if text.lstrip().startswith("["):  # one JSON list
            out = [_row(r, f"{path}:item {i + 1}") for i, r in enumerate(_json(text, path, 1))]
        elif _spread_object(text):
            raise ValueError(f"{path}: one JSON object over several lines, where a JSON list of "
                             "problems or JSON lines (one problem per line) is expected")
        else:  # JSON lines
            out = [_row(_json(line, path, i + 1), f"{path}:{i + 1}")
                   for i, line in enumerate(text.splitlines()) if line.strip()]
    if not out:
        raise ValueError(f"{path}: no problems in the file")
    return out


def _spread_object(text: str) -> bool:
    """Whether text is one JSON object written over several lines (pretty-printed)."""
    try:
        return "\n" in text.strip() and isinstance(json.loads(text), dict)
    except ValueError:
        return False


def _json(text: str, path: str, line: int):
    """json.loads(text), text starting at line `line` of `path`: errors name the file and line."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as e:
        raise ValueError(f"{path}:{line + e.lineno - 1}: invalid JSON ({e.msg})") from None


def write_jsonl(path: str, problems: list[Problem]):
    rows = (p.record or {"problem": p.problem, "answer": p.answer} for p in problems)
    with open(path + ".tmp", "w") as f:  # a crash leaves the old file or the new one, whole
        f.writelines(json.dumps(row, default=str) + "\n" for row in rows)
    os.replace(path + ".tmp", path)


def user_turn(problem: str, template: str) -> str:
    """The text of the user's turn, whose length FastCuRL's split is measured on."""
    return problem + R1_SUFFIX if template == "r1" else problem


def format_prompt(problem: str, template: str) -> str:
    if template == "r1":  # DeepSeek-R1-Distill: generation opens the think block
        return f"<｜begin▁of▁sentence｜><｜User｜>{user_turn(problem, 'r1')}<｜Assistant｜><think>\n"
    if template == "qwen":
        return (f"<|im_start|>system\n{QWEN_SYSTEM}<|im_end|>\n"
                f"<|im_start|>user\n{problem}<|im_end|>\n"
                f"<|im_start|>assistant\n")
    if template == "toy":
        return f"{problem}="
    raise ValueError(f"unknown template {template!r} (r1, qwen or toy)")


def check_template(tok, template: str, model_dir: str):
    """Every marker of the prompt format must be one token of the model's vocabulary: a marker
    spelled out in ordinary tokens is text to the model, not a turn of its chat format."""
    for marker in MARKERS[template]:
        if len(pieces := tok.encode(marker)) != 1:
            raise ValueError(f"{model_dir}: its tokenizer splits {marker} into {len(pieces)} "
                             f"tokens: the model is not made for the {template} prompt format "
                             f"(--template r1, qwen or toy)")


class Tokenizer:
    """tokenizer.json via `tokenizers`; EOS ids from generation_config.json, else config.json."""

    def __init__(self, path: str):
        from tokenizers import Tokenizer as HFTokenizer

        fn = os.path.join(path, "tokenizer.json")
        if not os.path.exists(fn):
            raise FileNotFoundError(f"{path}: no tokenizer.json")
        try:
            self.tok = HFTokenizer.from_file(fn)
        except Exception as e:  # tokenizers raises a plain Exception for any damage
            raise ValueError(f"{fn}: not a readable tokenizer: {str(e).splitlines()[0]}") from None
        eos = None
        for file in (os.path.join(path, n) for n in ("generation_config.json", "config.json")):
            if eos is None and os.path.exists(file):
                try:
                    with open(file, "rb") as f:
                        eos = json.loads(f.read()).get("eos_token_id")
                except (ValueError, AttributeError):  # bad JSON or UTF-8; not an object
                    raise ValueError(f"{file}: not a JSON object") from None
        self.eos_ids = [] if eos is None else [eos] if isinstance(eos, int) else list(eos)
        vocab = self.tok.get_vocab()
        pads = [vocab[t] for t in ("<pad>", "<|endoftext|>", "<｜end▁of▁sentence｜>") if t in vocab]
        self.pad_id = (pads + self.eos_ids + [0])[0]  # a pad token, else the first EOS, else 0
        unk = getattr(self.tok.model, "unk_token", None)  # byte-level vocabularies have none
        self.unk_id = self.tok.token_to_id(unk) if unk else None
        self.template = ("r1" if "<｜Assistant｜>" in vocab else "qwen" if "<|im_start|>" in vocab
                         else "toy" if "\\boxed{" in vocab else "qwen")

    def encode(self, text: str) -> list[int]:
        return self.tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        return self.tok.decode(list(ids), skip_special_tokens=True)


def encode_problems(problems: list[Problem], tok: Tokenizer, template: str, max_prompt_len: int):
    """-> (list of (prompt ids, answer), number dropped for exceeding max_prompt_len). A character
    the vocabulary cannot write (the toy's unknown token) is an error naming the problem's line."""
    out = []
    for p in problems:
        ids = tok.encode(format_prompt(p.problem, template))
        if tok.unk_id is not None and tok.unk_id in ids:
            bad = sorted({ch for ch in p.problem if tok.unk_id in tok.encode(ch)})
            raise ValueError(f"{p.source or 'a problem'}: characters outside the model's "
                             f"vocabulary: {''.join(bad)!r}")
        if len(ids) <= max_prompt_len:
            out.append((ids, p.answer))
    return out, len(problems) - len(out)


def split_by_length(problems: list[Problem], template: str = "r1"):
    """Cut at the mean user-turn length m (characters): L1 = len <= m, L3 = len > m, L2 = all."""
    lens = [len(user_turn(p.problem, template)) for p in problems]
    mean = sum(lens) / len(lens)
    return {"L1": [p for p, n in zip(problems, lens) if n <= mean], "L2": list(problems),
            "L3": [p for p, n in zip(problems, lens) if n > mean]}, mean, lens


def histogram(lens: list[int], bins: int = 12, width: int = 40) -> str:
    lo, hi = min(lens), max(lens)
    step = max(1, -(-(hi - lo + 1) // bins))
    bin_of = [min((n - lo) // step, bins - 1) for n in lens]
    counts = [bin_of.count(b) for b in range(bins)]
    top = max(counts)
    return "\n".join(f"{lo + i * step:6d}-{lo + (i + 1) * step - 1:<6d} {c:7d} "
                     f"{'#' * round(width * c / top)}" for i, c in enumerate(counts))


class Sampler:
    """Global batches of prompt indices, reshuffled each epoch from (seed, epoch); rank r takes rows
    r::world. state() / load_state() carry (epoch, pos) through checkpoints: a resumed run draws the
    same batches."""

    def __init__(self, n: int, batch_size: int, rank: int = 0, world: int = 1, seed: int = 0):
        if batch_size % world:
            raise ValueError(f"batch size {batch_size} is not divisible by the world size {world}")
        if n < batch_size:
            raise ValueError(f"{n} prompts cannot fill a batch of {batch_size}")
        self.n, self.bs, self.rank, self.world, self.seed = n, batch_size, rank, world, seed
        self.load_state({"epoch": 0, "pos": 0})

    def next(self) -> list[int]:
        if self.pos + self.bs > self.n:  # drop the ragged tail, start a new epoch
            self.load_state({"epoch": self.epoch + 1, "pos": 0})
        batch = self.perm[self.pos:self.pos + self.bs]
        self.pos += self.bs
        return batch[self.rank::self.world]

    def state(self) -> dict:
        return {"epoch": self.epoch, "pos": self.pos}

    def load_state(self, s: dict):
        self.epoch, self.pos = s["epoch"], s["pos"]
        g = torch.Generator(device="cpu").manual_seed(self.seed * 1_000_003 + self.epoch)
        self.perm = torch.randperm(self.n, generator=g, device="cpu").tolist()


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__,
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    split = sub.add_parser("split", help="cut a problem file at the mean prompt length: L1/L2/L3")
    split.add_argument("file")
    split.add_argument("--out", required=True)
    split.add_argument("--template", default="r1", choices=["r1", "qwen", "toy"])
    a = ap.parse_args(argv)
    try:
        probs = load_problems(problem_file(a.file))
        try:
            os.makedirs(a.out, exist_ok=True)
        except OSError as e:  # a file at --out or above it, no permission
            raise ValueError(f"--out {a.out}: cannot be made a folder ({e.strerror})") from None
    except (ValueError, OSError, ImportError) as e:
        raise SystemExit(f"[fastcurl] {e}")
    sets, mean, lens = split_by_length(probs, a.template)
    print(f"{a.file}: {len(probs)} problems, mean user-turn length {mean:.1f} characters")
    print(histogram(lens))
    for name, ps in sets.items():
        write_jsonl(os.path.join(a.out, f"{name}.jsonl"), ps)
        print(f"{name}: {len(ps)} problems -> {os.path.join(a.out, name + '.jsonl')}")


if __name__ == "__main__":
    main()
