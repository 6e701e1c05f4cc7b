"""sLSTM against a token-by-token transcription of xLSTM (Beck et al. 2024), eqs. (8)-(17)."""
import math

import pytest
import torch
import torch.nn.functional as F

from rnnlab.layers.slstm import SLSTM, SLSTMConfig


def _conv_silu(m: SLSTM, x):
    """Causal depthwise conv of width W with bias, then SiLU, written as a sum over taps."""
    w, b = m.conv.conv.weight[:, 0], m.conv.conv.bias  # (D, W), (D,)
    W = w.shape[1]
    xp = F.pad(x, (0, 0, W - 1, 0))
    out = sum(xp[:, j:j + x.shape[1]] * w[:, j] for j in range(W)) + b
    return F.silu(out)


def reference_slstm(m: SLSTM, x, stabilised=True):
    """The sLSTM from the start (zero state). With ``stabilised=False``: the plain eqs. (8)-(13),
    i = exp(i~), f = σ(f~), no m (float64, short sequences only). With ``stabilised=True``: eqs.
    (15)-(17), m_t = max(log f_t + m_{t-1}, log i_t), and the reference's first step m_1 = i~_1.
    Returns (y, h, c, n, m) after the last token."""
    c_ = m.config
    B, T, D = x.shape
    H, K = c_.num_heads, c_.head_dim
    xc = _conv_silu(m, x) if m.conv is not None else x
    R = [torch.block_diag(*[m.R[h, :, g, :] for h in range(H)]) for g in range(4)]  # (D, D) each
    Wd = [torch.block_diag(*[m.W[g, h] for h in range(H)]) for g in range(4)]
    b = m.bias.permute(1, 0, 2).reshape(4, D)  # (gate, D)
    h = torch.zeros(B, D, dtype=x.dtype)
    c = torch.zeros_like(h)
    n = torch.zeros_like(h)
    mm = torch.zeros_like(h)
    ys = []
    for t in range(T):
        i_raw = xc[:, t] @ Wd[0] + h @ R[0] + b[0]
        f_raw = xc[:, t] @ Wd[1] + h @ R[1] + b[1]
        z = torch.tanh(x[:, t] @ Wd[2] + h @ R[2] + b[2])
        o = torch.sigmoid(x[:, t] @ Wd[3] + h @ R[3] + b[3])
        if stabilised:
            log_f = F.logsigmoid(f_raw)
            m_new = i_raw if t == 0 else torch.maximum(log_f + mm, i_raw)
            i = torch.exp(i_raw - m_new)
            f = torch.exp(log_f + mm - m_new) if t else torch.zeros_like(i)
            mm = m_new
        else:
            i, f = torch.exp(i_raw), torch.sigmoid(f_raw)
        c = f * c + i * z
        n = f * n + i
        h = o * c / n
        hh = h.view(B, H, K)
        gn = (hh - hh.mean(-1, keepdim=True)) / torch.sqrt(hh.var(-1, unbiased=False, keepdim=True) + c_.norm_eps)
        ys.append(gn.reshape(B, D) * (1 + m.norm_weight))
    return torch.stack(ys, 1), h, c, n, mm


def _layer(seed=0, **kw):
    torch.manual_seed(seed)
    m = SLSTM(SLSTMConfig(d_model=12, num_heads=3, **kw)).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.5 * torch.randn_like(p))  # R nonzero, varied gates
    return m


@pytest.mark.parametrize("parallel", [False, True])
@pytest.mark.parametrize("conv_size", [4, 0])
def test_slstm_matches_paper(parallel, conv_size):
    m = _layer(conv_size=conv_size, parallel=parallel)
    x = torch.randn(2, 30, 12, dtype=torch.float64)
    y, s = m(x)
    y_ref, h, c, n, mm = reference_slstm(m, x, stabilised=True)
    torch.testing.assert_close(y, y_ref, rtol=1e-9, atol=1e-9)
    for name, ref in dict(h=h, c=c, n=n, m=mm).items():
        torch.testing.assert_close(getattr(s, name).reshape(2, -1), ref, rtol=1e-9, atol=1e-9, msg=name)
    # the stabiliser changes nothing but the scale of c and n: plain exponential gating agrees
    y_plain, h_plain, c_plain, n_plain, _ = reference_slstm(m, x, stabilised=False)
    torch.testing.assert_close(y, y_plain, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(s.c.reshape(2, -1) * s.m.reshape(2, -1).exp(), c_plain, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype,tol", [(torch.float64, 1e-8), (torch.float32, 1e-4)])
def test_newton_matches_sequential_long(dtype, tol):
    """Newton-parallel == sequential at T = 1024, forward and gradients. float32: the Newton
    residual bottoms out near 3e-6 (rounding in log n); over a long memory that leaves ~1e-6 in h,
    which the per-head LayerNorm over K = 4 units amplifies to ~3e-5 in y: hence 1e-4 on y and the
    gradients, 1e-5 on the hidden state."""
    torch.manual_seed(0)
    m = SLSTM(SLSTMConfig(d_model=8, num_heads=2, parallel=True)).to(dtype)
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 1024, 8, dtype=dtype)
    _, s0 = m(torch.randn(2, 5, 8, dtype=dtype))
    s0 = s0.detach()

    def run():
        m.zero_grad()
        y, s = m(x, s0)
        (y * torch.randn_like(y, generator=torch.Generator().manual_seed(1))).sum().backward()
        return y.detach(), s.h.detach(), {n: p.grad.clone() for n, p in m.named_parameters()}

    y_par, h_par, g_par = run()
    m.config.parallel = False
    y_seq, h_seq, g_seq = run()
    torch.testing.assert_close(y_par, y_seq, rtol=tol, atol=tol)
    torch.testing.assert_close(h_par, h_seq, rtol=tol / 10, atol=tol / 10)
    for n in g_seq:
        scale = g_seq[n].abs().max().item()
        assert (g_par[n] - g_seq[n]).abs().max().item() <= tol * max(1.0, scale), n


def test_init_follows_reference():
    m = SLSTM(SLSTMConfig(d_model=32, num_heads=4))
    assert (m.R == 0).all() and (m.norm_weight == 0).all()
    fb = m.bias[:, 1]
    assert fb[0, 0].item() == pytest.approx(5.0) and fb[0, -1].item() == pytest.approx(-7.0)
    assert m.W.std().item() == pytest.approx(math.sqrt(2 / (5 * 32)), rel=0.15)  # small init, D = d_model as xLSTM


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="num_heads"):
        SLSTMConfig(d_model=12, num_heads=5)
    with pytest.raises(ValueError, match="conv_size"):
        SLSTMConfig(d_model=12, conv_size=-1)
    with pytest.raises(ValueError, match="head_dim=1"):
        SLSTMConfig(d_model=12, num_heads=12)


def test_newton_rejects_heads_too_large_for_its_jacobians():
    with pytest.raises(ValueError, match="parallel=False"):
        SLSTMConfig(d_model=256, num_heads=4, parallel=True)  # S = 3 · 64 = 192
    SLSTMConfig(d_model=256, num_heads=16, parallel=True)  # S = 48
