"""DeltaNet and Gated DeltaNet against a token-by-token transcription of the papers' equations."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab
from paper_loops import conv_silu, rmsnorm





def transcription(layer, x):
    c = layer.config
    H, K, V = c.num_heads, c.head_dim, c.head_v_dim
    B, T, _ = x.shape
    gated = isinstance(layer, rnnlab.layers.deltanet.GatedDeltaNet)
    qs, ks, vs = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    S = torch.zeros(B, H, K, V, dtype=x.dtype)
    ys = []
    for t in range(T):
        q = F.normalize(conv_silu(layer.q_conv, qs, t).view(B, H, K), dim=-1)
        k = F.normalize(conv_silu(layer.k_conv, ks, t).view(B, H, K), dim=-1)
        v = conv_silu(layer.v_conv, vs, t).view(B, H, V)
        b = torch.sigmoid(layer.b_proj(x[:, t])) * (2 if c.allow_neg_eigval else 1)  # (B, H)
        if gated:
            alpha = torch.exp(-torch.exp(layer.A_log) * F.softplus(layer.a_proj(x[:, t]) + layer.dt_bias))
        else:
            alpha = torch.ones(B, H, dtype=x.dtype)
        # S_t = alpha_t (I - b k k^T) S_{t-1} + b k v^T, o_t = S_t^T q_t / sqrt(K)
        eye = torch.eye(K, dtype=x.dtype)
        for bi in range(B):
            for h in range(H):
                kk = k[bi, h]
                S[bi, h] = alpha[bi, h] * (eye - b[bi, h] * torch.outer(kk, kk)) @ S[bi, h] \
                    + b[bi, h] * torch.outer(kk, v[bi, h])
        o = torch.einsum("bhkv,bhk->bhv", S, q) / K ** 0.5  # (B, H, V)
        if gated:
            gate = layer.g_proj(x[:, t]).view(B, H, V)
            o = rmsnorm(o, layer.o_norm.weight, c.norm_eps) * F.silu(gate)
        else:
            o = rmsnorm(o, layer.o_norm.weight, c.norm_eps)
        ys.append(layer.o_proj(o.reshape(B, H * V)))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
@pytest.mark.parametrize("neg", [False, True])
def test_matches_paper_equations(name, neg):
    torch.manual_seed(0)
    layer = rnnlab.build_mixer(name, d_model=16, num_heads=2, allow_neg_eigval=neg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    x = torch.randn(2, 21, 16, dtype=torch.float64)
    y, state = layer(x)
    y_ref, S_ref = transcription(layer, x)
    torch.testing.assert_close(y, y_ref, atol=1e-10, rtol=1e-8)
    torch.testing.assert_close(state.S, S_ref, atol=1e-10, rtol=1e-8)


def test_gated_deltanet_init_follows_reference():
    layer = rnnlab.build_mixer("gated_deltanet", d_model=64, num_heads=4)
    A = layer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()
    assert layer.config.head_v_dim == 2 * layer.config.head_dim
