"""State tracking: the running product of group elements, labelled at every position.

Each example is a sequence x_1 ... x_L of elements of a finite group G (one token per element);
the target at position t is the product of the prefix,

    y_1 = x_1,    y_t = x_t · y_{t-1},

so the model must carry the group element seen so far. The groups:

* ``parity``: Z_2, tokens 0/1, y_t = x_1 + ... + x_t mod 2 (running parity);
* ``mod3``, ``mod5``: Z_3, Z_5, y_t = running sum mod m;
* ``s3``, ``s5``: the permutations of 3 (6 elements) and 5 (120 elements) things, token i being
  the i-th permutation in lexicographic order (0 = identity) and x · y the permutation "first y,
  then x": (x · y)[j] = x[y[j]]. S_5, not a solvable group, is the hardest of these
  (Merrill et al. 2024, "The illusion of state in state-space models").

Lengths L vary between rows (uniform in [min_len, max_len]); rows are padded to max_len with
the padding token |G| and target -100. Training on short rows and testing on longer ones
measures length generalisation (train 3-40, test 40-256 by default: :data:`TRAIN_LENGTHS`,
:data:`TEST_LENGTHS`).
"""
from __future__ import annotations

import functools
import itertools
from dataclasses import dataclass

import torch

from .common import IGNORE, check_int, make_generator

__all__ = ["StateTrackingConfig", "state_tracking", "GROUPS", "group_table", "TRAIN_LENGTHS", "TEST_LENGTHS"]

GROUPS = ("parity", "mod3", "mod5", "s3", "s5")
TRAIN_LENGTHS = (3, 40)
TEST_LENGTHS = (40, 256)


@functools.lru_cache(maxsize=None)
def group_table(group: str) -> torch.Tensor:
    """The multiplication table of ``group``: (|G|, |G|) int64 with ``table[x, y]`` = x · y
    (element 0 is the identity)."""
    if group in ("parity", "mod3", "mod5"):
        m = {"parity": 2, "mod3": 3, "mod5": 5}[group]
        i = torch.arange(m)
        return (i.unsqueeze(1) + i.unsqueeze(0)) % m
    if group in ("s3", "s5"):
        perms = list(itertools.permutations(range(int(group[1]))))
        index = {p: i for i, p in enumerate(perms)}
        return torch.tensor([[index[tuple(x[j] for j in y)] for y in perms] for x in perms])
    raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {group!r}")


@dataclass(frozen=True)
class StateTrackingConfig:
    """One state-tracking setting."""

    group: str = "parity"  # parity | mod3 | mod5 | s3 | s5 (see the module docstring)
    min_len: int = TRAIN_LENGTHS[0]  # shortest row (elements)
    max_len: int = TRAIN_LENGTHS[1]  # longest row; every row is padded to this length

    def __post_init__(self) -> None:
        if self.group not in GROUPS:
            raise ValueError(f"group must be one of {', '.join(GROUPS)}, got {self.group!r}")
        check_int("min_len", self.min_len, 1)
        check_int("max_len", self.max_len, self.min_len)

    @property
    def seq_len(self) -> int:
        """Tokens per (padded) row."""
        return self.max_len

    @property
    def num_elements(self) -> int:
        """|G|: tokens 0 .. |G| - 1 are the elements, token |G| pads."""
        return group_table(self.group).shape[0]

    @property
    def vocab_size(self) -> int:
        """Tokens used: the elements and the padding token."""
        return self.num_elements + 1


def state_tracking(config: StateTrackingConfig, n: int, generator: torch.Generator | int = 0
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` rows of random group elements and their running products: ``(inputs, targets)``,
    both (n, max_len) int64; positions past a row's length hold the padding token |G| and
    target -100."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    table = group_table(c.group)  # (G, G)
    G = table.shape[0]

    # 1. Random elements and a random length per row.
    elements = torch.randint(0, G, (n, c.max_len), generator=g)  # (n, L)
    lengths = torch.randint(c.min_len, c.max_len + 1, (n,), generator=g)  # (n,)

    # 2. The running product y_t = x_t · y_{t-1}, from y_0 = identity.
    products = torch.empty_like(elements)
    y = torch.zeros(n, dtype=torch.int64)
    for t in range(c.max_len):
        y = table[elements[:, t], y]
        products[:, t] = y

    # 3. Pad past each row's length.
    pad = torch.arange(c.max_len).unsqueeze(0) >= lengths.unsqueeze(1)  # (n, L)
    inputs = elements.masked_fill(pad, G)
    targets = products.masked_fill(pad, IGNORE)
    return inputs, targets
