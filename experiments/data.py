"""Byte-level text corpus for the training experiment: files -> train / held-out byte arrays -> batches.

The default corpus is the Python standard library's own source files (``sysconfig``'s "stdlib" path,
``*.py``, site-/dist-packages excluded), present offline on every machine (its content follows the
Python version). Files are listed in sorted order and each goes to the held-out set when the CRC-32 of
its relative path falls in the held-out fraction, so the split is deterministic and does not move when
other files are added. Tokens are bytes (vocabulary 256).
"""

from __future__ import annotations

import sysconfig
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

VOCAB_SIZE = 256
EXCLUDED_DIRS = frozenset({"site-packages", "dist-packages", "__pycache__", ".git"})


@dataclass(frozen=True)
class Corpus:
    """train and held_out: (n,) uint8 byte streams (files joined by newlines); source: where they came from."""

    train: np.ndarray
    held_out: np.ndarray
    source: str
    num_files: int


def stdlib_path() -> Path:
    return Path(sysconfig.get_paths()["stdlib"])


def list_files(root: Path, pattern: str) -> list[Path]:
    """Regular files under ``root`` matching ``pattern``, sorted by relative path, skipping ``EXCLUDED_DIRS``."""
    return sorted(
        (
            p
            for p in root.rglob(pattern)
            if p.is_file() and not EXCLUDED_DIRS.intersection(p.relative_to(root).parts[:-1])
        ),
        key=lambda p: p.relative_to(root).as_posix(),
    )


def is_held_out(relative: str, fraction: float) -> bool:
    return zlib.crc32(relative.encode()) % 10_000 < fraction * 10_000


def load_corpus(path: Path | None = None, held_out_fraction: float = 0.05) -> Corpus:
    """Read ``path`` (a text file or a folder of them; default: the stdlib's ``*.py``) and split it.

    Files with a NUL byte in their first 4 KiB are taken as binary and skipped. When the file split leaves
    either side empty (a single file, say), the joined stream is split at ``1 - held_out_fraction`` instead.
    """
    if not 0 < held_out_fraction < 1:
        raise ValueError(f"held_out_fraction: expected a fraction in (0, 1), got {held_out_fraction}")
    root = stdlib_path() if path is None else Path(path)
    if root.is_file():
        files, base = [root], root.parent
    elif root.is_dir():
        files, base = list_files(root, "*.py" if path is None else "*"), root
    else:
        raise FileNotFoundError(f"data: no such file or folder: {root}")
    parts: dict[bool, list[bytes]] = {False: [], True: []}
    for f in files:
        content = f.read_bytes()
        if b"\0" in content[:4096]:
            continue
        parts[is_held_out(f.relative_to(base).as_posix(), held_out_fraction)].append(content)
    num_files = len(parts[False]) + len(parts[True])
    if num_files == 0:
        raise ValueError(f"data: no text files found under {root}")
    train, held_out = (np.frombuffer(b"\n".join(parts[side]), dtype=np.uint8) for side in (False, True))
    if train.size == 0 or held_out.size == 0:
        joined = np.concatenate([train, held_out])
        cut = int(joined.size * (1 - held_out_fraction))
        train, held_out = joined[:cut], joined[cut:]
    return Corpus(train=train, held_out=held_out, source=str(root), num_files=num_files)


def _windows(data: np.ndarray, starts: np.ndarray, seq_len: int) -> np.ndarray:
    if data.size < seq_len + 1:
        raise ValueError(
            f"data: a split of {data.size} bytes is shorter than one window of seq_len + 1 = {seq_len + 1}"
        )
    return data[starts[:, None] + np.arange(seq_len + 1)].astype(np.int32)


def train_batch(data: np.ndarray, step: int, batch_size: int, seq_len: int, seed: int) -> np.ndarray:
    """The (batch_size, seq_len + 1) int32 windows of training step ``step``: random starts drawn from
    ``(seed, step)``, so every run with the same seed sees the same batches in the same order."""
    rng = np.random.default_rng([seed, step])
    return _windows(data, rng.integers(0, data.size - seq_len, size=batch_size), seq_len)


def held_out_batches(data: np.ndarray, num_batches: int, batch_size: int, seq_len: int) -> list[np.ndarray]:
    """``num_batches`` fixed (batch_size, seq_len + 1) int32 batches of windows evenly spaced over ``data``."""
    starts = np.linspace(0, data.size - seq_len - 1, num_batches * batch_size).astype(np.int64)
    return list(_windows(data, starts, seq_len).reshape(num_batches, batch_size, seq_len + 1))
