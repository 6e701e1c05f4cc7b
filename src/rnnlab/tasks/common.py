"""What every task generator shares: seeds, argument checks, distinct draws, the unscored label.

A generator returns ``(inputs, targets)``, both (N, T) int64: ``targets[i, t]`` is the token the
model must predict after reading ``inputs[i, :t + 1]``, or :data:`IGNORE` (-100) where nothing is
scored (the convention of ``torch.nn.functional.cross_entropy`` and :func:`rnnlab.train.train`).
"""
from __future__ import annotations

import hashlib

import torch

__all__ = ["IGNORE", "make_generator", "derive_seed", "check_int", "distinct"]

IGNORE = -100  # the target of a position that is not scored


def make_generator(seed: int | torch.Generator) -> torch.Generator:
    """A CPU ``torch.Generator``: ``seed`` itself when it is one, else a new one seeded with it."""
    if isinstance(seed, torch.Generator):
        return seed
    if isinstance(seed, bool) or not isinstance(seed, int) or seed < 0:
        raise ValueError(f"generator must be a torch.Generator or an int seed >= 0, got {seed!r}")
    return torch.Generator().manual_seed(seed)


def derive_seed(*parts: object) -> int:
    """A seed in [0, 2^63) that depends on every part (e.g. ``derive_seed(0, "train", 17)``), so
    that streams named differently never share random numbers."""
    digest = hashlib.sha256(repr(parts).encode()).digest()
    return int.from_bytes(digest[:8], "little") >> 1


def check_int(name: str, value: object, minimum: int) -> None:
    """Raise ValueError naming ``name`` unless ``value`` is an int >= ``minimum``."""
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")


def distinct(n: int, m: int, k: int, generator: torch.Generator) -> torch.Tensor:
    """``k`` distinct integers drawn uniformly from [0, m) for each of ``n`` rows, in random
    order: (n, k) int64 (the ``k`` largest of ``m`` uniform numbers per row)."""
    if not 0 <= k <= m:
        raise ValueError(f"cannot draw k={k} distinct values from m={m}")
    return torch.rand(n, m, generator=generator).topk(k, dim=1).indices
