"""The mLSTM layer against a token-by-token transcription of the xLSTM paper (unstabilised form)."""
import pytest
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


def _mlstm7b_loop(m, x, st):
    """xLSTM 7B's layer written token by token from its paper (stabilised mLSTM with eps)."""
    c = m.config
    H, K, V = c.num_heads, c.qk_dim // c.num_heads, c.v_dim // c.num_heads
    cap = lambda z: c.gate_softcap * torch.tanh(z / c.gate_softcap)  # noqa: E731
    C, n, mm = st.C, st.n, st.m
    ys = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        q, k, v = m.q(xt).view(-1, H, K), m.k(xt).view(-1, H, K), m.v(xt).view(-1, H, V)
        log_i, log_f = cap(m.igate_preact(xt)), F.logsigmoid(cap(m.fgate_preact(xt)))  # (B, H)
        m_new = torch.maximum(log_f + mm, log_i)
        f, i = torch.exp(log_f + mm - m_new), torch.exp(log_i - m_new)
        C = f[..., None, None] * C + i[..., None, None] * k[..., :, None] * v[..., None, :]
        n = f[..., None] * n + i[..., None] * k
        mm = m_new
        qs = q / K ** 0.5
        den = torch.maximum((n * qs).sum(-1).abs(), torch.exp(-mm)) + c.eps
        h = torch.einsum("bhkv,bhk->bhv", C, qs) / den[..., None]  # (B, H, V)
        h = (h - h.mean(-1, keepdim=True)) / torch.sqrt(h.var(-1, unbiased=False, keepdim=True) + c.norm_eps)
        ys.append(m.out_proj(torch.sigmoid(m.ogate_preact(xt)) * h.reshape(-1, H * V) * m.multihead_norm.weight))
    return torch.stack(ys, 1), (C, n, mm)


def test_mlstm7b_matches_paper_equations_from_zero_and_from_a_state():
    torch.manual_seed(0)
    m = rnnlab.build_mixer("mlstm7b", d_model=16, num_heads=2, eps=0.01).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    x = torch.randn(2, 23, 16, dtype=torch.float64)
    mid = m.state_cls(C=torch.randn(2, 2, 4, 8, dtype=torch.float64), n=torch.randn(2, 2, 4, dtype=torch.float64),
                      m=torch.randn(2, 2, dtype=torch.float64))
    for st in (m.init_state(2, dtype=torch.float64), mid):
        with torch.no_grad():
            y, new = m(x, st)
            ref, (C, n, mm) = _mlstm7b_loop(m, x, st)
        print(f"mlstm7b vs its equations: max |dy| {(y - ref).abs().max().item():.1e}")
        torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
        for a, b in ((new.C, C), (new.n, n), (new.m, mm)):
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_mlstm7b_init_and_options():
    m = rnnlab.build_mixer("mlstm7b", d_model=64, num_heads=4, init_layers=8)
    torch.testing.assert_close(m.fgate_preact.bias.detach(), torch.linspace(3, 6, 4))
    assert torch.equal(m.igate_preact.bias.detach(), torch.full((4,), -10.0))
    assert m.igate_preact.weight.abs().sum() == 0 and m.multihead_norm.bias is None
    assert (m.q.weight.shape, m.v.weight.shape) == ((32, 64), (64, 64))
    assert abs(m.out_proj.weight.std().item() - 2 / 8 / 64 ** 0.5) < 0.01
    assert m.no_weight_decay() == {"igate_preact.bias", "fgate_preact.bias", "multihead_norm.weight"}
    with pytest.raises(ValueError, match="num_heads"):
        rnnlab.build_mixer("mlstm7b", d_model=64, num_heads=5)
    with pytest.raises(ValueError, match="gate_softcap"):
        rnnlab.build_mixer("mlstm7b", d_model=64, num_heads=4, gate_softcap=0.0)
