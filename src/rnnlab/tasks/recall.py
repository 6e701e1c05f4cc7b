"""Multi-query associative recall (MQAR), as the Zoology paper defines it (Arora et al. 2023,
"Zoology: Measuring and improving recall in efficient language models").

An example of length T with P key-value pairs over a vocabulary of V tokens::

    k1 v1 k2 v2 ... kP vP | filler ... k3 filler ... k1 filler ...
    \\___ 2P tokens ____/   \\__ each key asked once, at a power-law distributed gap __/

* keys are P distinct tokens of [1, V/2), values P distinct tokens of [V/2, V);
* after the key-value block, every key is asked exactly once: query i sits at position
  ``2P + 2·gap_i``, where the gaps are P distinct draws from {0, ..., S - 1}, S = (T - 2P) / 2,
  each drawn with probability proportional to ``(gap + 1)^(alpha - 1)`` (alpha = 0.01: short
  gaps are much more likely, as repeated bigrams are in text);
* every other position holds a filler token drawn uniformly from [0, V);
* the target at a query position is that key's value; nothing else is scored.

The settings the Zoology paper sweeps run from (T, P) = (64, 4) to (512, 64) at V = 8192
(:data:`STANDARD_SETTINGS`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import IGNORE, check_int, distinct, make_generator

__all__ = ["MQARConfig", "mqar", "STANDARD_SETTINGS"]

STANDARD_SETTINGS: tuple[tuple[int, int], ...] = ((64, 4), (128, 8), (256, 16), (512, 32), (512, 64))


@dataclass(frozen=True)
class MQARConfig:
    """One MQAR setting."""

    seq_len: int = 64  # T: tokens per example
    kv_pairs: int = 4  # P: key-value pairs per example, each key queried once
    vocab_size: int = 8192  # V: keys come from [1, V/2), values from [V/2, V), filler from [0, V)
    alpha: float = 0.01  # power-law exponent of the query gaps: P(gap) ~ (gap + 1)^(alpha - 1); 1 = uniform

    def __post_init__(self) -> None:
        check_int("kv_pairs", self.kv_pairs, 1)
        check_int("seq_len", self.seq_len, 4 * self.kv_pairs)
        check_int("vocab_size", self.vocab_size, 2 * self.kv_pairs + 2)
        if not 0 < self.alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {self.alpha!r}")


def mqar(config: MQARConfig, n: int, generator: torch.Generator | int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` MQAR examples: ``(inputs, targets)``, both (n, T) int64, targets -100 except at the
    P query positions of each row, where they hold the queried key's value."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    T, P, V = c.seq_len, c.kv_pairs, c.vocab_size
    half = V // 2
    rows = torch.arange(n).unsqueeze(1)  # (n, 1)

    # 1. P distinct keys from [1, V/2) and P distinct values from [V/2, V) per row.
    keys = 1 + distinct(n, half - 1, P, g)  # (n, P)
    values = half + distinct(n, V - half, P, g)  # (n, P)

    # 2. Filler everywhere, then the key-value block k1 v1 k2 v2 ... at the start.
    inputs = torch.randint(0, V, (n, T), generator=g)
    inputs[:, 0:2 * P:2] = keys
    inputs[:, 1:2 * P:2] = values

    # 3. Each key asked once, at gap_i (distinct, power-law weighted) pairs after the block.
    space = (T - 2 * P) // 2
    weights = torch.arange(1, space + 1, dtype=torch.float64) ** (c.alpha - 1)  # (space,)
    gaps = torch.multinomial(weights.expand(n, space), P, replacement=False, generator=g)  # (n, P)
    query_pos = 2 * P + 2 * gaps  # (n, P)
    inputs[rows, query_pos] = keys

    # 4. Score the value after each query key, nothing else.
    targets = torch.full((n, T), IGNORE, dtype=torch.int64)
    targets[rows, query_pos] = values
    return inputs, targets
