"""GSA against a token-by-token transcription of the paper's equations."""
import torch
import torch.nn.functional as F

import rnnlab


def test_gsa_matches_paper_equations():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("gsa", d_model=8, num_heads=2, num_slots=3).double()
    x = torch.randn(2, 21, 8, dtype=torch.float64)
    H, K, M, tau = 2, 4, 3, 8.0
    split = lambda t, d: t.reshape(2, 21, H, d)  # noqa: E731
    q = F.silu(split(x @ m.q_proj.weight.T, K))
    k = F.silu(split(x @ m.k_proj.weight.T, K))
    v = F.silu(split(x @ m.v_proj.weight.T, K))
    alpha = torch.sigmoid(split(x @ m.f_proj.weight.T, M)) ** (1 / tau)  # (B, T, H, M)
    Kt = torch.zeros(2, H, M, K, dtype=torch.float64)
    Vt = torch.zeros(2, H, M, K, dtype=torch.float64)
    outs = []
    for t in range(21):
        a = alpha[:, t, :, :, None]
        Kt = a * Kt + (1 - a) * k[:, t, :, None, :]  # K̃_t = Diag(α) K̃ + (1 - α) k^T
        Vt = a * Vt + (1 - a) * v[:, t, :, None, :]
        o = (Vt * torch.softmax((Kt @ q[:, t, :, :, None]).squeeze(-1), -1)[..., None]).sum(2)  # Ṽ^T softmax(K̃ q)
        o = F.silu(o.reshape(2, 8))
        o = o / torch.sqrt(o.pow(2).mean(-1, keepdim=True) + m.config.norm_eps) * m.g_norm.weight
        outs.append(o @ m.o_proj.weight.T)
    y, st = m(x)
    torch.testing.assert_close(y, torch.stack(outs, 1))
    torch.testing.assert_close(st.keys, Kt)
    torch.testing.assert_close(st.values, Vt)
