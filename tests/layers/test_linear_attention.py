"""linear_attention, retnet, gla, hgrn2 against token-by-token transcriptions of their papers."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab


def rms(x, w, eps):
    return x / torch.sqrt((x * x).mean(-1, keepdim=True) + eps) * w


def _perturbed(name, **kw):
    torch.manual_seed(0)
    layer = rnnlab.build_mixer(name, d_model=16, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _heads(t, H):
    return t.view(*t.shape[:-1], H, -1)


@pytest.mark.parametrize("fmap", ["elu", "relu", "identity"])
@pytest.mark.parametrize("normalize", [True, False])
def test_linear_attention(fmap, normalize):
    m = _perturbed("linear_attention", num_heads=2, feature_map=fmap, normalize=normalize)
    phi = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}[fmap]
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    K = 8
    ys = []
    for t in range(15):  # o_t = sum_{s<=t} φ(q_t)·φ(k_s) v_s / sum_{s<=t} φ(q_t)·φ(k_s)
        q = phi(_heads(m.q_proj(x[:, t]), 2))
        ks = phi(_heads(m.k_proj(x[:, : t + 1]), 2))  # (B, t+1, H, K)
        vs = _heads(m.v_proj(x[:, : t + 1]), 2)
        w = torch.einsum("bhk,bshk->bsh", q, ks)
        num = torch.einsum("bsh,bshv->bhv", w, vs)
        o = num / (w.sum(1)[..., None] + 1e-6) if normalize else num / K ** 0.5
        ys.append(m.o_proj(o.reshape(2, 16)))
    torch.testing.assert_close(m(x)[0], torch.stack(ys, 1))


def test_retnet():
    m = _perturbed("retnet", num_heads=2)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    gamma = 1 - 2.0 ** (-5 - torch.arange(2, dtype=torch.float64))
    ys = []
    for t in range(15):  # retention: sum_s gamma^(t-s) (q_t·k_s / sqrt(K)) v_s
        q = _heads(m.q_proj(x[:, t]), 2)
        ks, vs = _heads(m.k_proj(x[:, : t + 1]), 2), _heads(m.v_proj(x[:, : t + 1]), 2)
        decay = gamma[None, :] ** (t - torch.arange(t + 1, dtype=torch.float64))[:, None]  # (s, H)
        o = torch.einsum("bhk,bshk,sh,bshv->bhv", q, ks, decay, vs) / 8 ** 0.5
        o = rms(o, m.g_norm.weight, 1e-6) * F.silu(_heads(m.g_proj(x[:, t]), 2))
        ys.append(m.o_proj(o.reshape(2, -1)))
    torch.testing.assert_close(m(x)[0], torch.stack(ys, 1))


def test_gla():
    m = _perturbed("gla", num_heads=2)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    S = torch.zeros(2, 2, 4, 8, dtype=torch.float64)
    ys = []
    for t in range(15):  # S_t = Diag(alpha_t) S_{t-1} + k v^T, alpha = sigmoid(low-rank)^(1/16)
        q, k, v = (_heads(p(x[:, t]), 2) for p in (m.q_proj, m.k_proj, m.v_proj))
        alpha = torch.sigmoid(_heads(m.gk_proj(x[:, t]), 2)) ** (1 / 16)
        S = alpha[..., None] * S + k[..., None] * v[..., None, :]
        o = torch.einsum("bhkv,bhk->bhv", S, q) / 4 ** 0.5
        o = rms(o, m.g_norm.weight, 1e-5) * F.silu(_heads(m.g_proj(x[:, t]), 2))
        ys.append(m.o_proj(o.reshape(2, -1)))
    y, st = m(x)
    torch.testing.assert_close(y, torch.stack(ys, 1))
    torch.testing.assert_close(st.S, S)


@pytest.mark.parametrize("beta", [0.0, 0.6])
def test_hgrn2(beta):
    m = _perturbed("hgrn2", num_heads=2, expand_ratio=4, lower_bound=beta)
    x = torch.randn(2, 15, 16, dtype=torch.float64)
    S = torch.zeros(2, 2, 4, 8, dtype=torch.float64)
    ys = []
    for t in range(15):  # f = beta + (1-beta) sigmoid, S = Diag(f) S + (1-f) i^T, o = S^T swish(q)
        f = beta + (1 - beta) * torch.sigmoid(_heads(m.f_proj(x[:, t]), 2))
        i = _heads(m.i_proj(x[:, t]), 2)
        S = f[..., None] * S + (1 - f)[..., None] * i[..., None, :]
        o = torch.einsum("bhkv,bhk->bhv", S, F.silu(_heads(m.q_proj(x[:, t]), 2))) / 4 ** 0.5
        ys.append(m.o_proj(rms(o.reshape(2, -1), m.g_norm.weight, 1e-5)))
    y, st = m(x)
    torch.testing.assert_close(y, torch.stack(ys, 1))
    torch.testing.assert_close(st.S, S)
