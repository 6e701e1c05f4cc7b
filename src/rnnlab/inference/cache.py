"""KV-cache policies chosen at inference time: stream a model trained with full attention through
a sliding window, with or without attention sinks (StreamingLLM, Xiao et al. 2023), no retraining.

A policy is ``full``, ``window=W`` or ``sinks=S,window=W``. :func:`with_cache` returns a model that
shares every weight with the given one (no copy) and whose attention layers (``attention`` and
``swa`` blocks) use the policy: a window keeps the last W tokens; sinks keep the first S tokens for
ever, with positions assigned within the cache as StreamingLLM does (see ``layers/attention.py``).
The returned model's config names the policy in its layout, so a state saved from it is tied to it.
"""
from __future__ import annotations

import re
from dataclasses import dataclass

from ..models.lm import LM
from .mitigation import with_mixer_options

__all__ = ["CachePolicy", "parse_cache", "with_cache"]

_ATTENTION = ("attention", "swa")


@dataclass(frozen=True)
class CachePolicy:
    """Which keys and values an attention layer keeps while streaming."""

    window: int | None = None  # keep the last `window` tokens (None: all of them)
    sinks: int = 0  # and the first `sinks` tokens for ever (needs a window)

    def __post_init__(self) -> None:
        if self.window is not None and (not isinstance(self.window, int) or self.window < 1):
            raise ValueError(f"cache window must be an int >= 1, got {self.window!r}")
        if not isinstance(self.sinks, int) or self.sinks < 0 or (self.sinks and self.window is None):
            raise ValueError(f"cache sinks must be an int >= 0 and need a window, got sinks={self.sinks!r}")

    def __str__(self) -> str:
        if self.window is None:
            return "full"
        return f"sinks={self.sinks},window={self.window}" if self.sinks else f"window={self.window}"


def parse_cache(text: str) -> CachePolicy:
    """``"full"``, ``"window=W"`` or ``"sinks=S,window=W"`` (in any order) as a :class:`CachePolicy`."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError(f"cache policy must be 'full', 'window=W' or 'sinks=S,window=W', got {text!r}")
    if text.strip() == "full":
        return CachePolicy()
    fields = {}
    for part in text.split(","):
        m = re.fullmatch(r"\s*(window|sinks)\s*=\s*(\d+)\s*", part)
        if not m or m.group(1) in fields:
            raise ValueError(f"cache policy {text!r}: expected 'full', 'window=W' or 'sinks=S,window=W'")
        fields[m.group(1)] = int(m.group(2))
    return CachePolicy(window=fields.get("window"), sinks=fields.get("sinks", 0))


def with_cache(model: LM, cache: str | CachePolicy) -> LM:
    """``model`` with every attention layer streaming under ``cache``, for inference: it reads the
    same weight tensors (no copy; gradients do not reach ``model``)."""
    policy = parse_cache(cache) if isinstance(cache, str) else cache
    if not isinstance(model, LM):
        raise TypeError(f"model must be an rnnlab LM, got {type(model).__name__}")
    if all(spec.name not in _ATTENTION for spec in model.config.blocks):
        raise ValueError(f"cache policy {policy}: the model ({model.config.layout!r}) has no attention layer")
    return with_mixer_options(model, {i: dict(window=policy.window, sinks=policy.sinks)
                                      for i, spec in enumerate(model.config.blocks) if spec.name in _ATTENTION})
