"""RWKV-6 and RWKV-7 against their papers' equations written token by token (float64, random
initial state), plus their init, options and a GoldFinch-style hybrid layout."""
import math

import pytest
import torch
import torch.nn.functional as F

import rnnlab
from rnnlab.layers.rwkv import RWKV7Config, RWKVState


def _group_norm(y, norm, H):
    """nn.GroupNorm(H, H·V) of one token y (B, H, V), written out: (B, H·V)."""
    mean = y.mean(-1, keepdim=True)
    var = y.var(-1, unbiased=False, keepdim=True)
    return ((y - mean) / torch.sqrt(var + norm.eps)).flatten(1) * norm.weight + norm.bias


def _perturbed(name, **options):
    torch.manual_seed(0)
    layer = rnnlab.build_mixer(name, d_model=32, **options).double()
    with torch.no_grad():
        for p in layer.parameters():
            p.add_(0.1 * torch.randn_like(p))
    return layer


def _random_state(layer, B):
    st = layer.init_state(B, dtype=torch.float64)
    return RWKVState(S=torch.randn_like(st.S), shift=torch.randn_like(st.shift))


def _rwkv6_loop(layer, x, S, last):
    """Finch (Peng et al. 2024, section 4): ddlerp token shift, w_t = exp(-exp(d_t)),
    wkv_t = diag(u) k_t^T v_t + S_{t-1}, o_t = r_t wkv_t, S_t = diag(w_t) S_{t-1} + k_t^T v_t,
    output (SiLU(g_t) * GroupNorm(o_t)) W_o. The state here is (K x V) per head."""
    c = layer.config
    H, K, V, R = c.num_heads, c.key_dim // c.num_heads, c.value_dim // c.num_heads, c.proj_low_rank_dim
    A, Bw = layer.x_lora[0].weight, layer.x_lora[2].weight  # (5R, D), (D, 5R)
    outs = []
    for t in range(x.shape[1]):
        a, b = x[:, t], last  # x_t, x_{t-1}
        z = torch.tanh((a + (b - a) * layer.x_mu) @ A.T)  # (B, 5R)
        xr, xw, xk, xv, xg = (a + (b - a) * (layer.x_bias[n] + z[:, n * R:(n + 1) * R] @ Bw[:, n * R:(n + 1) * R].T)
                              for n in range(5))
        r = (xr @ layer.r_proj.weight.T).view(-1, H, K)
        k = (xk @ layer.k_proj.weight.T).view(-1, H, K)
        v = (xv @ layer.v_proj.weight.T).view(-1, H, V)
        d = torch.tanh(xw @ layer.w_lora[0].weight.T) @ layer.w_lora[2].weight.T + layer.w_lora[2].bias
        w = torch.exp(-torch.exp(d)).view(-1, H, K)
        kv = k[..., :, None] * v[..., None, :]  # (B, H, K, V): k_t^T v_t
        wkv = layer.bonus[..., None] * kv + S
        o = torch.einsum("bhk,bhkv->bhv", r, wkv)
        S = w[..., None] * S + kv
        g = F.silu(xg @ layer.g_proj.weight.T)
        outs.append((g * _group_norm(o, layer.g_norm, H)) @ layer.o_proj.weight.T)
        last = a
    return torch.stack(outs, 1), S, last


def _rwkv7_loop(layer, x, S, last):
    """Goose (Peng et al. 2025, section 4) in the paper's (V x K) state convention:
    S_t = S_{t-1} (diag(w_t) - kappa_t^T (a_t * kappa_t)) + v_t^T k~_t, y_t = S_t r_t, output
    ((GroupNorm(y_t) + (r_t . (rho * k~_t)) v_t) * g_t) W_o, with w_t = exp(-e^-0.5 sigmoid(d_t)),
    kappa_t = normalize(k_t * xi), k~_t = k_t * lerp(1, a_t, alpha)."""
    c = layer.config
    H, K = c.num_heads, c.head_dim
    def lora(m, act, z):  # b + act(z A) B
        return act(z @ m[0].weight.T) @ m[2].weight.T + (0 if m[2].bias is None else m[2].bias)
    S = S.transpose(-1, -2)  # (B, H, V, K): the paper's orientation
    outs = []
    for t in range(x.shape[1]):
        xt = x[:, t]
        xr, xw, xk, xv, xa, xg = (xt + (last - xt) * mu for mu in layer.x_mix)
        r = (xr @ layer.r_proj.weight.T).view(-1, H, K)
        k = xk @ layer.k_proj.weight.T
        v = (xv @ layer.v_proj.weight.T).view(-1, H, K)
        w = torch.exp(-math.exp(-0.5) * torch.sigmoid(lora(layer.w_lora, torch.tanh, xw))).view(-1, H, K)
        a = torch.sigmoid(lora(layer.a_lora, lambda z: z, xa))
        g = lora(layer.g_lora, torch.sigmoid, xg)
        kappa = F.normalize((k * layer.k_k).view(-1, H, K), dim=-1)
        k_tilde = (k * (1 + (a - 1) * layer.k_a)).view(-1, H, K)
        a = a.view(-1, H, K)
        transition = torch.diag_embed(w) - kappa[..., :, None] * (a * kappa)[..., None, :]  # (B, H, K, K)
        S = S @ transition + v[..., :, None] * k_tilde[..., None, :]
        y = torch.einsum("bhvk,bhk->bhv", S, r)
        bonus = ((r * layer.r_k * k_tilde).sum(-1, keepdim=True) * v).flatten(1)
        outs.append(((_group_norm(y, layer.g_norm, H) + bonus) * g) @ layer.o_proj.weight.T)
        last = xt
    return torch.stack(outs, 1), S.transpose(-1, -2), last


@pytest.mark.parametrize("name,loop,options", [
    ("rwkv6", _rwkv6_loop, dict(num_heads=2, proj_low_rank_dim=4, gate_low_rank_dim=8)),
    ("rwkv7", _rwkv7_loop, dict(head_dim=16, decay_low_rank_dim=8, a_low_rank_dim=8, gate_low_rank_dim=8)),
])
def test_matches_the_paper_equations(name, loop, options):
    layer = _perturbed(name, **options)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(2, 45, 32, dtype=torch.float64, generator=g)  # several chunks of the fast form
    for st in (layer.init_state(2, dtype=torch.float64), _random_state(layer, 2)):
        with torch.no_grad():
            y, new = layer(x, st)
            y_ref, S_ref, last = loop(layer, x, st.S, st.shift[:, 0])
        diff = max((y - y_ref).abs().max().item(), (new.S - S_ref).abs().max().item())
        print(f"{name}: max |layer - paper loop| = {diff:.2e} (outputs up to {y_ref.abs().max().item():.2f})")
        torch.testing.assert_close(y, y_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(new.S, S_ref, rtol=1e-10, atol=1e-10)
        torch.testing.assert_close(new.shift[:, 0], last)
        assert y_ref.abs().max() > 1e-3, "the loop must produce a non-trivial output"


def test_rwkv7_init_follows_depth_and_fresh_layers_are_silent():
    model = rnnlab.build_model(layout="rwkv7(head_dim=16)", n_layers=4, d_model=32)
    mixers = [b.mixer for b in model.blocks]
    assert [m.config.depth for m in mixers] == [0.0, 0.25, 0.5, 0.75]
    D = 32
    n = torch.arange(D, dtype=torch.float64)
    for m in mixers:
        want = 1 - (n / D) ** (0.2 * (1 - m.config.depth))  # x_r of RWKV-LM's x070 init
        torch.testing.assert_close(m.x_mix[0].double(), want, rtol=1e-6, atol=1e-6)
        log_w = -math.exp(-0.5) * torch.sigmoid(m.w_lora[2].bias)
        assert (log_w < 0).all() and (log_w > -math.exp(-0.5)).all()
        assert torch.all(m.o_proj.weight == 0), "RWKV-7 starts with a zero output projection"
        torch.testing.assert_close(m.k_a, torch.full((D,), 1.02))
    assert not torch.equal(mixers[0].x_mix, mixers[3].x_mix), "the init must depend on depth"
    y, _ = mixers[1](torch.randn(1, 5, D))
    assert torch.all(y == 0)


def test_weight_decay_skips_mixes_and_bonus():
    six = rnnlab.build_mixer("rwkv6", d_model=32, num_heads=2)
    assert six.no_weight_decay() == {"x_mu", "x_bias", "bonus", "w_lora.2.bias", "g_norm.weight", "g_norm.bias"}
    seven = rnnlab.build_mixer("rwkv7", d_model=32, head_dim=16)
    assert seven.no_weight_decay() == {"x_mix", "k_k", "k_a", "r_k", "w_lora.2.bias", "a_lora.2.bias",
                                       "g_norm.weight", "g_norm.bias"}


def test_bad_options_name_the_argument():
    with pytest.raises(ValueError, match="head_dim=12"):
        rnnlab.build_mixer("rwkv7", d_model=32, head_dim=12)
    with pytest.raises(ValueError, match="depth"):
        RWKV7Config(d_model=32, head_dim=16, depth=1.5)
    with pytest.raises(ValueError, match="num_heads=3"):
        rnnlab.build_mixer("rwkv6", d_model=32, num_heads=3)
    big = RWKV7Config(d_model=2048)  # fla's rule: round(c·sqrt(D)/32)·32, at least 32
    assert (big.decay_low_rank_dim, big.a_low_rank_dim, big.gate_low_rank_dim, big.num_heads) == (128, 128, 224, 32)


@pytest.mark.parametrize("layout", ["rwkv6*3,attention", "rwkv7(head_dim=16)*3,attention"])
def test_goldfinch_style_hybrid_builds_and_decodes(layout):
    """RWKV layers with one attention layer in four (GoldFinch-style): builds, and decoding token by
    token equals the full forward."""
    torch.manual_seed(0)
    model = rnnlab.build_model(layout=layout, n_layers=4, d_model=32).double()
    assert [b.name for b in model.blocks] == [layout.split("*")[0].split("(")[0]] * 3 + ["attention"]
    tokens = torch.randint(0, 260, (2, 12))
    logits, state = model(tokens)
    assert logits.shape == (2, 12, 260) and torch.isfinite(logits).all()
    st, outs = None, []
    for t in range(12):
        out, st = model(tokens[:, t:t + 1], st)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), logits)
