"""Scoring a model on a task: accuracy over the scored positions and exact match per example.

A prediction is the argmax of the model's logits at a position; only positions whose target is
not -100 count. ``accuracy`` is the fraction of scored positions predicted exactly; an example is
an exact match when all of its scored positions are.
"""
from __future__ import annotations

import torch
from torch import nn

from .common import IGNORE, check_int

__all__ = ["predict", "accuracy", "exact_match", "evaluate_task"]


def _check_pair(inputs: torch.Tensor, targets: torch.Tensor) -> None:
    for name, t in (("inputs", inputs), ("targets", targets)):
        if not isinstance(t, torch.Tensor) or t.dtype != torch.int64 or t.dim() != 2:
            raise ValueError(f"{name} must be a (N, T) int64 tensor, got "
                             f"{getattr(t, 'dtype', type(t).__name__)} of shape {tuple(getattr(t, 'shape', ()))}")
    if inputs.shape != targets.shape:
        raise ValueError(f"inputs {tuple(inputs.shape)} and targets {tuple(targets.shape)} must have the same shape")


@torch.no_grad()
def predict(model: nn.Module, inputs: torch.Tensor, batch_size: int = 256) -> torch.Tensor:
    """The argmax prediction of ``model`` at every position: inputs (N, T) -> (N, T) int64 (on
    the CPU), computed ``batch_size`` rows at a time on the model's device in eval mode."""
    check_int("batch_size", batch_size, 1)
    was_training = model.training
    model.eval()
    device = next(model.parameters()).device
    out = []
    for chunk in inputs.split(batch_size):
        logits, _ = model(chunk.to(device))
        out.append(logits.argmax(dim=-1).cpu())
    model.train(was_training)
    return torch.cat(out)


def accuracy(predictions: torch.Tensor, targets: torch.Tensor) -> float:
    """Fraction of scored positions (targets != -100) where predictions (N, T) equal targets
    (N, T); NaN when nothing is scored."""
    _check_pair(predictions, targets)
    scored = targets != IGNORE
    n = int(scored.sum())
    return float((predictions == targets)[scored].sum()) / n if n else float("nan")


def exact_match(predictions: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Per example (N,) bool: every scored position of the row predicted exactly (rows with no
    scored position count as matched)."""
    _check_pair(predictions, targets)
    return ((predictions == targets) | (targets == IGNORE)).all(dim=1)


def evaluate_task(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, batch_size: int = 256) -> dict:
    """Score ``model`` on one task's ``(inputs, targets)`` (N, T) int64: ``{"accuracy": fraction of
    scored positions right, "exact_match": fraction of examples entirely right, "scored": scored
    positions, "examples": N}``."""
    _check_pair(inputs, targets)
    predictions = predict(model, inputs, batch_size)
    return {"accuracy": accuracy(predictions, targets),
            "exact_match": float(exact_match(predictions, targets).float().mean()),
            "scored": int((targets != IGNORE).sum()), "examples": inputs.shape[0]}
