"""TTT-Linear and TTT-MLP layers against a token-by-token transcription of the paper's update
(mini-batch gradient descent on the reconstruction loss, gradients taken by autograd), with the
reference implementation's learned learning rates, token_eta, RoPE and output norm."""
import math

import pytest
import torch
import torch.nn.functional as F

import rnnlab

F64 = torch.float64


def _rope_pairs(x, place, theta=10000.0):
    """Rotate each channel pair (2i, 2i+1) of x (K,) by the angle place · theta^(-2i/K)."""
    K = x.shape[-1]
    out = x.clone()
    for i in range(K // 2):
        a = place * theta ** (-2 * i / K)
        c, s = math.cos(a), math.sin(a)
        out[2 * i] = x[2 * i] * c - x[2 * i + 1] * s
        out[2 * i + 1] = x[2 * i] * s + x[2 * i + 1] * c
    return out


def _f(params, x):
    """The inner model: [W, b] (linear) or [W1, b1, W2, b2] (MLP with tanh GELU), x (K,)."""
    h = params[0] @ x + params[1]
    if len(params) == 4:
        h = params[2] @ F.gelu(h, approximate="tanh") + params[3]
    return h


@pytest.mark.parametrize("name,gate", [("ttt_linear", False), ("ttt_mlp", False), ("ttt_linear", True)])
def test_ttt_matches_paper_equations(name, gate):
    torch.manual_seed(0)
    D, H, b, B, T = 16, 2, 4, 2, 11
    m = rnnlab.build_mixer(name, d_model=D, num_heads=H, chunk_size=b, use_gate=gate, mlp_expand=2).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.3 * torch.randn_like(p))
    K = D // H
    x = torch.randn(B, T, D, dtype=F64)
    q_all, k_all, v_all = (x @ p.weight.T for p in (m.q_proj, m.k_proj, m.v_proj))  # (B, T, D)
    eta = m.config.base_lr * torch.sigmoid(x @ m.lr_weight.T + m.lr_bias) / K  # (B, T, H)
    token_eta = (1 / torch.arange(1, b + 1, dtype=F64) + m.token_eta_bias).clamp_min(0)  # (b,)
    gamma, beta = m.ttt_norm_weight, m.ttt_norm_bias
    init = [p for pair in zip(m.inner_W, m.inner_b) for p in pair]
    ln = lambda z, h: F.layer_norm(z, (K,), gamma[h], beta[h], m.config.norm_eps)  # noqa: E731
    outs = torch.zeros(B, T, H, K, dtype=F64)
    with torch.no_grad():
        y, st = m(x)
    for r in range(B):
        for h in range(H):
            sl = slice(h * K, (h + 1) * K)
            W = [p[h].detach().clone() for p in init]
            for t in range(T):
                i = t % b  # t's place in its mini-batch
                q, k, v = (_rope_pairs(a[r, t, sl], i) if a is not v_all else a[r, t, sl]
                           for a in (q_all, k_all, v_all))
                if i == 0:  # a new mini-batch starts from the current weights
                    anchor = [w.clone().requires_grad_() for w in W]
                    acc = [torch.zeros_like(w) for w in W]
                # ℓ(W; x_t) = ½ ||LN(f(θ_K x_t; W)) - (θ_V x_t - θ_K x_t)||², its gradient at the start
                loss = 0.5 * (ln(_f(anchor, k.detach()), h) - (v - k).detach()).pow(2).sum()
                grads = torch.autograd.grad(loss, anchor)
                acc = [a + eta[r, t, h].detach() * g for a, g in zip(acc, grads)]
                # W_t = W_0 - η_i Σ_s η_s ∇ℓ_s(W_0)
                W_t = [a.detach() - token_eta[i].detach() * g for a, g in zip(anchor, acc)]
                outs[r, t, h] = (q + ln(_f(W_t, q), h)).detach()  # z_t = θ_Q x_t + LN(f(θ_Q x_t; W_t))
                if i == b - 1:  # the mini-batch's last weights start the next one
                    W = W_t
            if r == B - 1 and h == H - 1:  # the final state: weights at the mini-batch start, summed gradient
                torch.testing.assert_close(st.W1[r, h], anchor[0].detach())
                torch.testing.assert_close(st.grad_W1[r, h], acc[0])
                torch.testing.assert_close(st.grad_b1[r, h], acc[1])
    with torch.no_grad():
        o = m.post_norm(outs.reshape(B, T, D))
        if gate:
            o = F.gelu(x @ m.g_proj.weight.T, approximate="tanh") * o
        y_ref = o @ m.o_proj.weight.T
    diff = (y - y_ref).abs().max().item()
    print(f"{name}{' gated' if gate else ''}: max |layer - paper loop| = {diff:.2e} "
          f"(outputs up to {y_ref.abs().max().item():.2f})")
    assert diff < 1e-10
    assert y_ref.abs().max() > 1e-2, "the loop must produce a non-trivial output"
    assert st.pos.tolist() == [T % b] * B


def test_learning_matters_and_config_errors():
    """The inner model learns: the output at a later mini-batch differs from a layer whose inner
    learning rate is ~0; bad options name the argument."""
    torch.manual_seed(0)
    m = rnnlab.build_mixer("ttt_linear", d_model=16, num_heads=2, chunk_size=4).double()
    x = torch.randn(1, 12, 16, dtype=F64)
    y, _ = m(x)
    with torch.no_grad():
        m.lr_bias.fill_(-60.0)  # sigmoid(-60) ≈ 1e-26: no inner learning
        y0, _ = m(x)
    assert (y[:, 4:] - y0[:, 4:]).abs().max() > 1e-3
    for bad, match in ((dict(inner="conv"), "inner must be"), (dict(chunk_size=0), "chunk_size"),
                       (dict(base_lr=0.0), "base_lr"), (dict(num_heads=3), "num_heads"),
                       (dict(num_heads=16), "even head dim")):
        with pytest.raises(ValueError, match=match):
            rnnlab.build_mixer("ttt_linear", d_model=16, **bad)


def test_defaults_follow_the_reference():
    lin, mlp = rnnlab.build_mixer("ttt_linear", d_model=64), rnnlab.build_mixer("ttt_mlp", d_model=64)
    assert (lin.config.inner, lin.config.base_lr, lin.config.chunk_size) == ("linear", 1.0, 16)
    assert (mlp.config.inner, mlp.config.base_lr, mlp.config.mlp_expand) == ("mlp", 0.1, 4)
    assert [tuple(w.shape) for w in mlp.inner_W] == [(4, 64, 16), (4, 16, 64)]
    assert abs(lin.inner_W[0].std().item() - 0.02) < 0.005 and lin.inner_b[0].abs().max() == 0
    assert {"lr_bias", "token_eta_bias", "ttt_norm_weight", "inner_b.0", "inner_b.1"} <= mlp.no_weight_decay()
    assert "inner_W.0" not in mlp.no_weight_decay()


@pytest.mark.parametrize("name", ["ttt_linear", "ttt_mlp"])
def test_default_inner_step_stays_finite_on_long_loud_inputs(name):
    """At the reference's learning rates the inner descent stays finite: 2048 tokens of std-10 inputs."""
    torch.manual_seed(0)
    m = rnnlab.build_mixer(name, d_model=32, num_heads=2)
    with torch.no_grad():
        y, st = m(torch.randn(2, 2048, 32) * 10)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in st.tensors().values())
