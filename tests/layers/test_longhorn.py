"""Longhorn against a token-by-token transcription of the paper's update."""
import torch
import torch.nn.functional as F

import rnnlab


def test_longhorn_matches_paper_equations():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("longhorn", d_model=8, d_state=5).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    Bsz, T, E, N, R = 2, 19, 16, 5, m.config.dt_rank
    u = torch.randn(Bsz, T, 8, dtype=torch.float64)
    xz = u @ m.in_proj.weight.T
    x, z = xz[..., :E], xz[..., E:]
    w = m.conv1d.conv.weight[:, 0]  # (E, W)
    xpad = torch.cat([torch.zeros(Bsz, 3, E, dtype=torch.float64), x], 1)
    S = torch.zeros(Bsz, E, N, dtype=torch.float64)
    ys = []
    for t in range(T):
        xt = F.silu((xpad[:, t:t + 4] * w.T).sum(1) + m.conv1d.conv.bias)  # (B, E)
        proj = xt @ m.x_proj.weight.T
        dt, k, q = proj[:, :R], proj[:, R:R + N], proj[:, R + N:]
        beta = torch.sigmoid(dt @ m.dt_head.weight.T + m.dt_head.bias)  # (B, E)
        # S_t = (1 - Δ_t ⊗ k_t²) ⊙ S_{t-1} + (Δ_t ⊙ x_t) ⊗ k_t,  Δ_t = β_t / (1 + β_t k_tᵀk_t)
        delta = beta / (1 + beta * (k * k).sum(-1, keepdim=True))
        S = (1 - delta[:, :, None] * (k * k)[:, None, :]) * S + (delta * xt)[:, :, None] * k[:, None, :]
        y = torch.einsum("ben,bn->be", S, q) + m.D * xt
        ys.append((y * F.silu(z[:, t])) @ m.out_proj.weight.T)
    out, st = m(u)
    torch.testing.assert_close(out, torch.stack(ys, 1))
    torch.testing.assert_close(st.S, S)
    torch.testing.assert_close(st.conv, x[:, -3:])
