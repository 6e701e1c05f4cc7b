"""The mLSTM layer against a token-by-token transcription of the xLSTM paper (unstabilised form)."""
import torch
import torch.nn.functional as F

import rnnlab


def test_mlstm_matches_paper_equations():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("mlstm", d_model=8, num_heads=2).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 17, 8, dtype=torch.float64)
    E, H, K = 16, 2, 8
    xm_all, z_all = m.up_proj(x).chunk(2, -1)
    w = m.conv.conv.weight[:, 0]  # (E, 4)
    C = torch.zeros(2, H, K, K, dtype=torch.float64)
    n = torch.zeros(2, H, K, dtype=torch.float64)
    ys = []
    for t in range(17):
        xc = sum(w[:, j] * xm_all[:, t - 3 + j] for j in range(4) if t - 3 + j >= 0) + m.conv.conv.bias
        xc = F.silu(xc)
        q, k, v = m.q_proj(xc), m.k_proj(xc), m.v_proj(xm_all[:, t])
        qkv = torch.cat([q, k, v], -1)
        i, f = torch.exp(m.igate(qkv)), torch.sigmoid(m.fgate(qkv))  # (B, H)
        q, k, v = (a.view(2, H, K) for a in (q, k, v))
        C = f[..., None, None] * C + i[..., None, None] * k[..., :, None] * v[..., None, :]
        n = f[..., None] * n + i[..., None] * k
        qs = q / K ** 0.5
        h = torch.einsum("bhkv,bhk->bhv", C, qs) / torch.clamp((n * qs).sum(-1).abs(), min=1)[..., None]
        h = F.layer_norm(h, (K,), eps=m.config.norm_eps).reshape(2, E) * m.norm_weight + m.skip * xc
        ys.append(m.out_proj(h * F.silu(z_all[:, t])))
    torch.testing.assert_close(m(x)[0], torch.stack(ys, 1))


def test_gate_initialisation():
    m = rnnlab.build_mixer("mlstm", d_model=32, num_heads=4)
    torch.testing.assert_close(m.fgate.bias.detach(), torch.linspace(3, 6, 4))
    assert m.igate.weight.abs().sum() == 0 and m.fgate.weight.abs().sum() == 0
    model = rnnlab.build_model(layout="mlstm", n_layers=1, d_model=32)  # the LM keeps the gate init
    assert model.blocks[0].mixer.fgate.weight.abs().sum() == 0
