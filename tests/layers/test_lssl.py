"""LSSL against a token-by-token transcription of the paper's equations."""
import math

import torch
import torch.nn.functional as F

import rnnlab


def test_lssl_matches_paper_equations():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("lssl", d_model=6, d_state=8).double()
    N, D = 8, 6
    A = torch.zeros(N, N, dtype=torch.float64)  # HiPPO-LegS, entry by entry
    for n in range(N):
        for k in range(N):
            if n > k:
                A[n, k] = -math.sqrt(2 * n + 1) * math.sqrt(2 * k + 1)
            elif n == k:
                A[n, k] = -(n + 1)
    Bv = torch.tensor([math.sqrt(2 * n + 1) for n in range(N)], dtype=torch.float64)
    I = torch.eye(N, dtype=torch.float64)
    x = torch.randn(2, 25, D, dtype=torch.float64)
    h = torch.zeros(2, D, N, dtype=torch.float64)
    ys = []
    for t in range(25):
        y = torch.zeros(2, D, dtype=torch.float64)
        for d in range(D):
            dt = math.exp(m.log_dt[d].item())
            inv = torch.linalg.inv(I - dt / 2 * A)  # generalised bilinear transform, alpha = 1/2
            h[:, d] = h[:, d] @ (inv @ (I + dt / 2 * A)).T + x[:, t, d, None] * (inv @ (dt * Bv))
            y[:, d] = h[:, d] @ m.C[d] + m.D[d] * x[:, t, d]
        ys.append(F.glu(m.out_proj(F.gelu(y)), dim=-1))
    out, st = m(x)
    torch.testing.assert_close(out, torch.stack(ys, 1))
    torch.testing.assert_close(st.h, h)
    # in pieces, through the state, equals one call
    y1, s1 = m(x[:, :10])
    y2, s2 = m(x[:, 10:], s1)
    torch.testing.assert_close(torch.cat([y1, y2], 1), out)
    torch.testing.assert_close(s2.h, st.h)


def test_A_fixed_by_default_and_learnable_on_request():
    assert "A" not in dict(rnnlab.build_mixer("lssl", d_model=4, d_state=4).named_parameters())
    assert "A" in dict(rnnlab.build_mixer("lssl", d_model=4, d_state=4, learn_A=True).named_parameters())


def test_discretisation_reused_while_decoding_and_refreshed_after_an_update():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("lssl", d_model=4, d_state=4)
    x = torch.randn(1, 3, 4)
    with torch.no_grad():
        y1, _ = m(x)
        assert m._discretised(torch.float32) is m._discretised(torch.float32)  # cached
        m.log_dt.add_(0.5)  # an optimizer step changes the parameter in place
        y2, _ = m(x)
    y3, _ = m(x)  # with autograd: computed afresh
    assert not torch.allclose(y1, y2)
    torch.testing.assert_close(y2, y3.detach())
