"""Based against the direct form of its Taylor-expanded attention."""
import torch

import rnnlab


def test_based_matches_taylor_attention():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("based", d_model=8, num_heads=2, feature_dim=4).double()
    x = torch.randn(2, 19, 8, dtype=torch.float64)
    q = m.q_proj(x).view(2, 19, 2, 4)
    k = m.k_proj(x).view(2, 19, 2, 4)
    v = m.v_proj(x).view(2, 19, 2, 4)
    ys = []
    for t in range(19):  # weights 1 + s + s^2/2 with s = q_t·k_j / sqrt(F)
        s = torch.einsum("bhf,bjhf->bjh", q[:, t], k[:, : t + 1]) / 2.0
        w = 1 + s + s ** 2 / 2
        o = torch.einsum("bjh,bjhv->bhv", w, v[:, : t + 1]) / (w.sum(1)[..., None] + 1e-6)
        ys.append(m.o_proj(o.reshape(2, 8)))
    torch.testing.assert_close(m(x)[0], torch.stack(ys, 1))
