"""The manifest's hash: whole-file sha256 for small files, evenly spaced samples for large ones (the
weights, optimizer states), which still catch a zeroed, cut or swapped file of the same size."""
import hashlib
import os

import checkpoint


def test_small_files_whole_and_large_files_by_samples(tmp_path, monkeypatch):
    monkeypatch.setattr(checkpoint, "WHOLE_FILE_LIMIT", 1 << 20)
    monkeypatch.setattr(checkpoint, "SAMPLES", 64)
    monkeypatch.setattr(checkpoint, "SAMPLE_BYTES", 4096)
    small = tmp_path / "small"
    small.write_bytes(os.urandom(1 << 20))
    assert checkpoint.sha256(str(small)) == hashlib.sha256(small.read_bytes()).hexdigest()
    big = tmp_path / "big"
    content = bytearray(os.urandom(4 << 20))
    big.write_bytes(content)
    first = checkpoint.sha256(str(big))
    assert first.startswith("sampled:") and checkpoint.sha256(str(big)) == first
    changed = []
    for k in (0, 31, 63):  # a block zeroed where sample k lies (the first, one inside, the last)
        offset = (len(content) - 4096) * k // 63
        damaged = bytearray(content)
        damaged[offset:offset + 4096] = bytes(4096)
        big.write_bytes(damaged)
        changed.append(checkpoint.sha256(str(big)) != first)
    big.write_bytes(bytes(len(content)))  # zeroed, the right size
    changed.append(checkpoint.sha256(str(big)) != first)
    big.write_bytes(os.urandom(len(content)))  # another file of the same size
    changed.append(checkpoint.sha256(str(big)) != first)
    assert all(changed), changed
