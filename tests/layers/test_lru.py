"""LRU against a token-by-token transcription of the paper's equations."""
import math

import torch

import rnnlab


def test_lru_matches_paper_equations():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("lru", d_model=8, d_state=6).double()
    x = torch.randn(2, 20, 8, dtype=torch.float64)
    lam = torch.exp(-torch.exp(m.nu_log) + 1j * torch.exp(m.theta_log))
    gamma = torch.exp(m.gamma_log)
    B = torch.complex(m.B_re, m.B_im)
    C = torch.complex(m.C_re, m.C_im)
    h = torch.zeros(2, 6, dtype=torch.complex128)
    ys = []
    for t in range(20):
        h = lam * h + gamma * (x[:, t].to(torch.complex128) @ B.T)
        ys.append((h @ C.T).real + m.D * x[:, t])
    y, st = m(x)
    torch.testing.assert_close(y, torch.stack(ys, 1))
    torch.testing.assert_close(st.h, h)


def test_ring_initialisation():
    m = rnnlab.build_mixer("lru", d_model=64, d_state=512, r_min=0.4, r_max=0.8, max_phase=math.pi / 10)
    r = torch.exp(-torch.exp(m.nu_log))
    assert r.min() >= 0.4 - 1e-6 and r.max() <= 0.8 + 1e-6
    assert torch.exp(m.theta_log).max() <= math.pi / 10 + 1e-6
    torch.testing.assert_close(torch.exp(m.gamma_log), torch.sqrt(1 - r ** 2))
