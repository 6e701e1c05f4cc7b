"""Model FLOPs per token and the machine's matrix-multiply peak, for model FLOPs utilisation (MFU).

FLOPs per training token follow the usual accounting (Kaplan et al. 2020; PaLM's MFU): 6 per
parameter in a matrix product (2 forward, 4 backward), plus the sequence mixing itself — for
softmax attention 6·2·d·L over the L keys a query sees on average (L = T/2 causal, or the window),
for a recurrent mixer 6·2 per state entry (one write and one read of the state per token). The
embedding lookup is free; the output head is a matrix product and counted. MFU is achieved
FLOP/s over the peak of ``torch.mm`` measured here, so it says how much of what the machine can
do the model uses.
"""
from __future__ import annotations

import functools
import time

import torch
from torch import nn

__all__ = ["flops_per_token", "matmul_peak"]


def flops_per_token(model: nn.Module, seq_len: int, training: bool = True) -> float:
    """FLOPs per token of ``model`` (an :class:`rnnlab.LM`) at sequence length ``seq_len``:
    forward+backward when ``training`` (3x the forward)."""
    from ..models.lm import LM
    if not isinstance(model, LM):
        raise TypeError(f"model must be an rnnlab LM, got {type(model).__name__}")
    matmul_params = sum(m.weight.numel() for m in model.modules() if isinstance(m, nn.Linear))
    fwd = 2.0 * matmul_params
    for block in model.blocks:
        mixer = block.mixer
        if mixer is None:
            continue
        if mixer.recurrent:
            fwd += 2.0 * 2 * mixer.state_size(1, torch.float32) / 4  # write and read every state entry
        else:
            window = getattr(mixer.config, "window", None)
            ctx = min(seq_len / 2, window) if window else seq_len / 2
            fwd += 2.0 * 2 * model.config.d_model * ctx  # q·k and p·v over the keys seen
    return 3 * fwd if training else fwd


@functools.lru_cache(maxsize=None)
def _peak(device: str, dtype: torch.dtype, n: int) -> float:
    dev = torch.device(device)
    a = torch.randn(n, n, device=dev, dtype=dtype)
    b = torch.randn(n, n, device=dev, dtype=dtype)
    sync = torch.cuda.synchronize if dev.type == "cuda" else (lambda: None)
    best = float("inf")
    for _ in range(5):
        sync()
        t0 = time.perf_counter()
        torch.mm(a, b)
        sync()
        best = min(best, time.perf_counter() - t0)
    return 2.0 * n ** 3 / best


def matmul_peak(device: torch.device | str = "cpu", dtype: torch.dtype = torch.float32) -> float:
    """FLOP/s of a square ``torch.mm`` on ``device`` (best of 5, measured once per process)."""
    dev = torch.device(device)
    return _peak(str(dev), dtype, 1024 if dev.type == "cpu" else 4096)
