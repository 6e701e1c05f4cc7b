"""Mega (chunked) against a token-by-token transcription of the paper's equations (float64)."""
import math

import pytest
import torch
import torch.nn.functional as F

import rnnlab


def rot(vec, i):
    """Mega's rotary embedding of a vector at position i (rotate-half, base 10000)."""
    half = vec.shape[0] // 2
    freq = torch.exp(-math.log(10000) / half * torch.arange(half, dtype=torch.float64))
    cos, sin = torch.cos(i * freq), torch.sin(i * freq)
    v1, v2 = vec[:half], vec[half:]
    return torch.cat([v1 * cos - v2 * sin, v2 * cos + v1 * sin])


def paper_loop(m, x):
    """Ma et al. 2023, eqs. (3), (13)-(21) with attention inside chunks of c tokens, from the start
    of the sequence: returns the outputs (B, T, D) and the final (h, the current chunk's keys and values)."""
    c = m.config
    B, T, D = x.shape
    alpha, delta = torch.sigmoid(m.ema_alpha), torch.sigmoid(m.ema_delta)  # (D, N)
    h = torch.zeros(B, D, c.ndim, dtype=torch.float64)
    keys, vals, ys = [], [], []
    for p in range(T):
        xt = x[:, p]
        # damped multi-dimensional EMA: h_t = α β x_t + (1 - α δ) h_{t-1}, y = Σ_n η h / sqrt(N)
        h = alpha * m.ema_beta * xt[..., None] + (1 - alpha * delta) * h
        xe = F.silu((m.ema_eta * h).sum(-1) / math.sqrt(c.ndim) + m.ema_omega * xt)  # X'
        u, z, r, hx = (xe @ m.mx_proj.weight.T + m.mx_proj.bias).split([D, c.z_dim, c.v_dim, D], -1)
        z, r, u = F.silu(z), F.silu(r), torch.sigmoid(u)
        q, k = z * m.qk_scale[0] + m.qk_offset[0], z * m.qk_scale[1] + m.qk_offset[1]
        v = F.silu(xt @ m.v_proj.weight.T + m.v_proj.bias)
        if p % c.chunk_size == 0:  # a new chunk starts
            keys, vals = [], []
        keys.append(k)
        vals.append(v)
        i = p % c.chunk_size
        scores = torch.stack([(q * kj).sum(-1) / math.sqrt(c.z_dim) + rot(m.rel_pos_a, i) @ rot(m.rel_pos_b, j)
                              for j, kj in enumerate(keys)], -1)  # (B, i+1)
        o = (torch.softmax(scores, -1)[..., None] * torch.stack(vals, 1)).sum(1)  # (B, V)
        hid = F.silu(hx + (r * o) @ m.h_proj.weight.T + m.h_proj.bias)
        ys.append(u * hid)
    return torch.stack(ys, 1), h, keys, vals


@pytest.mark.parametrize("chunk_size,cut", [(5, 7), (4, 8), (16, 3), (1, 4)])
def test_mega_matches_paper_equations(chunk_size, cut):
    torch.manual_seed(0)
    D = 6
    m = rnnlab.build_mixer("mega", d_model=D, ndim=3, z_dim=4, v_dim=5, chunk_size=chunk_size).double()
    with torch.no_grad():  # every parameter away from its init (zero offsets, tiny scales)
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 30, D, dtype=torch.float64)
    y_ref, h, keys, vals = paper_loop(m, x)
    y1, s1 = m(x[:, :cut])  # a prefix, then the rest from its state (chunks continue across the cut)
    y2, s2 = m(x[:, cut:], s1)
    y = torch.cat([y1, y2], 1)
    left = 30 % chunk_size
    dy = (y - y_ref).abs().max().item()
    dh = (s2.h - h).abs().max().item()
    dk = (s2.k[:, :left] - torch.stack(keys, 1)[:, :left]).abs().max().item() if left else 0.0
    dv = (s2.v[:, :left] - torch.stack(vals, 1)[:, :left]).abs().max().item() if left else 0.0
    print(f"mega(c={chunk_size}) vs paper equations: max |dy| {dy:.2e}, |dh| {dh:.2e}, |dk| {dk:.2e}, |dv| {dv:.2e}")
    assert max(dy, dh, dk, dv) < 1e-10
    assert s2.seen.tolist() == [30, 30]
    assert (s2.k[:, left:] == 0).all() and (s2.v[:, left:] == 0).all()
    y_one, _ = m(x)  # one call
    torch.testing.assert_close(y_one, y_ref, rtol=0, atol=1e-10)


def test_mega_rows_at_different_positions():
    """A ragged batch (rows of the state at different positions in their chunks) equals each row alone."""
    torch.manual_seed(1)
    m = rnnlab.build_mixer("mega", d_model=6, ndim=2, z_dim=4, v_dim=5, chunk_size=4).double()
    rows = [m(torch.randn(1, n, 6, dtype=torch.float64))[1] for n in (1, 6, 8)]
    s0 = type(rows[0]).cat(rows)
    x = torch.randn(3, 9, 6, dtype=torch.float64)
    for T in (1, 9):  # one token (one chunk per row) and several chunks
        y, s = m(x[:, :T], s0)
        for b in range(3):
            y_b, s_b = m(x[b:b + 1, :T], rows[b])
            torch.testing.assert_close(y[b:b + 1], y_b, rtol=0, atol=1e-12)
            for name, t in s_b.tensors().items():
                torch.testing.assert_close(s.tensors()[name][b:b + 1], t, rtol=0, atol=1e-12)


def test_mega_config_and_state_size():
    m = rnnlab.build_mixer("mega", d_model=16)
    c = m.config
    assert (c.ndim, c.z_dim, c.v_dim, c.chunk_size) == (16, 128, 32, 1024)
    assert m.state_size() == 4 * (16 * 16 + 1023 * (128 + 32)) + 8
    with pytest.raises(ValueError, match="z_dim"):
        rnnlab.build_mixer("mega", d_model=16, z_dim=7)
    with pytest.raises(ValueError, match="chunk_size"):
        rnnlab.build_mixer("mega", d_model=16, chunk_size=0)
    with pytest.raises(ValueError, match="ndim"):
        rnnlab.build_mixer("mega", d_model=16, ndim=0)


def test_mega_gradients_match_paper_equations():
    """Gradients of the input and of every parameter: the layer (chunked attention, EMA on the LTI
    ops, from a state mid-chunk) against the loop, float64."""
    torch.manual_seed(2)
    m = rnnlab.build_mixer("mega", d_model=6, ndim=3, z_dim=4, v_dim=5, chunk_size=4).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 19, 6, dtype=torch.float64, requires_grad=True)
    cot = torch.randn(2, 19, 6, dtype=torch.float64)
    y_ref = paper_loop(m, x)[0]
    g_ref = torch.autograd.grad((y_ref * cot).sum(), [x, *m.parameters()])
    y1, s1 = m(x[:, :6])
    y2, _ = m(x[:, 6:], s1)
    g = torch.autograd.grad((torch.cat([y1, y2], 1) * cot).sum(), [x, *m.parameters()])
    dg = max((a - b).abs().max().item() for a, b in zip(g, g_ref))
    print(f"mega gradients vs paper equations: max diff {dg:.2e}")
    assert dg < 1e-10
