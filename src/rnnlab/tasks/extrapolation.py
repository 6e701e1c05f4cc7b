"""Passkey retrieval: a key of a few digits hidden in filler at a random depth, asked at the end.

An example of length T with a key of K digits::

    f f f ... f KEY d1 d2 ... dK f f ... f ASK d1 ... d(K-1)
                \\_ at a random depth _/         targets: d1 ... dK

* filler tokens f are drawn uniformly from their own range of the vocabulary;
* the block ``KEY d1 ... dK`` starts at a position drawn uniformly from every start that keeps
  it before the question (depth 0 = right at the beginning, 1 = just before the question);
* the last K positions read ``ASK d1 ... d(K-1)`` and their targets are ``d1 ... dK``: the model
  writes the key one digit at a time, each digit given once written (teacher forcing).

Train at one length, then test the same model at 1x, 2x, ... 16x that length: recurrent models
whose state is tuned to the training length may lose the key past it (Chen et al. 2024,
"Stuffed Mamba").

Token ids: digits [0, n_digits), KEY = n_digits, ASK = n_digits + 1, filler after those.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import IGNORE, check_int, make_generator

__all__ = ["PasskeyConfig", "passkey"]


@dataclass(frozen=True)
class PasskeyConfig:
    """One passkey setting."""

    seq_len: int = 128  # T: tokens per example, filler, key block and question included
    key_len: int = 4  # K: digits in the passkey
    n_digits: int = 10  # distinct digit tokens
    n_filler: int = 16  # distinct filler tokens

    def __post_init__(self) -> None:
        check_int("key_len", self.key_len, 1)
        check_int("seq_len", self.seq_len, 2 * self.key_len + 1)
        check_int("n_digits", self.n_digits, 2)
        check_int("n_filler", self.n_filler, 1)

    @property
    def key_token(self) -> int:
        """The token announcing the passkey."""
        return self.n_digits

    @property
    def ask_token(self) -> int:
        """The token asking for the passkey."""
        return self.n_digits + 1

    @property
    def vocab_size(self) -> int:
        """Tokens used: digits, KEY, ASK and filler."""
        return self.n_digits + 2 + self.n_filler


def passkey(config: PasskeyConfig, n: int, generator: torch.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` passkey examples: ``(inputs, targets)``, both (n, T) int64, targets -100 except at
    the last K positions, which hold the key's digits."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    T, K = c.seq_len, c.key_len
    rows = torch.arange(n).unsqueeze(1)  # (n, 1)

    # 1. Filler everywhere and a key per row.
    inputs = torch.randint(c.n_digits + 2, c.vocab_size, (n, T), generator=g)
    key = torch.randint(0, c.n_digits, (n, K), generator=g)  # (n, K)

    # 2. KEY d1 ... dK at a random start in [0, T - 2K - 1]: it ends before the question.
    start = torch.randint(0, T - 2 * K, (n, 1), generator=g)  # (n, 1)
    inputs[rows, start] = c.key_token
    inputs[rows, start + 1 + torch.arange(K)] = key

    # 3. The question ASK d1 ... d(K-1) in the last K positions, scored with d1 ... dK.
    inputs[:, T - K] = c.ask_token
    inputs[:, T - K + 1:] = key[:, :-1]
    targets = torch.full((n, T), IGNORE, dtype=torch.int64)
    targets[:, T - K:] = key
    return inputs, targets
