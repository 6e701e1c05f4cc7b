"""Byte-level tokenizer: the 256 byte values plus four special tokens. No download, no training."""
from __future__ import annotations

import torch

__all__ = ["ByteTokenizer"]


class ByteTokenizer:
    """Maps text to UTF-8 bytes (ids 0..255) and back; specials: bos=256, eos=257, pad=258, sep=259.

    >>> tok = ByteTokenizer()
    >>> tok.decode(tok.encode("héllo"))
    'héllo'
    """

    bos_id, eos_id, pad_id, sep_id = 256, 257, 258, 259
    vocab_size = 260
    special_tokens = {"<bos>": 256, "<eos>": 257, "<pad>": 258, "<sep>": 259}

    def encode(self, text: str, bos: bool = False, eos: bool = False) -> list[int]:
        """Text -> ids (optionally framed by bos/eos)."""
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}")
        return ([self.bos_id] if bos else []) + list(text.encode("utf-8")) + ([self.eos_id] if eos else [])

    def decode(self, ids) -> str:
        """Ids -> text; special tokens are dropped, invalid UTF-8 becomes U+FFFD."""
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        for i in ids:
            if not 0 <= int(i) < self.vocab_size:
                raise ValueError(f"token id {i} is outside the byte tokenizer's range [0, {self.vocab_size})")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")

    def __call__(self, text: str) -> torch.Tensor:
        """Text -> (1, T) int64 tensor."""
        return torch.tensor([self.encode(text)], dtype=torch.long)
