"""Set disjointness with one shared element, plain or read twice (Arora et al. 2024, "Just read
twice: closing the recall gap for recurrent language models").

Two sets of distinct elements that share exactly one element; the model must name it::

    [1] a1 ... aM [2] b1 ... bN [3]                       (plain)
    [1] a1 ... aM [2] b1 ... bN [1] a1 ... aM [2] b1 ... bN [3]   (JRT: the context twice)

with the target at ``[3]`` the shared element and nothing else scored. A recurrent model reading
the context once must decide what to keep of the first set before it sees the second, so it does
better when the first set is the short one; reading twice lets it see the second set before the
first comes again. ``short_first`` puts the short set first or second, ``jrt`` repeats the context.

Token ids: elements [0, n_elements), ``[1]`` = n_elements, ``[2]`` = n_elements + 1,
``[3]`` = n_elements + 2.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from .common import IGNORE, check_int, distinct, make_generator

__all__ = ["SetDisjointnessConfig", "set_disjointness"]


@dataclass(frozen=True)
class SetDisjointnessConfig:
    """One set-disjointness setting."""

    short_len: int = 4  # elements in the short set
    long_len: int = 16  # elements in the long set
    n_elements: int = 64  # distinct element tokens (at least short_len + long_len - 1)
    short_first: bool = True  # the short set comes first (False: the long set first)
    jrt: bool = False  # give the context twice ("just read twice") before the question

    def __post_init__(self) -> None:
        check_int("short_len", self.short_len, 1)
        check_int("long_len", self.long_len, self.short_len)
        check_int("n_elements", self.n_elements, self.short_len + self.long_len - 1)
        for name in ("short_first", "jrt"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be a bool, got {getattr(self, name)!r}")

    @property
    def seq_len(self) -> int:
        """Tokens per example: ([1] A [2] B) once or twice, then [3]."""
        return (2 + self.short_len + self.long_len) * (2 if self.jrt else 1) + 1

    @property
    def vocab_size(self) -> int:
        """Tokens used: the elements and the three markers."""
        return self.n_elements + 3


def set_disjointness(config: SetDisjointnessConfig, n: int, generator: torch.Generator | int = 0
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """``n`` examples: ``(inputs, targets)``, both (n, seq_len) int64, targets -100 except at the
    last position, which holds the one element the two sets share."""
    c = config
    check_int("n", n, 1)
    g = make_generator(generator)
    S, L, E = c.short_len, c.long_len, c.n_elements
    rows = torch.arange(n).unsqueeze(1)  # (n, 1)

    # 1. S + L - 1 distinct elements per row: the short set, and all but one of the long set.
    drawn = distinct(n, E, S + L - 1, g)  # (n, S + L - 1)
    short = drawn[:, :S]  # (n, S)
    shared = short[rows, torch.randint(0, S, (n, 1), generator=g)]  # (n, 1): an element of the short set

    # 2. The long set: the other L - 1 elements and the shared one, shuffled.
    long = torch.cat([drawn[:, S:], shared], dim=1)  # (n, L)
    long = long[rows, torch.rand(n, L, generator=g).argsort(dim=1)]

    # 3. [1] first [2] second (twice for JRT) [3], scored at [3] only.
    first, second = (short, long) if c.short_first else (long, short)
    mark = lambda token: torch.full((n, 1), token, dtype=torch.int64)  # noqa: E731
    context = torch.cat([mark(E), first, mark(E + 1), second], dim=1)
    inputs = torch.cat([context] * (2 if c.jrt else 1) + [mark(E + 2)], dim=1)
    targets = torch.full_like(inputs, IGNORE)
    targets[:, -1] = shared.squeeze(1)
    return inputs, targets
