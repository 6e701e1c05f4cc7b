"""Titans' memory layer against a token-by-token transcription of the paper (eqs. 11-16), with the
inner gradient taken by autograd."""
import pytest
import torch
import torch.nn.functional as F

import rnnlab


def _conv_silu(z, conv):
    w, b = conv.conv.weight[:, 0], conv.conv.bias  # (D, W)
    zp = torch.cat([torch.zeros(z.shape[0], w.shape[1] - 1, z.shape[2], dtype=z.dtype), z], 1)
    out = torch.stack([(zp[:, t:t + w.shape[1]] * w.T).sum(1) for t in range(z.shape[1])], 1)
    return F.silu(out if b is None else out + b)


@pytest.mark.parametrize("memory,to_init", [("linear", False), ("mlp", False), ("mlp", True)])
def test_titans_matches_paper_equations(memory, to_init):
    torch.manual_seed(0)
    m = rnnlab.build_mixer("titans", d_model=8, num_heads=2, memory=memory, chunk_size=4, max_lr=0.5,
                           forget_to_init=to_init).double()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
    B, T, H, K, b = 2, 13, 2, 4, 4
    x = torch.randn(B, T, 8, dtype=torch.float64)
    split = lambda t: t.reshape(B, T, H, K)  # noqa: E731
    q = F.normalize(split(_conv_silu(x @ m.q_proj.weight.T, m.q_conv)), dim=-1)
    k = F.normalize(split(_conv_silu(x @ m.k_proj.weight.T, m.k_conv)), dim=-1)
    v = split(_conv_silu(x @ m.v_proj.weight.T, m.v_conv))
    logits = x @ m.gate_proj.weight.T + m.gate_bias
    alpha, eta = torch.sigmoid(logits[..., :H]), torch.sigmoid(logits[..., H:2 * H])
    theta = m.config.max_lr * torch.sigmoid(logits[..., 2 * H:])

    def M(params, inp):  # the memory's forward pass, per sequence and head
        out = params[0] @ inp
        return out if len(params) == 1 else params[1] @ F.silu(out)

    init = [w.detach() for w in m.memory_init]
    outs = torch.zeros(B, T, H, K, dtype=torch.float64)
    for bi in range(B):
        for h in range(H):
            W = [w[h].clone() for w in init]
            S = [torch.zeros_like(w) for w in W]
            for t in range(T):
                if t % b == 0:  # t' = t - mod(t, b): the mini-batch's starting weights
                    anchor = [w.clone().requires_grad_() for w in W]
                loss = (M(anchor, k[bi, t, h]) - v[bi, t, h]).pow(2).sum()  # ℓ(M_t'; x_t) = ||M(k) - v||²
                grads = torch.autograd.grad(loss, anchor)
                S = [eta[bi, t, h] * s - theta[bi, t, h] * g for s, g in zip(S, grads)]  # S_t = η S - θ ∇ℓ
                if to_init:  # rnnlab's option: forget toward the learned initial memory
                    W = [i[h] + (1 - alpha[bi, t, h]) * (w - i[h]) + s for w, s, i in zip(W, S, init)]
                else:
                    W = [(1 - alpha[bi, t, h]) * w + s for w, s in zip(W, S)]  # M_t = (1 - α) M + S
                outs[bi, t, h] = M(W, q[bi, t, h])  # y_t = M_t(q_t)
    gate = split(x @ m.g_proj.weight.T)
    o = outs / torch.sqrt(outs.pow(2).mean(-1, keepdim=True) + m.config.norm_eps) * m.o_norm.weight * F.silu(gate)
    y_ref = o.reshape(B, T, 8) @ m.o_proj.weight.T
    y, st = m(x)
    torch.testing.assert_close(y, y_ref)
    assert st.pos.tolist() == [T % b] * B
    torch.testing.assert_close(st.memory_0[1, 1], W[0])
    torch.testing.assert_close(st.momentum_0[1, 1], S[0])
    torch.testing.assert_close(st.anchor_0[1, 1], anchor[0].detach())


@pytest.mark.parametrize("memory", ["linear", "mlp"])
def test_default_inner_step_stays_finite_on_long_loud_inputs(memory):
    """The default step-size cap keeps the inner optimiser stable: 2048 tokens of std-10 inputs."""
    torch.manual_seed(0)
    m = rnnlab.build_mixer("titans", d_model=32, num_heads=2, memory=memory)
    with torch.no_grad():
        y, st = m(torch.randn(2, 2048, 32) * 10)
    assert torch.isfinite(y).all() and all(torch.isfinite(t).all() for t in st.tensors().values())
