"""Prompting strategies for recurrent models.

**JRT prompting** ("Just read twice", Arora et al. 2024): a recurrent model reads its context once,
left to right, and must decide what to keep in a fixed-size state before it knows the question.
Reading the context twice lets the second pass keep what the first showed to matter. The prompt is
the context ``repeats`` times (joined by ``separator``), then the question — the layout of the
paper's "twice" evaluations, which repeat the document and ask once at the end.
"""
from __future__ import annotations

import torch

__all__ = ["jrt_prompt"]


def jrt_prompt(context: torch.Tensor, question: torch.Tensor | None = None, repeats: int = 2,
               separator: torch.Tensor | None = None) -> torch.Tensor:
    """``context (separator context) x (repeats - 1) question`` along the last dimension.

    Args:
        context: token ids (T,) or (B, T).
        question: token ids (Q,) or (B, Q), or None (context only).
        repeats: how many times the context is read (1 = the plain prompt).
        separator: ids put between two readings, (S,) or (B, S); None = nothing.
    Returns the prompt, (repeats·T + (repeats-1)·S + Q,) or with a leading B.
    """
    if not isinstance(repeats, int) or isinstance(repeats, bool) or repeats < 1:
        raise ValueError(f"repeats must be an int >= 1, got {repeats!r}")
    if not isinstance(context, torch.Tensor) or context.dim() not in (1, 2) or context.shape[-1] == 0:
        raise ValueError("context must be a non-empty (T,) or (B, T) tensor of token ids")
    parts = [context]
    for _ in range(repeats - 1):
        if separator is not None:
            parts.append(separator.expand(*context.shape[:-1], separator.shape[-1]))
        parts.append(context)
    if question is not None:
        if question.dim() != context.dim():
            raise ValueError(f"question must have the context's dims ({context.dim()}), got {tuple(question.shape)}")
        parts.append(question)
    return torch.cat(parts, dim=-1)
