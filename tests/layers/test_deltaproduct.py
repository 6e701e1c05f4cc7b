"""Gated DeltaProduct against a token-by-token transcription of the paper's equations."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab
from paper_loops import assert_matches_loop, conv_silu, rmsnorm
from rnnlab.layers.deltanet import DeltaNetState





def transcription(layer, x, S0):
    """DeltaProduct with a forget gate, per token t: S <- a_t S_{t-1}, then for j = 1..n_h
    S <- (I - b_{t,j} k_{t,j} k_{t,j}^T) S + b_{t,j} k_{t,j} v_{t,j}^T; o_t = S^T q_t / sqrt(K);
    output RMSNorm(o_t) * silu(W_g x_t) per head."""
    c = layer.config
    H, K, V, n = c.num_heads, c.head_dim, c.head_v_dim, c.num_householder
    B, T, _ = x.shape
    qs, ks, vs = layer.q_proj(x), layer.k_proj(x), layer.v_proj(x)
    S = S0.clone()
    eye = torch.eye(K, dtype=x.dtype)
    ys = []
    for t in range(T):
        q = F.normalize(conv_silu(layer.q_conv, qs, t).view(B, H, K), dim=-1)
        k_all = conv_silu(layer.k_conv, ks, t).view(B, n, H, K)  # features (n h k)
        v_all = conv_silu(layer.v_conv, vs, t).view(B, n, H, V)
        b_all = torch.sigmoid(layer.b_proj(x[:, t])).view(B, n, H) * (2 if c.allow_neg_eigval else 1)
        a = torch.exp(-torch.exp(layer.A_log) * F.softplus(layer.a_proj(x[:, t]) + layer.dt_bias))  # (B, H)
        S = a[..., None, None] * S
        for j in range(n):  # one generalised Householder step each
            k, v, b = F.normalize(k_all[:, j], dim=-1), v_all[:, j], b_all[:, j]
            S = torch.stack([torch.stack([
                (eye - b[bi, h] * torch.outer(k[bi, h], k[bi, h])) @ S[bi, h]
                + b[bi, h] * torch.outer(k[bi, h], v[bi, h]) for h in range(H)]) for bi in range(B)])
        o = torch.einsum("bhkv,bhk->bhv", S, q) / K ** 0.5  # (B, H, V)
        gate = layer.g_proj(x[:, t]).view(B, H, V)
        o = rmsnorm(o, layer.o_norm.weight, c.norm_eps) * F.silu(gate)
        ys.append(layer.o_proj(o.reshape(B, H * V)))
    return torch.stack(ys, 1), S


def perturbed(name, **kw):
    layer = rnnlab.build_mixer(name, d_model=16, num_heads=2, **kw).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def with_S(layer, S0):
    st = layer.init_state(S0.shape[0], dtype=S0.dtype)
    return DeltaNetState(S=S0, conv_q=st.conv_q, conv_k=st.conv_k, conv_v=st.conv_v)


@pytest.mark.parametrize("n_h", [1, 2, 3])
@pytest.mark.parametrize("neg", [False, True])
def test_matches_paper_equations(n_h, neg):
    torch.manual_seed(n_h)
    layer = perturbed("gated_deltaproduct", num_householder=n_h, allow_neg_eigval=neg)
    c = layer.config
    x = torch.randn(2, 29, 16, dtype=torch.float64)  # 29 * n_h sub-steps: crosses chunks of 64 for n_h >= 3
    S0 = torch.randn(2, c.num_heads, c.head_dim, c.head_v_dim, dtype=torch.float64)
    y, state = layer(x, with_S(layer, S0))
    y_ref, S_ref = transcription(layer, x, S0)
    assert_matches_loop(f"gated_deltaproduct(n_h={n_h}, neg={neg})", layer, y, state.S, y_ref, S_ref)


@pytest.mark.parametrize("neg", [False, True])
def test_one_householder_step_is_gated_deltanet(neg):
    torch.manual_seed(1)
    gdp = perturbed("gated_deltaproduct", num_householder=1, allow_neg_eigval=neg)
    gdn = rnnlab.build_mixer("gated_deltanet", d_model=16, num_heads=2, allow_neg_eigval=neg).double()
    gdn.load_state_dict(gdp.state_dict())  # the same parameter names and shapes
    x = torch.randn(2, 70, 16, dtype=torch.float64)
    S0 = torch.randn(2, 2, 8, 16, dtype=torch.float64)
    (y, s), (y2, s2) = gdp(x, with_S(gdp, S0)), gdn(x, with_S(gdn, S0))
    d = max((y - y2).abs().max().item(), (s.S - s2.S).abs().max().item())
    print(f"gated_deltaproduct(n_h=1) vs gated_deltanet: max diff {d:.2e}")
    torch.testing.assert_close(y, y2, atol=1e-12, rtol=1e-10)
    for a, b in zip(s.tensors().values(), s2.tensors().values()):
        torch.testing.assert_close(a, b, atol=1e-12, rtol=1e-10)


def test_decoding_runs_every_sub_step():
    """Token by token (the step form, n_h sub-steps each) equals the whole sequence; packed rows
    (cu_seqlens · n_h inside) equal separate ones."""
    torch.manual_seed(2)
    layer = perturbed("gated_deltaproduct", num_householder=3)
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    y, s = layer(x)
    st, ys = None, []
    for t in range(12):
        yt, st = layer(x[:, t:t + 1], st)
        ys.append(yt)
    torch.testing.assert_close(torch.cat(ys, 1), y, atol=1e-12, rtol=1e-10)
    torch.testing.assert_close(st.S, s.S, atol=1e-12, rtol=1e-10)
    cu = torch.tensor([0, 5, 6, 12])
    yp, sp = layer(x, cu_seqlens=cu)
    for i in range(3):
        a, b = cu[i].item(), cu[i + 1].item()
        yi, si = layer(x[:, a:b])
        torch.testing.assert_close(yp[:, a:b], yi, atol=1e-12, rtol=1e-10)
        torch.testing.assert_close(sp.S[i:i + 1], si.S, atol=1e-12, rtol=1e-10)


def test_one_token_applies_its_householder_maps_in_order():
    """With no decay and zero values, one token maps S0 to (I - b k_2 k_2^T)(I - b k_1 k_1^T) S0:
    the n_h = 2 transitions in sub-step order (the other order gives a different state)."""
    torch.manual_seed(3)
    K = 4
    layer = rnnlab.build_mixer("gated_deltaproduct", d_model=K, num_heads=1, expand_v=1.0, conv_size=1,
                               num_householder=2).double()
    with torch.no_grad():
        layer.b_proj.weight.zero_()  # b = 2 sigmoid(0) = 1
        layer.A_log.fill_(-60.0)  # exp(A_log) ~ 0: a_t = 1, no decay
        layer.v_proj.weight.zero_()
        layer.k_conv.conv.weight.fill_(1.0)
    x = torch.randn(1, 1, K, dtype=torch.float64)
    S0 = torch.randn(1, 1, K, K, dtype=torch.float64)
    with torch.no_grad():
        k1, k2 = F.normalize(F.silu(layer.k_proj(x)).view(2, K), dim=-1)
        _, st = layer(x, with_S(layer, S0))
    step = lambda k: torch.eye(K, dtype=torch.float64) - torch.outer(k, k)  # noqa: E731
    torch.testing.assert_close(st.S[0, 0], step(k2) @ step(k1) @ S0[0, 0], atol=1e-12, rtol=1e-10)
    assert (st.S[0, 0] - step(k1) @ step(k2) @ S0[0, 0]).abs().max() > 1e-3


def test_bad_config_names_the_argument():
    with pytest.raises(ValueError, match="num_householder"):
        rnnlab.build_mixer("gated_deltaproduct", d_model=16, num_heads=2, num_householder=0)


def test_defaults_follow_reference():
    layer = rnnlab.build_mixer("gated_deltaproduct", d_model=64, num_heads=4)
    c = layer.config
    assert c.num_householder == 2 and c.allow_neg_eigval and c.head_v_dim == 2 * c.head_dim
    assert layer.k_proj.out_features == 2 * 64 and layer.b_proj.out_features == 2 * 4
    A = layer.A_log.exp()
    assert ((A >= 0) & (A <= 16)).all()
    assert layer.no_weight_decay() == {"A_log", "dt_bias", "o_norm.weight"}
