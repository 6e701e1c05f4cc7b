"""Text corpora as byte-token tensors: the standard library's source (always present) or your files."""
from __future__ import annotations

import glob
import hashlib
import sysconfig
from pathlib import Path

import torch

__all__ = ["stdlib_files", "text_files", "load_corpus", "get_batch"]


def stdlib_files() -> list[Path]:
    """The ``*.py`` files of this Python's standard library (no site-packages), sorted."""
    root = Path(sysconfig.get_paths()["stdlib"])
    return sorted(p for p in root.rglob("*.py") if "site-packages" not in p.parts and "dist-packages" not in p.parts)


def _is_binary(path: Path) -> bool:
    """A file whose first 8 KiB hold a NUL byte (the test git uses) is not text."""
    try:
        with open(path, "rb") as f:
            return b"\0" in f.read(8192)
    except OSError:
        return True


def text_files(paths: list[str]) -> list[Path]:
    """Expand files, directories and glob patterns to a sorted list of text files.

    Below a directory, hidden files and directories (``.git``, ``.venv``, ...) and binary files are
    left out; a file named directly must be text. Raises FileNotFoundError for a path that matches
    nothing and ValueError for a binary file named directly or a path that yields no text file.
    """
    out: list[Path] = []
    for item in paths:
        hits = glob.glob(item, recursive=True) if any(c in item for c in "*?[") else [item]
        if not hits:
            raise FileNotFoundError(f"text path {item!r} matches no file")
        found = []
        for h in hits:
            p = Path(h)
            if p.is_dir():
                found += [f for f in p.rglob("*") if f.is_file() and not any(part.startswith(".") for part in
                                                                             f.relative_to(p).parts)
                          and not _is_binary(f)]
            elif p.is_file():
                if _is_binary(p):
                    raise ValueError(f"text path {h!r} is a binary file, not text")
                found.append(p)
            else:
                raise FileNotFoundError(f"text path {h!r} is not a file or directory")
        if not found:
            raise ValueError(f"text path {item!r} holds no text file (hidden and binary files are left out)")
        out += found
    return sorted(set(out))


def _is_val(path: Path, val_fraction: float) -> bool:
    h = int(hashlib.sha1(path.name.encode() + str(path.parent.name).encode()).hexdigest()[:8], 16)
    return (h % 10_000) < val_fraction * 10_000


def load_corpus(paths: list[str] | None = None, max_bytes: int | None = None,
                val_fraction: float = 0.02) -> tuple[torch.Tensor, torch.Tensor]:
    """Byte tokens of the corpus, split by file into (train, validation) uint8 tensors (N,).

    ``paths`` None means the standard library's source. Each file goes wholly to one side, chosen
    by a hash of its name, so the split is deterministic and the sides are disjoint. ``max_bytes``
    caps the training side (validation gets at most a tenth of it); files are read only while their
    side is below its cap, and reading stops once both sides are full.
    """
    files = stdlib_files() if paths is None else text_files(paths)
    train, val, n_train, n_val = [], [], 0, 0
    cap = max_bytes if max_bytes is not None else float("inf")
    for f in files:
        if n_train >= cap and n_val >= cap / 10:
            break  # both sides are full: read nothing more
        is_val = _is_val(f, val_fraction)
        if (n_val >= cap / 10) if is_val else (n_train >= cap):
            continue  # this file's side is full: do not read it
        try:
            data = f.read_bytes()
        except OSError:
            continue
        if is_val:
            val.append(data)
            n_val += len(data)
        else:
            train.append(data)
            n_train += len(data)
    if not train:
        raise ValueError("the corpus is empty")
    if not val:  # tiny corpora: hold out the last 10% of the training bytes
        joined = b"".join(train)
        cut = max(1, int(len(joined) * 0.9))
        train, val = [joined[:cut]], [joined[cut:]]
    to_tensor = lambda chunks: torch.frombuffer(bytearray(b"".join(chunks)), dtype=torch.uint8)  # noqa: E731
    tr = to_tensor(train)
    return (tr[: int(max_bytes)] if max_bytes else tr), to_tensor(val)


def get_batch(data: torch.Tensor, batch_size: int, seq_len: int,
              generator: torch.Generator | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Random windows of ``data`` (N,): inputs and next-token targets, each (B, T) int64."""
    if len(data) < seq_len + 2:
        raise ValueError(f"the data has {len(data)} tokens; random windows of seq_len = {seq_len} need at least "
                         f"seq_len + 2 = {seq_len + 2}")
    starts = torch.randint(0, len(data) - seq_len - 1, (batch_size,), generator=generator)
    idx = starts[:, None] + torch.arange(seq_len + 1)[None, :]  # (B, T+1)
    seqs = data[idx].long()
    return seqs[:, :-1], seqs[:, 1:]
