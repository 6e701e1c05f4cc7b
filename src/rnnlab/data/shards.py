"""Pre-tokenised corpora: :func:`prepare_corpus` writes token shards and ``meta.json``; :class:`TokenData`
reads them (memory-mapped) or wraps tokens already in memory.

A prepared directory holds ``train_00000.bin, ...`` and ``val_00000.bin, ...`` (raw little-endian
uint16, or uint32 when the vocabulary has more than 65535 ids), an optional ``tokenizer.json``
(a copy of the tokenizer used) and ``meta.json``, written last: a directory without ``meta.json``
is incomplete. Each source file is one document, followed by the tokenizer's end-of-document id.
"""
from __future__ import annotations

import hashlib
import json
import math
import os
import re
import tempfile
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .corpus import _is_val, stdlib_files, text_files
from .tokenizer import ByteTokenizer, HFTokenizer, load_tokenizer

__all__ = ["prepare_corpus", "TokenData", "FORMAT", "FORMAT_VERSION", "SHARD_TOKENS"]

FORMAT = "rnnlab-tokens"  # meta.json "format": marks a directory written by prepare_corpus
FORMAT_VERSION = 1  # meta.json "version": the newest layout this code reads and writes
SHARD_TOKENS = 1 << 26  # default tokens per shard (128 MiB of uint16)
_DTYPES = {"uint16": np.dtype("<u2"), "uint32": np.dtype("<u4")}
_OURS = re.compile(r"(train|val)_\d{5,}\.bin|meta\.json|tokenizer\.json|\.tmp-.*")
_SPLITS = ("train", "val")


# -- atomic files -----------------------------------------------------------------------------------
def _publish(tmp: str, path: Path) -> None:
    """Rename the finished temporary file ``tmp`` onto ``path`` with the mode a plain ``open()``
    would give it (mkstemp makes 0600; the user's umask decides)."""
    umask = os.umask(0)
    os.umask(umask)
    os.chmod(tmp, 0o666 & ~umask)
    os.replace(tmp, path)


def _atomic_bytes(path: Path, data: bytes) -> None:
    """Write ``data`` to a temporary file beside ``path``, fsync, then rename onto ``path``."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".tmp-", suffix=path.name)
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        _publish(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


class _ShardWriter:
    """Streams one split's tokens into ``{split}_00000.bin, ...`` of ``shard_tokens`` tokens each.

    Each shard is written to a temporary file and renamed into place when full (or at ``finish``);
    ``abort`` removes the shard being written.
    """

    def __init__(self, out_dir: Path, split: str, dtype: np.dtype, shard_tokens: int):
        self.out_dir, self.split, self.dtype, self.shard_tokens = out_dir, split, dtype, shard_tokens
        self.shards: list[dict] = []  # finished shards: name, tokens, sha256
        self._f = self._tmp = self._hash = None
        self._n = 0

    def _open(self) -> None:
        fd, self._tmp = tempfile.mkstemp(dir=self.out_dir, prefix=".tmp-", suffix=self._name())
        self._f, self._hash, self._n = os.fdopen(fd, "wb"), hashlib.sha256(), 0

    def _name(self) -> str:
        return f"{self.split}_{len(self.shards):05d}.bin"

    def _close(self) -> None:
        self._f.flush()
        os.fsync(self._f.fileno())
        self._f.close()
        name = self._name()
        _publish(self._tmp, self.out_dir / name)
        self.shards.append({"name": name, "tokens": self._n, "sha256": self._hash.hexdigest()})
        self._f = self._tmp = None

    def write(self, ids: np.ndarray) -> None:
        """Append ``ids`` (N,) (already checked to fit the dtype)."""
        ids = np.ascontiguousarray(ids, dtype=self.dtype)
        i = 0
        while i < len(ids):
            if self._f is None:
                self._open()
            take = min(len(ids) - i, self.shard_tokens - self._n)
            chunk = ids[i:i + take].tobytes()
            self._f.write(chunk)
            self._hash.update(chunk)
            self._n += take
            i += take
            if self._n == self.shard_tokens:
                self._close()

    def finish(self) -> list[dict]:
        """Close the last (partial) shard; the list of shards written."""
        if self._f is not None:
            self._close()
        return self.shards

    def abort(self) -> None:
        """Remove the shard being written (finished shards stay; meta.json is absent anyway)."""
        if self._f is not None:
            self._f.close()
            if os.path.exists(self._tmp):
                os.remove(self._tmp)
            self._f = None


# -- planning which bytes go where ------------------------------------------------------------------
@dataclass(frozen=True)
class _Piece:
    """A byte range of one source file that becomes one document of one split."""

    path: Path  # the source file
    split: str  # "train" or "val"
    offset: int  # first byte read
    length: int  # bytes read


def _plan(files: list[Path], val_fraction: float, max_bytes: int | None) -> list[_Piece]:
    """Assign files to splits by name hash (as ``load_corpus``), within the byte caps, from file sizes.

    ``max_bytes`` caps the training side and a tenth of it the validation side; the file that crosses
    a cap is cut there and nothing past it is read. Without any validation file the last 10% of the
    training bytes become the validation split (the file spanning the cut is split in two documents).
    """
    caps = {"train": math.inf if max_bytes is None else max_bytes,
            "val": math.inf if max_bytes is None else max_bytes // 10}
    used = {"train": 0, "val": 0}
    pieces: list[_Piece] = []
    for f in files:
        if all(used[s] >= caps[s] for s in _SPLITS):
            break
        split = "val" if _is_val(f, val_fraction) else "train"
        room = caps[split] - used[split]
        if room <= 0:
            continue
        try:
            size = f.stat().st_size
        except OSError:
            continue
        length = int(min(size, room))
        if length > 0:
            pieces.append(_Piece(f, split, 0, length))
            used[split] += length
    if used["train"] == 0:
        raise ValueError("the corpus is empty: no readable, non-empty training file within max_bytes")
    if used["val"] > 0:
        return pieces
    cut = max(1, int(used["train"] * 0.9))  # tiny corpora: hold out the last 10% of the training bytes
    out, seen = [], 0
    for p in pieces:
        if seen + p.length <= cut:
            out.append(p)
        elif seen >= cut:
            out.append(_Piece(p.path, "val", p.offset, p.length))
        else:
            head = cut - seen
            out += [_Piece(p.path, "train", p.offset, head), _Piece(p.path, "val", p.offset + head, p.length - head)]
        seen += p.length
    return out


def _read(piece: _Piece) -> bytes:
    with open(piece.path, "rb") as f:
        f.seek(piece.offset)
        return f.read(piece.length)


def _encode(tok, data: bytes) -> np.ndarray:
    """A document's bytes -> token ids (N,); the byte tokenizer keeps the raw bytes (binary-safe)."""
    if isinstance(tok, ByteTokenizer):
        return np.frombuffer(data, dtype=np.uint8)
    return np.asarray(tok.encode(data.decode("utf-8", errors="replace")), dtype=np.int64)


def _prepare_out_dir(out_dir: Path) -> None:
    """Create ``out_dir`` or clear what an earlier prepare left there; refuse a directory with other files."""
    if out_dir.exists() and not out_dir.is_dir():
        raise NotADirectoryError(f"out_dir {str(out_dir)!r} exists and is not a directory")
    out_dir.mkdir(parents=True, exist_ok=True)
    foreign = sorted(p.name for p in out_dir.iterdir() if not _OURS.fullmatch(p.name))
    if foreign:
        raise FileExistsError(f"out_dir {str(out_dir)!r} holds files prepare_corpus did not write "
                              f"({', '.join(foreign[:5])}{', ...' if len(foreign) > 5 else ''}); "
                              f"give an empty or new directory")
    meta = out_dir / "meta.json"
    if meta.exists():
        meta.unlink()  # first, so that the directory never looks complete with new shards in it
    for p in out_dir.iterdir():
        if p.name != "tokenizer.json":
            p.unlink()


def prepare_corpus(paths: list[str] | None, out_dir: str | os.PathLike, tokenizer="bytes",
                   shard_tokens: int = SHARD_TOKENS, val_fraction: float = 0.02, max_bytes: int | None = None,
                   progress: bool = True) -> dict:
    """Tokenise a text corpus into token shards plus ``meta.json`` in ``out_dir``; returns the meta dict.

    Args:
        paths: files, directories (every file below) and glob patterns, as :func:`text_files`
            expands them; None means the standard library's ``*.py`` source (:func:`stdlib_files`).
            Files inside ``out_dir`` are never read.
        out_dir: the output directory (created; may hold an earlier prepare's output, which is
            replaced; any other file there is an error).
        tokenizer: a :func:`load_tokenizer` spec (``"bytes"``, a ``tokenizer.json`` or a directory
            holding one) or a tokenizer object with ``encode``, ``eos_id``, ``vocab_size``, ``spec``.
        shard_tokens: tokens per shard file (the last shard of a split may be shorter).
        val_fraction: share of files held out for validation, chosen by a hash of each file's name.
        max_bytes: cap on the source bytes read for training (validation: a tenth); the file
            crossing the cap is cut there. None reads everything.
        progress: show a tqdm bar over the files.

    Each file is one document followed by the tokenizer's end-of-document id (``eod_id``); empty
    and unreadable files are skipped. Text is read as UTF-8 (invalid bytes become U+FFFD) except by
    the byte tokenizer, which keeps the bytes as they are. Every file is written to a temporary
    name and renamed, ``meta.json`` last, so an interrupted run leaves no ``meta.json``.
    """
    from tqdm.auto import tqdm

    if isinstance(shard_tokens, bool) or not isinstance(shard_tokens, int) or shard_tokens < 1:
        raise ValueError(f"shard_tokens must be a positive int, got {shard_tokens!r}")
    if not 0.0 <= float(val_fraction) < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction!r}")
    if max_bytes is not None and (isinstance(max_bytes, bool) or not isinstance(max_bytes, int) or max_bytes < 1):
        raise ValueError(f"max_bytes must be a positive int or None, got {max_bytes!r}")
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    tok = load_tokenizer(tokenizer)
    for attr in ("encode", "eos_id", "vocab_size", "spec"):
        if not hasattr(tok, attr):
            raise TypeError(f"tokenizer must have {attr!r} (encode, eos_id, vocab_size, spec); got {type(tok).__name__}")
    eod, vocab = int(tok.eos_id), int(tok.vocab_size)  # eos_id raises first if the tokenizer has none
    if not 0 <= eod < vocab:
        raise ValueError(f"the tokenizer's eos_id {eod} is outside its vocabulary [0, {vocab})")
    dtype_name = "uint32" if vocab > 65535 else "uint16"
    dtype = _DTYPES[dtype_name]

    out = Path(out_dir)
    files = stdlib_files() if paths is None else text_files([str(p) for p in paths])
    out_abs = out.resolve()
    files = [f for f in files if out_abs != f.resolve().parent and out_abs not in f.resolve().parents]
    try:
        pieces = _plan(files, float(val_fraction), max_bytes)
    except ValueError as e:
        where = "the standard library's source" if paths is None else ", ".join(repr(str(p)) for p in paths)
        raise ValueError(f"{where}: {e}") from None
    _prepare_out_dir(out)

    writers = {s: _ShardWriter(out, s, dtype, shard_tokens) for s in _SPLITS}
    stats = {s: {"tokens": 0, "documents": 0, "bytes": 0} for s in _SPLITS}
    eod_arr = np.array([eod], dtype=np.int64)
    try:
        for piece in tqdm(pieces, desc=f"tokenising into {out}", unit="file", disable=not progress):
            try:
                data = _read(piece)
            except OSError:
                continue
            if not data:
                continue
            ids = _encode(tok, data)
            if len(ids) and (int(ids.max()) >= vocab or int(ids.min()) < 0):
                raise ValueError(f"the tokenizer produced id {int(ids.max())} outside its vocab_size {vocab}"
                                 f" on {str(piece.path)!r}")
            w, st = writers[piece.split], stats[piece.split]
            w.write(ids)
            w.write(eod_arr)
            st["tokens"] += len(ids) + 1
            st["documents"] += 1
            st["bytes"] += len(data)
        shards = {s: writers[s].finish() for s in _SPLITS}
        tokenizer_file = None
        if isinstance(tok, HFTokenizer):
            tokenizer_file = "tokenizer.json"
            if tok.file != (out / tokenizer_file).resolve():
                _atomic_bytes(out / tokenizer_file, tok.file.read_bytes())
    except BaseException:
        for w in writers.values():
            w.abort()
        raise

    digest = hashlib.sha256(json.dumps(
        [dtype_name, [[sh["name"], sh["tokens"], sh["sha256"]] for s in _SPLITS for sh in shards[s]]]).encode())
    meta = {
        "format": FORMAT,
        "version": FORMAT_VERSION,
        "dtype": dtype_name,
        "vocab_size": vocab,
        "tokenizer": tok.spec,
        "tokenizer_file": tokenizer_file,
        "eod_id": eod,
        "eod_token": getattr(tok, "eos_token", None) if isinstance(tok, HFTokenizer) else None,
        "splits": {s: {**stats[s], "shards": shards[s]} for s in _SPLITS},
        "sha256": digest.hexdigest(),
        "source": {"paths": None if paths is None else [str(p) for p in paths], "files": len(files),
                   "val_fraction": float(val_fraction), "max_bytes": max_bytes},
        "shard_tokens": shard_tokens,
    }
    _atomic_bytes(out / "meta.json", (json.dumps(meta, indent=1) + "\n").encode())
    return meta


# -- reading ----------------------------------------------------------------------------------------
def _read_meta(d: Path) -> dict:
    if not d.is_dir():
        raise FileNotFoundError(f"token directory {str(d)!r} does not exist or is not a directory")
    mp = d / "meta.json"
    if not mp.is_file():
        if any(_OURS.fullmatch(p.name) and p.suffix == ".bin" or p.name.startswith(".tmp-") for p in d.iterdir()):
            raise FileNotFoundError(f"token directory {str(d)!r} is incomplete (shards but no meta.json: "
                                    f"prepare_corpus was interrupted or is still running); prepare it again")
        raise FileNotFoundError(f"{str(d)!r} has no meta.json: not a corpus written by prepare_corpus")
    try:
        meta = json.loads(mp.read_text())
    except (OSError, ValueError) as e:
        raise ValueError(f"{str(mp)!r} is not readable JSON: {e}") from e
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise ValueError(f"{str(mp)!r} is not an rnnlab token corpus (format "
                         f"{meta.get('format') if isinstance(meta, dict) else None!r}, expected {FORMAT!r})")
    version = meta.get("version")
    if not isinstance(version, int) or version < 1:
        raise ValueError(f"{str(mp)!r} has an invalid format version {version!r}")
    if version > FORMAT_VERSION:
        raise ValueError(f"{str(mp)!r} has format version {version}, newer than this rnnlab reads "
                         f"({FORMAT_VERSION}); upgrade rnnlab")
    if meta.get("dtype") not in _DTYPES:
        raise ValueError(f"{str(mp)!r} has dtype {meta.get('dtype')!r}, expected one of {sorted(_DTYPES)}")
    return meta


class TokenData:
    """A 1-D sequence of token ids, in memory (:meth:`from_tensor`) or memory-mapped shards (:meth:`open`).

    ``len(data)`` is the number of tokens; :meth:`window` reads ``n`` consecutive tokens as an int64
    tensor (n,), across shard ends. ``eod_id`` is the end-of-document id (or None),
    ``vocab_size`` bounds the ids, ``num_bytes`` is the source bytes behind the tokens (or None).
    """

    def __init__(self, parts: list, eod_id: int | None, vocab_size: int, num_bytes: int | None = None,
                 meta: dict | None = None, path: Path | None = None, split: str | None = None):
        self._parts = parts  # 1-D numpy memmaps or torch tensors, read in order
        self._offsets = np.cumsum([0] + [len(p) for p in parts]).astype(np.int64)  # (len(parts) + 1,)
        self.eod_id = eod_id
        self.vocab_size = int(vocab_size)
        self.num_bytes = num_bytes
        self.meta = meta
        self.path = path
        self.split = split

    @classmethod
    def from_tensor(cls, t: torch.Tensor, eod_id: int | None = None, vocab_size: int | None = None,
                    num_bytes: int | None = None) -> "TokenData":
        """Wrap tokens ``t`` (N,) of any integer dtype (e.g. ``load_corpus``'s uint8 bytes).

        ``vocab_size`` defaults to ``max(t) + 1``; every id must be in ``[0, vocab_size)``.
        ``num_bytes``: the source bytes behind the tokens, if known (for bits per byte).
        """
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"t must be a torch.Tensor of token ids, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"t must be 1-D (N,), got shape {tuple(t.shape)}")
        if t.dtype == torch.bool or t.is_floating_point() or t.is_complex():
            raise TypeError(f"t must have an integer dtype, got {t.dtype}")
        if len(t) == 0 and vocab_size is None:
            raise ValueError("t is empty: give vocab_size explicitly or some tokens")
        lo, hi = (int(t.min()), int(t.max())) if len(t) else (0, -1)
        if vocab_size is None:
            vocab_size = hi + 1
        if isinstance(vocab_size, bool) or not isinstance(vocab_size, int) or vocab_size < 1:
            raise ValueError(f"vocab_size must be a positive int, got {vocab_size!r}")
        if lo < 0 or hi >= vocab_size:
            raise ValueError(f"t holds ids in [{lo}, {hi}], outside [0, vocab_size={vocab_size})")
        if eod_id is not None and not 0 <= int(eod_id) < vocab_size:
            raise ValueError(f"eod_id {eod_id} is outside [0, vocab_size={vocab_size})")
        if num_bytes is not None and (isinstance(num_bytes, bool) or not isinstance(num_bytes, int) or num_bytes < 0):
            raise ValueError(f"num_bytes must be a non-negative int or None, got {num_bytes!r}")
        return cls([t], None if eod_id is None else int(eod_id), vocab_size, num_bytes=num_bytes)

    @classmethod
    def open(cls, path: str | os.PathLike, split: str = "train", verify: bool = False) -> "TokenData":
        """Memory-map one split of a directory written by :func:`prepare_corpus` (nothing is loaded).

        ``verify`` also checks every shard's sha256 (reads the whole split once).
        Raises a clear error for a missing, incomplete, damaged, foreign or newer-format directory.
        """
        d = Path(path)
        meta = _read_meta(d)
        splits = meta.get("splits", {})
        if split not in splits:
            raise ValueError(f"split must be one of {sorted(splits)}, got {split!r}")
        dt = _DTYPES[meta["dtype"]]
        parts = []
        for sh in splits[split]["shards"]:
            f = d / sh["name"]
            if not f.is_file():
                raise FileNotFoundError(f"shard {sh['name']!r} listed in {str(d / 'meta.json')!r} is missing")
            size, want = f.stat().st_size, int(sh["tokens"]) * dt.itemsize
            if size != want:
                raise ValueError(f"shard {str(f)!r} has {size} bytes but meta.json says {sh['tokens']} tokens "
                                 f"x {dt.itemsize} bytes = {want}: the directory is damaged; prepare it again")
            if verify:
                h = hashlib.sha256()
                with open(f, "rb") as fh:
                    for block in iter(lambda: fh.read(1 << 24), b""):
                        h.update(block)
                if h.hexdigest() != sh["sha256"]:
                    raise ValueError(f"shard {str(f)!r} does not match its sha256 in meta.json: the data changed")
            if sh["tokens"]:
                parts.append(np.memmap(f, dtype=dt, mode="r", shape=(int(sh["tokens"]),)))
        n = sum(len(p) for p in parts)
        if n != splits[split]["tokens"]:
            raise ValueError(f"{str(d)!r}: the {split} shards hold {n} tokens, meta.json says {splits[split]['tokens']}")
        return cls(parts, meta["eod_id"], meta["vocab_size"], num_bytes=splits[split].get("bytes"),
                   meta=meta, path=d, split=split)

    def __len__(self) -> int:
        return int(self._offsets[-1])

    @property
    def bytes_per_token(self) -> float | None:
        """Source bytes per token (``num_bytes / len``), for bits per byte = nats per token / ln 2 /
        bytes_per_token; None when ``num_bytes`` is unknown."""
        return None if self.num_bytes is None or len(self) == 0 else self.num_bytes / len(self)

    @property
    def num_documents(self) -> int | None:
        """Documents in this split (known for prepared directories), else None."""
        return None if self.meta is None else int(self.meta["splits"][self.split]["documents"])

    def window(self, start: int, n: int) -> torch.Tensor:
        """Tokens ``[start, start + n)`` as an int64 tensor (n,), read across shard ends."""
        start, n = int(start), int(n)
        if n < 0 or start < 0 or start + n > len(self):
            raise IndexError(f"window(start={start}, n={n}) is outside the data's {len(self)} tokens")
        out, pos, i = [], start, int(np.searchsorted(self._offsets, start, side="right")) - 1
        while pos < start + n:
            part, lo = self._parts[i], pos - int(self._offsets[i])
            take = min(start + n - pos, len(part) - lo)
            piece = part[lo:lo + take]
            out.append(piece.to(torch.int64, copy=True) if isinstance(piece, torch.Tensor)
                       else torch.from_numpy(piece.astype(np.int64)))
            pos += take
            i += 1
        if not out:
            dev = self._parts[0].device if self._parts and isinstance(self._parts[0], torch.Tensor) else None
            return torch.empty(0, dtype=torch.int64, device=dev)
        return out[0] if len(out) == 1 else torch.cat(out)

    def windows(self, starts, n: int) -> torch.Tensor:
        """Windows of ``n`` tokens at each of ``starts`` (B,) -> int64 tensor (B, n)."""
        starts = starts.tolist() if isinstance(starts, torch.Tensor) else list(starts)
        if not starts:
            return torch.empty(0, int(n), dtype=torch.int64)
        return torch.stack([self.window(s, n) for s in starts])

    def tokenizer(self):
        """The tokenizer these tokens were made with (a prepared directory's copy of it, or its spec)."""
        if self.meta is None:
            raise ValueError("this TokenData was made from a tensor and does not know its tokenizer")
        if self.meta.get("tokenizer_file"):
            return HFTokenizer(self.path / self.meta["tokenizer_file"], eos_token=self.meta.get("eod_token"))
        return load_tokenizer(self.meta["tokenizer"])

    def __repr__(self) -> str:
        where = f"{str(self.path)!r}, split={self.split!r}" if self.path is not None else "in memory"
        return f"TokenData({where}, tokens={len(self)}, vocab_size={self.vocab_size}, eod_id={self.eod_id})"
