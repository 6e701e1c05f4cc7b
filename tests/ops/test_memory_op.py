"""Titans' neural memory: the chunked (matmul) form equals the token loop, from any state and position."""
import pytest
import torch
import torch.nn.functional as F

from rnnlab.ops.memory import MemoryState, neural_memory, neural_memory_recurrent


def make(B=2, T=37, H=2, K=4, V=3, Fh=5, mlp=False, pos=0, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k = F.normalize(r(B, T, H, K), dim=-1), F.normalize(r(B, T, H, K), dim=-1)
    v = r(B, T, H, V)
    log_g, log_eta = F.logsigmoid(r(B, T, H) + 3), F.logsigmoid(r(B, T, H) + 1)
    theta = 0.1 * torch.sigmoid(r(B, T, H))
    shapes = [(Fh, K), (V, Fh)] if mlp else [(V, K)]
    w = lambda: tuple(0.5 * r(B, H, *s) for s in shapes)  # noqa: E731
    return [q, k, v, log_g, log_eta, theta], MemoryState(w(), w(), w(), torch.full((B,), pos))


def _flat(st):
    return [*st.memory, *st.momentum, *st.anchor]


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("T,chunk,pos", [(1, 16, 0), (37, 16, 0), (37, 8, 5), (16, 16, 15), (9, 4, 3)])
@pytest.mark.parametrize("with_base", [False, True])
def test_chunked_equals_recurrent_with_gradients(mlp, T, chunk, pos, with_base):
    args, st = make(T=T, mlp=mlp, pos=pos)
    n = len(st.memory)
    base = [torch.randn(w.shape[1:], dtype=torch.float64) for w in st.memory] if with_base else []  # (H, out, in)
    leaves = args + _flat(st) + base
    l1 = [a.clone().requires_grad_() for a in leaves]
    l2 = [a.clone().requires_grad_() for a in leaves]

    def state(ls):
        w = ls[6:6 + 3 * n]
        return MemoryState(tuple(w[:n]), tuple(w[n:2 * n]), tuple(w[2 * n:]), torch.full((2,), pos))

    def base_of(ls):
        return tuple(ls[6 + 3 * n:]) if with_base else None

    o1, s1 = neural_memory_recurrent(*l1[:6], state(l1), chunk_size=chunk, base=base_of(l1))
    o2, s2 = neural_memory(*l2[:6], state(l2), chunk_size=chunk, base=base_of(l2))
    torch.testing.assert_close(o2, o1)
    assert s1.pos.tolist() == s2.pos.tolist() == [(pos + T) % chunk] * 2
    for a, b in zip(_flat(s1), _flat(s2)):
        torch.testing.assert_close(b, a)
    outs1, outs2 = [o1, *_flat(s1)], [o2, *_flat(s2)]
    cots = [torch.randn_like(t) for t in outs1]
    f1 = sum((a * c).sum() for a, c in zip(outs1, cots))
    f2 = sum((a * c).sum() for a, c in zip(outs2, cots))
    g1 = torch.autograd.grad(f1, l1, allow_unused=True)
    g2 = torch.autograd.grad(f2, l2, allow_unused=True)
    for a, b in zip(g1, g2):
        if a is None or b is None:
            assert a is None and b is None or (a if b is None else b).abs().max() == 0
        else:
            torch.testing.assert_close(b, a)


@pytest.mark.parametrize("mlp", [False, True])
def test_gradient_is_the_gradient_of_the_loss(mlp):
    """The analytic inner gradient equals autograd's gradient of ||M(k) - v||² (one token, θ = 1)."""
    args, st = make(T=1, mlp=mlp)
    q, k, v, _, _, _ = args
    zeros = torch.zeros(2, 1, 2, dtype=torch.float64)
    mom = tuple(torch.zeros_like(w) for w in st.memory)
    anchor = tuple(w.clone().requires_grad_() for w in st.memory)
    out = anchor[0] @ k[:, 0, :, :, None]
    if mlp:
        out = anchor[1] @ F.silu(out)
    loss = (out.squeeze(-1) - v[:, 0]).pow(2).sum()
    grads = torch.autograd.grad(loss, anchor)
    # with g = η = 1, θ = 1 and zero momentum, one step gives M_1 = M_0 - ∇ℓ(M_0)
    _, s = neural_memory_recurrent(q, k, v, zeros, zeros, torch.ones(2, 1, 2, dtype=torch.float64),
                                   MemoryState(st.memory, mom, st.memory, torch.zeros(2, dtype=torch.long)))
    for w0, w1, gr in zip(st.memory, s.memory, grads):
        torch.testing.assert_close(w0 - w1, gr)


def test_splitting_equals_one_call_and_zero_state():
    args, st = make(T=30, mlp=True)
    o, s = neural_memory(*args, st, chunk_size=8)
    oa, sa = neural_memory(*[a[:, :11] for a in args], st, chunk_size=8)
    ob, sb = neural_memory(*[a[:, 11:] for a in args], sa, chunk_size=8)
    assert sa.pos.tolist() == [3, 3]
    torch.testing.assert_close(torch.cat([oa, ob], 1), o)
    for a, b in zip(_flat(s), _flat(sb)):
        torch.testing.assert_close(b, a)
    args, _ = make(T=10)
    o0, _ = neural_memory(*args)
    oz, _ = neural_memory_recurrent(*args)
    torch.testing.assert_close(o0, oz)


def test_bad_inputs():
    args, st = make(mlp=True)
    with pytest.raises(ValueError, match="theta"):
        neural_memory(*args[:5], args[5][..., :1], st)
    with pytest.raises(ValueError, match=r"initial_state.anchor\[1\]"):
        neural_memory(*args, MemoryState(st.memory, st.momentum, (st.anchor[0], st.anchor[0]), st.pos))
    with pytest.raises(ValueError, match=r"initial_state.pos must lie in \[0, chunk_size=16\), got \[16, 0\]"):
        neural_memory(*args, st._replace(pos=torch.tensor([16, 0])), chunk_size=16)
    with pytest.raises(ValueError, match=r"initial_state.pos must be an int64 tensor of shape \(B,\) = \(2,\)"):
        neural_memory(*args, st._replace(pos=0), chunk_size=16)
    with pytest.raises(ValueError, match="chunk_size"):
        neural_memory(*args, st, chunk_size=0)
    with pytest.raises(ValueError, match="base"):
        neural_memory(*args, st, base=(st.memory[0][0],))


def test_forgetting_pulls_toward_base():
    """With no writes (θ = 0) and no momentum, the memory decays geometrically toward base."""
    args, st = make(T=20, mlp=True)
    q, k, v, _, log_eta, _ = args
    log_g = torch.full_like(log_eta, -0.5)
    zero = MemoryState(st.memory, tuple(torch.zeros_like(w) for w in st.memory), st.memory, st.pos)
    base = tuple(torch.randn(w.shape[1:], dtype=torch.float64) for w in st.memory)
    _, s = neural_memory(q, k, v, log_g, log_eta, torch.zeros_like(log_eta), zero, base=base)
    for w0, w, b in zip(st.memory, s.memory, base):
        torch.testing.assert_close(w, b + (w0 - b) * torch.exp(torch.tensor(-10.0, dtype=torch.float64)))


@pytest.mark.parametrize("mlp", [False, True])
def test_rows_at_different_positions(mlp):
    """Each row of a batch keeps its own place in its mini-batch: a batch whose rows start at
    different positions equals each row run alone, in the chunked form and the loop alike."""
    args, st = make(T=23, mlp=mlp)
    st = st._replace(pos=torch.tensor([5, 0]))
    for fn in (neural_memory, neural_memory_recurrent):
        o, s = fn(*args, st, chunk_size=8)
        for r in range(2):
            o_r, s_r = neural_memory_recurrent(*[a[r:r + 1] for a in args],
                                               MemoryState(*(tuple(w[r:r + 1] for w in p) for p in st[:3]),
                                                           st.pos[r:r + 1]), chunk_size=8)
            torch.testing.assert_close(o[r:r + 1], o_r)
            assert s.pos[r].item() == s_r.pos.item() == ((5, 0)[r] + 23) % 8
            for a, b in zip(_flat(s), _flat(s_r)):
                torch.testing.assert_close(a[r:r + 1], b)
