"""The two synthetic tasks of the Mamba paper (Gu & Dao 2023, section 3.1): selective copying and
induction heads.

**Selective copying.** N data tokens scattered at random positions of a region of R blank
tokens, then N marker tokens; at the i-th marker the model must output the i-th data token (in
the order they appeared)::

    _ _ a _ _ b _ c _ _ _ d _ | M M M M        targets at the markers: a b c d

Solving it needs content-dependent memory: which tokens to keep depends on what they are, not
where they are. Token ids: data [0, n_symbols), blank = n_symbols, marker = n_symbols + 1.

**Induction heads.** Random tokens with a trigger token placed once at a random position, the
token after it being the answer; the last token is the trigger again, and its target is the
answer::

    x x x x TRIG v x x x x x x TRIG            target at the last TRIG: v

Token ids: ordinary tokens [0, n_symbols), trigger = n_symbols.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import IGNORE, check_int, distinct, make_generator

__all__ = ["SelectiveCopyConfig", "selective_copy", "InductionConfig", "induction_heads"]


@dataclass(frozen=True)
class SelectiveCopyConfig:
    """One selective-copying setting."""

    region_len: int = 64  # R: positions the data tokens are scattered over (the rest blank)
    n_tokens: int = 8  # N: data tokens to copy, in order
    n_symbols: int = 8  # distinct data tokens

    def __post_init__(self) -> None:
        check_int("n_tokens", self.n_tokens, 1)
        check_int("region_len", self.region_len, self.n_tokens)
        check_int("n_symbols", self.n_symbols, 1)

    @property
    def seq_len(self) -> int:
        """Tokens per example: the region, then one marker per data token."""
        return self.region_len + self.n_tokens

    @property
    def vocab_size(self) -> int:
        """Tokens used: data tokens, blank and marker."""
        return self.n_symbols + 2


def selective_copy(config: SelectiveCopyConfig, n: int, generator: torch.Generator | int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: ``(inputs, targets)``, both (n, R + N) int64, targets -100 except at the
    N markers, which hold the data tokens in order of appearance."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    R, N = c.region_len, c.n_tokens
    rows = torch.arange(n).unsqueeze(1)  # (n, 1)

    # 1. N data tokens at N distinct positions of the blank region, kept in order of position.
    data = torch.randint(0, c.n_symbols, (n, N), generator=g)  # (n, N): the i-th to appear is data[:, i]
    positions = distinct(n, R, N, g).sort(dim=1).values  # (n, N)
    inputs = torch.full((n, R + N), c.n_symbols, dtype=torch.int64)
    inputs[rows, positions] = data

    # 2. N markers, the i-th scored with the i-th data token.
    inputs[:, R:] = c.n_symbols + 1
    targets = torch.full_like(inputs, IGNORE)
    targets[:, R:] = data
    return inputs, targets


@dataclass(frozen=True)
class InductionConfig:
    """One induction-heads setting."""

    seq_len: int = 64  # T: tokens per example
    n_symbols: int = 16  # distinct ordinary tokens

    def __post_init__(self) -> None:
        check_int("seq_len", self.seq_len, 3)
        check_int("n_symbols", self.n_symbols, 1)

    @property
    def trigger_token(self) -> int:
        """The token placed before the answer and again at the end."""
        return self.n_symbols

    @property
    def vocab_size(self) -> int:
        """Tokens used: ordinary tokens and the trigger."""
        return self.n_symbols + 1


def induction_heads(config: InductionConfig, n: int, generator: torch.Generator | int = 0
                    ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: ``(inputs, targets)``, both (n, T) int64, targets -100 except at the last
    position, which holds the token that followed the first trigger."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    T = c.seq_len
    rows = torch.arange(n).unsqueeze(1)  # (n, 1)

    # 1. Random ordinary tokens; the trigger once at a position in [0, T - 3], again at T - 1.
    inputs = torch.randint(0, c.n_symbols, (n, T), generator=g)
    trigger_pos = torch.randint(0, T - 2, (n, 1), generator=g)  # (n, 1)
    inputs[rows, trigger_pos] = c.trigger_token
    inputs[:, -1] = c.trigger_token

    # 2. The answer: the token right after the first trigger.
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = inputs[rows, trigger_pos + 1].squeeze(1)
    return inputs, targets
