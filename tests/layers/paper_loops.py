"""Pieces of the paper-equation loops shared by the layer tests, written out token by token."""
import torch
import torch.nn.functional as F


def conv_silu(conv, seq, t):
    """Causal depthwise convolution of seq (B, T, C) at step t (zeros before the start), then SiLU;
    ``conv`` is a ShortConv or its weight (C, W)."""
    w = conv if isinstance(conv, torch.Tensor) else conv.conv.weight[:, 0]  # (C, W)
    W = w.shape[1]
    acc = torch.zeros_like(seq[:, 0])
    for j in range(W):
        s = t - (W - 1) + j
        if s >= 0:
            acc = acc + w[:, j] * seq[:, s]
    return F.silu(acc)


def rmsnorm(x, weight, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * weight
