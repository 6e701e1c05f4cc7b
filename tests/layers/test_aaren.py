"""Aaren against a direct transcription of "Attention as an RNN" (Feng et al. 2024)."""
import math

import pytest
import torch

from rnnlab.layers.aaren import Aaren, AarenConfig


def reference_aaren(m: Aaren, x):
    """o_t = softmax over i <= t of (q . k_i / sqrt(K)) applied to v_i, per head, one token at a time
    (the many-to-many RNN of the paper, Sec. 3.2, written as the plain prefix softmax)."""
    c = m.config
    B, T, _ = x.shape
    k = m.k_proj(x).view(B, T, c.num_heads, c.head_dim)
    v = m.v_proj(x).view(B, T, c.num_heads, c.head_dim)
    out = torch.zeros(B, T, c.num_heads, c.head_dim, dtype=x.dtype)
    for t in range(T):
        for h in range(c.num_heads):
            s = k[:, : t + 1, h] @ m.query[h] / math.sqrt(c.head_dim)  # (B, t+1)
            out[:, t, h] = (torch.softmax(s, dim=1)[..., None] * v[:, : t + 1, h]).sum(1)
    return m.o_proj(out.reshape(B, T, -1))


def reference_state(m: Aaren, x):
    """The paper's RNN cell state after x: (max m, denominator u, numerator w) built token by token
    with the cell's update rule (Sec. 3.1): m_k = max(m_{k-1}, s_k), u_k = u_{k-1} e^{m_{k-1}-m_k}
    + e^{s_k - m_k}, w_k = w_{k-1} e^{m_{k-1}-m_k} + v_k e^{s_k - m_k}."""
    c = m.config
    B, T, _ = x.shape
    k = m.k_proj(x).view(B, T, c.num_heads, c.head_dim)
    v = m.v_proj(x).view(B, T, c.num_heads, c.head_dim)
    s = torch.einsum("bthk,hk->bth", k, m.query) / math.sqrt(c.head_dim)
    mm, u, w = s[:, 0], torch.ones_like(s[:, 0]), v[:, 0]
    for t in range(1, T):
        new = torch.maximum(mm, s[:, t])
        u = u * torch.exp(mm - new) + torch.exp(s[:, t] - new)
        w = w * torch.exp(mm - new)[..., None] + v[:, t] * torch.exp(s[:, t] - new)[..., None]
        mm = new
    return mm, u, w


@pytest.mark.parametrize("heads", [1, 3])
def test_aaren_matches_paper(heads):
    torch.manual_seed(0)
    m = Aaren(AarenConfig(d_model=12, num_heads=heads)).double()
    with torch.no_grad():
        m.query.mul_(3.0)  # sharp attention: the running max changes often
    x = torch.randn(2, 37, 12, dtype=torch.float64)
    y, s = m(x)
    torch.testing.assert_close(y, reference_aaren(m, x), rtol=1e-9, atol=1e-9)
    mm, u, w = reference_state(m, x)
    torch.testing.assert_close(s.m, mm)
    torch.testing.assert_close(s.u, u)
    torch.testing.assert_close(s.w, w)
    # continuing from the state = attending over the whole prefix
    x2 = torch.randn(2, 9, 12, dtype=torch.float64)
    y2, _ = m(x2, s)
    torch.testing.assert_close(y2, reference_aaren(m, torch.cat([x, x2], 1))[:, 37:], rtol=1e-9, atol=1e-9)


def test_large_scores_do_not_overflow():
    torch.manual_seed(0)
    m = Aaren(AarenConfig(d_model=8, num_heads=2))
    with torch.no_grad():
        m.query.mul_(1e4)
    x = torch.randn(1, 500, 8)
    y, s = m(x)
    assert torch.isfinite(y).all() and torch.isfinite(s.u).all() and (s.u >= 1).all()
    y.sum().backward()
    assert torch.isfinite(m.query.grad).all() and torch.isfinite(m.k_proj.weight.grad).all()


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        AarenConfig(d_model=10, num_heads=3)
    with pytest.raises(ValueError, match="head_dim"):
        AarenConfig(d_model=8, head_dim=0)
