"""Tokenizers: the byte tokenizer (default, no download, no training) and a ``tokenizer.json`` wrapper.

Both have one interface: ``encode(text) -> list[int]``, ``decode(ids) -> str``,
``__call__(text) -> (1, T) int64 tensor``, ``vocab_size``, ``eos_id`` (the end-of-document token
written between documents of a prepared corpus) and ``spec``, a string that
:func:`load_tokenizer` turns back into the same tokenizer.
"""
from __future__ import annotations

import json
import os
from pathlib import Path

import torch

__all__ = ["ByteTokenizer", "HFTokenizer", "load_tokenizer", "EOS_CANDIDATES", "BOS_CANDIDATES"]

# Names of end-of-document tokens, in the order HFTokenizer looks for them when the tokenizer's
# directory has no tokenizer_config.json naming its eos_token.
EOS_CANDIDATES = ("</s>", "<|endoftext|>", "<|end_of_text|>", "<eos>", "<|eos|>", "[EOS]", "<|im_end|>")
# Names of beginning-of-sequence tokens, looked for the same way when no bos_token is configured.
BOS_CANDIDATES = ("<s>", "<|begin_of_text|>", "<bos>", "<|bos|>", "[BOS]", "<|startoftext|>")


def _ids_list(ids, vocab_size: int, who: str) -> list[int]:
    """``ids`` (list or int tensor of any shape with one row) -> list of ints, each checked in range."""
    if isinstance(ids, torch.Tensor):
        if ids.is_floating_point() or ids.is_complex():
            raise TypeError(f"ids must be integers, got a {ids.dtype} tensor")
        ids = ids.reshape(-1).tolist()
    out = [int(i) for i in ids]
    for i in out:
        if not 0 <= i < vocab_size:
            raise ValueError(f"token id {i} is outside the {who}'s range [0, {vocab_size})")
    return out


class ByteTokenizer:
    """Maps text to UTF-8 bytes (ids 0..255) and back; specials: bos=256, eos=257, pad=258, sep=259.

    ``eos_id`` (257) ends each document of a prepared corpus; ``spec`` is ``"bytes"``.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
    """

    bos_id, eos_id, pad_id, sep_id = 256, 257, 258, 259
    vocab_size = 260
    special_tokens = {"<bos>": 256, "<eos>": 257, "<pad>": 258, "<sep>": 259}
    spec = "bytes"

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids (optionally framed by bos/eos)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8")) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Ids (list or int tensor) -> text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        ids = _ids_list(ids, self.vocab_size, "byte tokenizer")
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> torch.Tensor:
        """Text -> (1, T) int64 tensor."""
        return torch.tensor([self.encode(text)], dtype=torch.long)

    def __repr__(self) -> str:
        return "ByteTokenizer()"


def _import_tokenizers():
    try:
        import tokenizers
    except ImportError as e:  # pragma: no cover - depends on the environment
        raise ImportError("reading a tokenizer.json needs the 'tokenizers' package: "
                          "pip install tokenizers (or rnnlab[hf])") from e
    return tokenizers


def _tokenizer_file(path: str | os.PathLike) -> Path:
    """A tokenizer.json file, or a directory holding one -> the file's path (checked to exist)."""
    p = Path(path)
    if p.is_dir():
        if not (p / "tokenizer.json").is_file():
            raise FileNotFoundError(f"tokenizer directory {str(p)!r} has no tokenizer.json")
        return p / "tokenizer.json"
    if not p.is_file():
        raise FileNotFoundError(f"tokenizer file {str(p)!r} does not exist")
    return p


class HFTokenizer:
    """A ``tokenizer.json`` (Hugging Face ``tokenizers`` format) with the ByteTokenizer's interface.

    Args:
        path: the ``tokenizer.json`` file or a directory containing it.
        eos_token: the token that ends a document; by default the ``eos_token`` of a
            ``tokenizer_config.json`` beside the file, else the first of :data:`EOS_CANDIDATES`
            the vocabulary has. ``eos_id`` raises a clear error if none is found.

    ``encode`` adds no special tokens (no template); ``decode`` drops special tokens.
    ``spec`` is the file's absolute path.
    """

    def __init__(self, path: str | os.PathLike, eos_token: str | None = None):
        tokenizers = _import_tokenizers()
        self.file = _tokenizer_file(path).resolve()
        try:
            self._tok = tokenizers.Tokenizer.from_file(str(self.file))
        except Exception as e:  # the Rust side raises a generic Exception for malformed files
            raise ValueError(f"{str(self.file)!r} is not a readable tokenizer.json: {e}") from e
        self.vocab_size: int = self._tok.get_vocab_size(with_added_tokens=True)
        self.spec: str = str(self.file)
        self._eos_token = eos_token
        if eos_token is not None and self._tok.token_to_id(eos_token) is None:
            raise ValueError(f"eos_token {eos_token!r} is not in the vocabulary of {self.spec!r}")

    def _configured(self, key: str) -> str | None:
        """The token a ``tokenizer_config.json`` beside the file names under ``key`` (``"eos_token"``,
        ``"bos_token"``), if the vocabulary has it."""
        cfg = self.file.parent / "tokenizer_config.json"
        if not cfg.is_file():
            return None
        try:
            tok = json.loads(cfg.read_text()).get(key)
        except (OSError, ValueError, AttributeError):
            return None
        if isinstance(tok, dict):  # transformers writes {"content": "</s>", ...} for AddedToken
            tok = tok.get("content")
        return tok if isinstance(tok, str) and self._tok.token_to_id(tok) is not None else None

    @property
    def eos_token(self) -> str:
        """The end-of-document token's text (see the class docstring for how it is found)."""
        if self._eos_token is None:
            found = self._configured("eos_token")
            if found is None:
                found = next((t for t in EOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
            if found is None:
                raise ValueError(
                    f"the tokenizer {self.spec!r} has no end-of-document token: no tokenizer_config.json "
                    f"eos_token beside it and none of {list(EOS_CANDIDATES)} in its vocabulary; "
                    f"pass eos_token='...' naming the token that ends a document")
            self._eos_token = found
        return self._eos_token

    @property
    def eos_id(self) -> int:
        """The end-of-document token's id."""
        return int(self._tok.token_to_id(self.eos_token))

    @property
    def bos_id(self) -> int:
        """The beginning-of-sequence token's id: the ``bos_token`` of a ``tokenizer_config.json``
        beside the file, else the first of :data:`BOS_CANDIDATES` the vocabulary has."""
        found = self._configured("bos_token")
        if found is None:
            found = next((t for t in BOS_CANDIDATES if self._tok.token_to_id(t) is not None), None)
        if found is None:
            raise ValueError(f"the tokenizer {self.spec!r} has no beginning-of-sequence token: no "
                             f"tokenizer_config.json bos_token beside it and none of {list(BOS_CANDIDATES)} "
                             "in its vocabulary")
        return int(self._tok.token_to_id(found))

    def encode(self, text: str) -> list[int]:
        """Text -> ids (no special tokens added)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids) -> str:
        """Ids (list or int tensor) -> text; special tokens are dropped."""
        return self._tok.decode(_ids_list(ids, self.vocab_size, f"tokenizer {self.spec!r}"))

    def __call__(self, text: str) -> torch.Tensor:
        """Text -> (1, T) int64 tensor."""
        return torch.tensor([self.encode(text)], dtype=torch.long)

    def __repr__(self) -> str:
        return f"HFTokenizer({self.spec!r}, vocab_size={self.vocab_size})"


def load_tokenizer(spec: str | os.PathLike | None = None, eos_token: str | None = None):
    """A tokenizer from its ``spec``: None or ``"bytes"`` -> :class:`ByteTokenizer`; a ``tokenizer.json``
    file or a directory containing one -> :class:`HFTokenizer` (``eos_token`` is passed on).

    A tokenizer object (anything with ``encode`` and ``decode``) is returned unchanged.
    """
    if spec is None or (isinstance(spec, str) and spec == "bytes"):
        return ByteTokenizer()
    if hasattr(spec, "encode") and hasattr(spec, "decode") and not isinstance(spec, (str, os.PathLike)):
        return spec
    if not isinstance(spec, (str, os.PathLike)):
        raise TypeError(f"tokenizer spec must be 'bytes', a path or a tokenizer, got {type(spec).__name__}")
    p = Path(spec)
    if p.is_file() or (p.is_dir() and (p / "tokenizer.json").is_file()):
        return HFTokenizer(p, eos_token=eos_token)
    if p.is_dir():
        raise FileNotFoundError(f"tokenizer spec {str(spec)!r} is a directory without a tokenizer.json")
    raise ValueError(f"tokenizer spec {str(spec)!r} is neither 'bytes' nor an existing tokenizer.json "
                     f"file or directory containing one")
