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


def assert_matches_loop(label, layer, y, S, y_ref, S_ref):
    """The layer's outputs y and final state S against the loop's (float64), then the gradients
    of every parameter through both (a random weighting of y plus the sum of S)."""
    dy, dS = (y - y_ref).abs().max().item(), (S - S_ref).abs().max().item()
    print(f"{label} vs paper equations: max |dy| {dy:.2e}, max |dS| {dS:.2e}")
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(S, S_ref, atol=1e-10, rtol=1e-8)
    w = torch.randn_like(y)
    g = torch.autograd.grad((y * w).sum() + S.sum(), list(layer.parameters()))
    g_ref = torch.autograd.grad((y_ref * w).sum() + S_ref.sum(), list(layer.parameters()))
    dg = max((a - b).abs().max().item() for a, b in zip(g, g_ref))
    print(f"{label} parameter gradients vs paper equations: max diff {dg:.2e}")
    for (name, _), a, b in zip(layer.named_parameters(), g, g_ref):
        torch.testing.assert_close(a, b, atol=1e-9, rtol=1e-7, msg=lambda m, n=name: f"{n}: {m}")
