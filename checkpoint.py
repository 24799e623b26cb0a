"""Crash-proof checkpoints: atomic save, manifest and checks, fallback, random states, stop flag.

<stage dir>/step<K>/: config.json, model.safetensors (in --save-dtype, the source's by default),
every tokenizer file of the source (a Hugging Face folder, read by other tools as the source is),
master/ (the same folder in the trainer's fp32 where model.safetensors is narrower: a resume
and the next stage start from it, so no update is lost to rounding), trainer_state.pt (step,
sampler, the stage's state), rank<r>.pt (each rank's optimizer state, its shards under fsdp, and
random states), manifest.json (every file's size and sha256, written last). Written into
step<K>.tmp and renamed into place, then the `latest` marker is replaced: a crash at any moment
leaves the previous checkpoint whole and findable, and a resume skips a newer one that fails its
checks.
"""
from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import os
import random
import shutil
import signal

import numpy as np
import torch
import torch.distributed as dist

from fsdp import comm_device

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "generation_config.json",
                   "special_tokens_map.json", "chat_template.jinja", "chat_template.json",
                   "added_tokens.json", "vocab.json", "merges.txt", "tokenizer.model")
MASTER = "master"

WHOLE_FILE_LIMIT = 64 << 20  # bytes: larger files are hashed by samples (digest)
SAMPLES, SAMPLE_BYTES = 1024, 64 << 10


def sha256(path: str) -> str:
    """The sha256 of a file's content, or, for a file over WHOLE_FILE_LIMIT (the weights, the
    optimizer states), of SAMPLES blocks of SAMPLE_BYTES at evenly spaced offsets, first and last
    included: a whole-file hash of a 1.5B model's 7 GB takes about as long as saving it (bench/
    README.md), the samples ~64 MB of reads. They catch a file cut short, zeroed or overwritten by
    another of the same size, not a single flipped byte between two samples."""
    h, size = hashlib.sha256(), os.path.getsize(path)
    with open(path, "rb") as f:
        if size <= WHOLE_FILE_LIMIT:
            for block in iter(lambda: f.read(1 << 24), b""):
                h.update(block)
            return h.hexdigest()
        for k in range(SAMPLES):
            f.seek((size - SAMPLE_BYTES) * k // (SAMPLES - 1))
            h.update(f.read(SAMPLE_BYTES))
    return "sampled:" + h.hexdigest()


def save_checkpoint(path: str, trainer, extra: dict, src_dir: str, rank: int = 0, keep: int = 0,
                    dtype: torch.dtype = torch.float32) -> str | None:
    """Write the checkpoint atomically (see above), its weights in `dtype`; keep the newest `keep`
    step folders (0: all) -> None, or on every rank the message of a write that found the disk
    full (step<K>.tmp removed, the checkpoints before untouched)."""
    tmp, parent, problem = path + ".tmp", os.path.dirname(path), None
    if rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
    folders, master = [(tmp, dtype)], next(trainer.model.parameters()).dtype
    if dtype not in (master, torch.float32):  # model.safetensors rounds the trainer's weights
        folders.append((os.path.join(tmp, MASTER), master))
    for folder, folder_dtype in folders:
        weights = trainer.full_state_dict()  # under fsdp: gathered unit by unit on every rank
        if rank == 0 and not problem:
            problem = full_disk(parent, lambda: write_weights(trainer, folder, weights,
                                                               folder_dtype, src_dir))
        for _ in weights:  # what was not written: the other ranks gather with this one
            pass
    if rank == 0 and not problem:
        problem = full_disk(parent, lambda: torch.save(extra, os.path.join(tmp,
                                                                           "trainer_state.pt")))
    # each rank's own view of the loop's state too: the ranks must agree on it (tests compare)
    if not (problem := on_every_rank(problem)):
        rng = {"torch": torch.get_rng_state(), "numpy": np.random.get_state(),
               "python": random.getstate()}
        problem = full_disk(parent, lambda: torch.save(
            {"rng": rng, "trainer": trainer.state_dict(), "extra": extra},
            os.path.join(tmp, f"rank{rank}.pt")))
    if not (problem := on_every_rank(problem)) and rank == 0:
        problem = full_disk(parent, lambda: publish(tmp, path, extra, keep))
    if (problem := on_every_rank(problem)) and rank == 0:
        shutil.rmtree(tmp, ignore_errors=True)
        if os.path.exists(os.path.join(parent, "latest.tmp")):
            os.remove(os.path.join(parent, "latest.tmp"))
    return problem


def write_weights(trainer, folder: str, weights, dtype: torch.dtype, src_dir: str):
    """A Hugging Face folder: the weights in dtype, the source's tokenizer files."""
    trainer.model.save_pretrained(folder, state_dict=weights, dtype=dtype)
    for fn in TOKENIZER_FILES:
        if os.path.exists(os.path.join(src_dir, fn)):
            shutil.copy(os.path.join(src_dir, fn), folder)


def publish(tmp: str, path: str, extra: dict, keep: int):
    """The written folder's manifest, then the folder renamed into place and the `latest` marker
    replaced (the folder's entries on disk too), then the step folders beyond `keep` removed."""
    umask = os.umask(0o022)  # read by setting, then set back
    os.umask(umask)
    mode = 0o666 & ~umask  # as any file the user writes (safetensors' temp files are 0600)
    manifest = {"files": {}, **{k: v for k, v in extra.items() if isinstance(v, (int, str))}}
    for fn in sorted(os.path.relpath(os.path.join(folder, name), tmp)
                     for folder, _, names in os.walk(tmp) for name in names):
        file = os.path.join(tmp, fn)
        with open(file, "rb+") as f:
            os.fsync(f.fileno())
        os.chmod(file, mode)
        manifest["files"][fn] = {"bytes": os.path.getsize(file), "sha256": sha256(file)}
    with open(os.path.join(tmp, "manifest.json"), "w") as f:
        json.dump(manifest, f, indent=1)
        f.flush()
        os.fsync(f.fileno())
    shutil.rmtree(path, ignore_errors=True)
    os.replace(tmp, path)
    parent = os.path.dirname(path)
    replace_file(os.path.join(parent, "latest"), os.path.basename(path) + "\n")
    fd = os.open(parent, os.O_RDONLY)  # the directory's entries on disk too
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    if keep:
        for old in step_dirs(parent)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)


def full_disk(folder: str, write) -> str | None:
    """write() -> None, or when the disk or the quota was full the one-line message naming the
    folder and the space left; other errors raise. An OSError says so by its errno, safetensors in
    its text; torch.save's RuntimeError says only that a write failed: then the space left tells
    (a write fails for want of space only with less than a block left)."""
    try:
        write()
        return None
    except Exception as e:
        free = shutil.disk_usage(folder).free
        reasons = [os.strerror(errno.ENOSPC), os.strerror(errno.EDQUOT)]
        if not (getattr(e, "errno", None) in (errno.ENOSPC, errno.EDQUOT) or free < 1 << 20
                or any(reason in str(e) for reason in reasons)):
            raise
        return (f"[fastcurl] {os.path.abspath(folder)}: no space left on its disk (or quota): "
                f"{free / 2 ** 20:.1f} MiB free; free some space, then rerun the same command "
                f"with --resume")


def replace_file(path: str, text: str):
    """path's new content through path.tmp, renamed into place: a crash at any moment leaves the
    old file or the new one, whole."""
    with open(path + ".tmp", "w") as f:
        f.write(text)
    os.replace(path + ".tmp", path)


def write_atomic(path: str, text: str) -> str | None:
    """replace_file -> None, or the message of a full disk (path.tmp removed, the old file kept)."""
    if problem := full_disk(os.path.dirname(path) or ".", lambda: replace_file(path, text)):
        if os.path.exists(path + ".tmp"):
            os.remove(path + ".tmp")
    return problem


def on_every_rank(problem: str | None) -> str | None:
    """The first rank's problem (None: none) on every rank, so that all ranks leave together (also
    a barrier)."""
    if not dist.is_initialized():
        return problem
    every = [None] * dist.get_world_size()
    dist.all_gather_object(every, problem)
    return next((p for p in every if p), None)


def same_architecture(c1, c2) -> bool:
    """Configs equal in everything but the stored dtype and the writer's version."""
    ignore = {"torch_dtype": "", "transformers_version": ""}
    return dataclasses.replace(c1, **ignore) == dataclasses.replace(c2, **ignore)


def weights_folder(path: str) -> str:
    """The folder a checkpoint's run continues from: its fp32 master/ where it has one."""
    master = os.path.join(path, MASTER)
    return master if os.path.isdir(master) else path


def step_dirs(stage_dir: str) -> list[str]:
    """step<K> folders, oldest first."""
    if not os.path.isdir(stage_dir):
        return []
    ds = [d for d in os.listdir(stage_dir) if d.startswith("step") and d[4:].isdigit()]
    return [os.path.join(stage_dir, d) for d in sorted(ds, key=lambda d: int(d[4:]))]


def check_checkpoint(path: str, content: bool = False) -> str | None:
    """None when complete; else what is wrong: no manifest, a missing file, a size that differs, and
    with content=True a sha256 that differs or a trainer_state.pt that does not load."""
    try:
        with open(os.path.join(path, "manifest.json")) as f:
            files = json.load(f)["files"]
    except (OSError, ValueError, KeyError):
        return "no readable manifest.json (the write never finished)"
    for fn, want in files.items():
        p = os.path.join(path, fn)
        if not os.path.exists(p):
            return f"{fn} is missing"
        if os.path.getsize(p) != want["bytes"]:
            return f"{fn} has {os.path.getsize(p)} bytes, the manifest says {want['bytes']}"
        if content and sha256(p) != want["sha256"]:
            return f"{fn}'s content differs from its sha256 in the manifest"
    if content:
        try:
            torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
        except Exception as e:  # whatever a damaged pickle raises
            return f"trainer_state.pt does not load ({type(e).__name__}: {e})"
    return None


def latest_marker(stage_dir: str) -> str | None:
    """The checkpoint the `latest` marker names (the newest written), without checking it."""
    try:
        with open(os.path.join(stage_dir, "latest")) as f:
            return os.path.join(stage_dir, f.read().strip())
    except OSError:
        return None


def latest_checkpoint(stage_dir: str, log=print) -> str | None:
    """The newest step checkpoint of a stage whose files all match the manifest's sizes and sha256;
    a damaged newer one is skipped with a warning."""
    for path in reversed(step_dirs(stage_dir)):
        if (problem := check_checkpoint(path, content=True)) is None:
            return path
        log(f"[fastcurl] warning: checkpoint {path} is damaged ({problem}); falling back to the "
            f"one before")
    return None


class StopFlag:
    """The first SIGTERM / SIGINT sets a flag: the loop finishes its step, checkpoints and exits 0
    on every rank. A second one ends the process at once (the last checkpoint stays as it was)."""

    def __init__(self):
        self.hit = False
        for sig in (signal.SIGTERM, signal.SIGINT):
            signal.signal(sig, self._set)

    def _set(self, signum, frame):
        if self.hit:  # os.write: a print could land inside another print of the main thread
            os.write(1, f"[fastcurl] second {signal.Signals(signum).name}: exiting now, without a "
                        f"checkpoint\n".encode())
            os._exit(128 + signum)
        self.hit = True

    def __call__(self) -> bool:
        flag = torch.tensor([float(self.hit)], device=comm_device())
        if dist.is_initialized():  # one rank signalled: all stop at the same step
            dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return bool(flag.item())


def restore(path: str, trainer, sampler, rank: int) -> dict:
    """Load a step checkpoint into the trainer (this rank's optimizer shards), the sampler and the
    random states -> the stage's state (curriculum.StageState as a dict)."""
    state = torch.load(os.path.join(path, "trainer_state.pt"), weights_only=False)
    mine = torch.load(os.path.join(path, f"rank{rank}.pt"), weights_only=False)
    trainer.load_state_dict(mine["trainer"])
    torch.set_rng_state(mine["rng"]["torch"])
    np.random.set_state(mine["rng"]["numpy"])
    random.setstate(mine["rng"]["python"])
    sampler.load_state(state["sampler"])
    return state["state"]
