"""Evaluation: mean loss over scored tokens, loss by position in the context at several lengths
(does the model use long context? does it extrapolate past its training length?), and plots.

Losses are in nats per scored token; bits = nats / ln 2 (bits per byte with the byte tokenizer).
"""
from __future__ import annotations

import math
import os
from typing import Iterable

import torch
import torch.nn.functional as F
from torch import nn

from ..models.lm import atomic_write

__all__ = ["evaluate", "batch_logits", "loss_by_position", "plot_losses", "plot_loss_by_position"]


def _autocast(device: torch.device, autocast: str | None):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast == "bf16")


def batch_logits(model: nn.Module, x: torch.Tensor, cu_seqlens: torch.Tensor | None = None) -> torch.Tensor:
    """Logits (B, T, V) of ``model`` on tokens ``x`` (B, T); with ``cu_seqlens`` (the boundaries of
    the rows flattened into one packed row, as :func:`rnnlab.data.document_bounds` makes them)
    the rows are run as one packed row and no state crosses a boundary."""
    if cu_seqlens is None:
        return model(x)[0]
    B, T = x.shape
    logits, _ = model(x.reshape(1, B * T), cu_seqlens=cu_seqlens)  # (1, B·T, V)
    return logits.reshape(B, T, -1)


@torch.no_grad()
def evaluate(model: nn.Module, batches: Iterable[tuple[torch.Tensor, ...]],
             autocast: str | None = None) -> dict:
    """Mean loss of ``model`` over the scored targets (``y != -100``) of ``batches``, a finite
    iterable of ``(x, y)`` (B, T) int64 pairs, or ``(x, y, cu_seqlens)`` for rows of packed
    documents (see :func:`batch_logits`). Returns ``{"loss", "bits", "tokens"}``."""
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros((), dtype=torch.float64, device=device)
    count = torch.zeros((), dtype=torch.int64, device=device)
    for x, y, *bounds in batches:
        x, y = x.to(device), y.to(device)
        with _autocast(device, autocast):
            logits = batch_logits(model, x, bounds[0].to(device) if bounds else None)
        total += F.cross_entropy(logits.float().flatten(0, 1), y.flatten(), ignore_index=-100, reduction="sum")
        count += (y != -100).sum()
    model.train(was)
    n = int(count)
    if n == 0:
        raise ValueError("evaluate: the batches hold no scored target (all y are -100, or no batch)")
    loss = float(total) / n
    return {"loss": loss, "bits": loss / math.log(2), "tokens": n}


@torch.no_grad()
def loss_by_position(model: nn.Module, windows: torch.Tensor, batch_size: int = 4,
                     autocast: str | None = None) -> torch.Tensor:
    """Mean loss (nats) at each position of ``windows`` (N, T+1) int64 token windows: row ``t`` of
    the result (T,) is the loss of predicting token t+1 from tokens 0..t, averaged over the N."""
    if windows.dim() != 2 or windows.shape[1] < 2:
        raise ValueError(f"windows must be (N, T+1) with T >= 1, got {tuple(windows.shape)}")
    was = model.training
    model.eval()
    device = next(model.parameters()).device
    total = torch.zeros(windows.shape[1] - 1, dtype=torch.float64, device=device)
    for i in range(0, windows.shape[0], batch_size):
        w = windows[i:i + batch_size].to(device)
        with _autocast(device, autocast):
            logits, _ = model(w[:, :-1])
        nll = F.cross_entropy(logits.float().transpose(1, 2), w[:, 1:], reduction="none")  # (b, T)
        total += nll.sum(0)
    model.train(was)
    return (total / windows.shape[0]).cpu()


def _pyplot():
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        return plt
    except ImportError:
        print("matplotlib is not installed: no plot (pip install 'rnnlab[plot]')")
        return None


def plot_losses(history: list[dict], path: str | os.PathLike) -> bool:
    """Training loss and validation loss (in bits per token) against steps, to ``path`` (PNG).
    Returns False (with a notice) when matplotlib is not installed."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot([h["step"] for h in history], [h["loss"] / math.log(2) for h in history], lw=0.8, label="train")
    ev = [h for h in history if "val_bits" in h]
    ax.plot([h["step"] for h in ev], [h["val_bits"] for h in ev], "o-", label="validation")
    ax.set_xlabel("step")
    ax.set_ylabel("bits per token (per byte for bytes)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return True


def plot_loss_by_position(curves: dict[int, torch.Tensor], train_len: int, path: str | os.PathLike,
                          title: str = "") -> bool:
    """Loss (bits) against position, one line per evaluated length, smoothed over windows of 1/64
    of each length, with the training length marked; to ``path`` (PNG). False without matplotlib."""
    plt = _pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(6.5, 3.8))
    for length, curve in sorted(curves.items()):
        bits = curve.double() / math.log(2)
        w = max(1, len(bits) // 64)
        smooth = bits.unfold(0, w, w).mean(1) if w > 1 else bits
        pos = torch.arange(len(smooth)) * w + (w + 1) / 2
        ax.plot(pos.numpy(), smooth.numpy(), lw=1.0, label=f"T = {length}")
    ax.axvline(train_len, color="k", ls="--", lw=0.8, label="training length")
    ax.set_xscale("log")
    ax.set_xlabel("position in the context")
    ax.set_ylabel("loss (bits per token)")
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3, which="both")
    ax.legend(fontsize=8)
    fig.tight_layout()
    atomic_write(path, lambda p: fig.savefig(p, dpi=120, format="png"))
    plt.close(fig)
    return True
