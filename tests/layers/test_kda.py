"""Kimi Delta Attention against a token-by-token transcription of the paper's equations."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab
from paper_loops import assert_matches_loop, conv_silu, rmsnorm
from rnnlab.layers.deltanet import DeltaNetState





def transcription(layer, x, S0):
    """Kimi Linear, eqs. of KDA: S_t = (I - b_t k_t k_t^T) Diag(a_t) S_{t-1} + b_t k_t v_t^T,
    o_t = S_t^T q_t / sqrt(K), with log a_t = -exp(A_log) softplus(W_f2 W_f1 x_t + dt_bias), the
    output RMSNorm(o_t) * sigmoid(W_g2 W_g1 x_t + b_g) per head."""
    c = layer.config
    H, K, V = c.num_heads, c.head_dim, c.head_v_dim
    B, T, _ = x.shape
    qs, ks, vs = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    S = S0.clone()
    eye = torch.eye(K, dtype=x.dtype)
    ys = []
    for t in range(T):
        q = F.normalize(conv_silu(layer.q_conv, qs, t).view(B, H, K), dim=-1)
        k = F.normalize(conv_silu(layer.k_conv, ks, t).view(B, H, K), dim=-1)
        v = conv_silu(layer.v_conv, vs, t).view(B, H, V)
        b = torch.sigmoid(layer.b_proj(x[:, t])) * (2 if c.allow_neg_eigval else 1)  # (B, H)
        f = layer.f_proj[1](layer.f_proj[0](x[:, t])).view(B, H, K) + layer.dt_bias.view(H, K)
        a = torch.exp(-torch.exp(layer.A_log)[:, None] * F.softplus(f))  # (B, H, K): decay per key channel
        S_new = []
        for bi in range(B):
            S_new.append(torch.stack([
                (eye - b[bi, h] * torch.outer(k[bi, h], k[bi, h])) @ torch.diag(a[bi, h]) @ S[bi, h]
                + b[bi, h] * torch.outer(k[bi, h], v[bi, h]) for h in range(H)]))
        S = torch.stack(S_new)
        o = torch.einsum("bhkv,bhk->bhv", S, q) / K ** 0.5  # (B, H, V)
        gate = layer.g_proj[1](layer.g_proj[0](x[:, t])).view(B, H, V)
        o = rmsnorm(o, layer.o_norm.weight, c.norm_eps) * torch.sigmoid(gate)
        ys.append(layer.o_proj(o.reshape(B, H * V)))
    return torch.stack(ys, 1), S


@pytest.mark.parametrize("neg", [False, True])
def test_matches_paper_equations(neg):
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("kda", d_model=16, num_heads=2, allow_neg_eigval=neg).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    c = layer.config
    x = torch.randn(2, 45, 16, dtype=torch.float64)  # chunks of 32 (sub-chunks of 8): crosses both
    S0 = torch.randn(2, c.num_heads, c.head_dim, c.head_v_dim, dtype=torch.float64)
    st = layer.init_state(2, dtype=torch.float64)
    y, state = layer(x, DeltaNetState(S=S0, conv_q=st.conv_q, conv_k=st.conv_k, conv_v=st.conv_v))
    y_ref, S_ref = transcription(layer, x, S0)
    assert_matches_loop(f"kda(allow_neg_eigval={neg})", layer, y, state.S, y_ref, S_ref)


def test_decay_is_per_key_channel():
    """Two key channels of one head decay at different rates (a vector decay, not a scalar)."""
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("kda", d_model=16, num_heads=2).double()
    log_a = layer.decay(torch.randn(1, 5, 16, dtype=torch.float64))
    assert log_a.shape == (1, 5, 2, 8)
    assert (log_a < 0).all()
    assert (log_a.std(-1) > 0).all()


def test_init_follows_reference():
    torch.manual_seed(0)
    layer = rnnlab.build_mixer("kda", d_model=256, num_heads=2)
    c = layer.config
    assert c.head_v_dim == c.head_dim == 128 and c.gate_low_rank_dim == c.head_v_dim
    assert layer.dt_bias.shape == (c.num_heads * c.head_dim,) and layer.A_log.shape == (c.num_heads,)
    A = layer.A_log.exp()
    assert ((A >= 1) & (A <= 16)).all()
    dt = F.softplus(layer.dt_bias)
    assert ((dt >= 1e-4 - 1e-9) & (dt <= 0.1 + 1e-6)).all()
    for w in (layer.q_proj.weight, layer.f_proj[0].weight, layer.g_proj[1].weight, layer.q_conv.conv.weight):
        assert abs(w.std().item() - 0.02) < 0.004
    assert (layer.g_proj[1].bias == 0).all()
    assert layer.no_weight_decay() == {"A_log", "dt_bias", "g_proj.1.bias", "o_norm.weight"}


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="gate_low_rank_dim"):
        rnnlab.build_mixer("kda", d_model=16, num_heads=2, gate_low_rank_dim=0)
    with pytest.raises(ValueError, match="A_init_range"):
        rnnlab.build_mixer("kda", d_model=16, num_heads=2, A_init_range=(0.0, 16.0))
    with pytest.raises(ValueError, match="init_std"):
        rnnlab.build_mixer("kda", d_model=16, num_heads=2, init_std=0.0)
