"""mLSTM: the chunked and parallel forms equal the stabilised reference loop (float64)."""
import pytest
import torch
import torch.nn.functional as F

from rnnlab.ops import mlstm, mlstm_chunked, mlstm_parallel, mlstm_recurrent, mlstm_step


def make(B=2, T=41, H=3, K=5, V=4, seed=0, gate_scale=1.0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, V)
    log_f = F.logsigmoid(gate_scale * r(B, T, H) + 2)
    log_i = gate_scale * r(B, T, H)
    state = (r(B, H, K, V), r(B, H, K), r(B, H))
    return q, k, v, log_f, log_i, state


def unstabilised(q, k, v, log_f, log_i):
    """The paper's plain form from a zero start: h = C^T q / max(|n^T q|, 1) with C, n unscaled."""
    B, T, H, K = q.shape
    C = torch.zeros(B, H, K, v.shape[-1], dtype=q.dtype)
    n = torch.zeros(B, H, K, dtype=q.dtype)
    hs = []
    for t in range(T):
        f, i = log_f[:, t].exp(), log_i[:, t].exp()
        C = f[..., None, None] * C + i[..., None, None] * k[:, t, :, :, None] * v[:, t, :, None, :]
        n = f[..., None] * n + i[..., None] * k[:, t]
        qt = q[:, t] / K ** 0.5
        hs.append(torch.einsum("bhkv,bhk->bhv", C, qt) / torch.clamp((n * qt).sum(-1).abs(), min=1)[..., None])
    return torch.stack(hs, 1)


def test_reference_equals_the_unstabilised_definition():
    q, k, v, log_f, log_i, _ = make()
    h, _ = mlstm_recurrent(q, k, v, log_f, log_i)
    torch.testing.assert_close(h, unstabilised(q, k, v, log_f, log_i))


@pytest.mark.parametrize("eps", [0.0, 0.3])
@pytest.mark.parametrize("form,T", [(f, T) for f in ("chunked", "parallel") for T in (1, 7, 41)] + [("step", 1)])
def test_fast_forms_equal_reference_with_gradients(T, form, eps):
    q, k, v, log_f, log_i, state = make(T=T)
    fast = {"chunked": lambda *a: mlstm_chunked(*a[:5], None, a[5], chunk_size=8, eps=eps),
            "parallel": lambda *a: mlstm_parallel(*a[:5], None, a[5], eps=eps),
            "step": lambda *a: (lambda h, st: (h[:, None], st))(
                *mlstm_step(*(x[:, 0] for x in a[:5]), None, a[5], eps=eps))}[form]
    args1 = [x.clone().requires_grad_() for x in (q, k, v, log_f, log_i)]
    st1 = tuple(s.clone().requires_grad_() for s in state)
    args2 = [x.clone().requires_grad_() for x in (q, k, v, log_f, log_i)]
    st2 = tuple(s.clone().requires_grad_() for s in state)
    h1, (C1, n1, m1) = mlstm_recurrent(*args1, None, st1, eps=eps)
    h2, (C2, n2, m2) = fast(*args2, st2)
    for a, b in ((h1, h2), (C1, C2), (n1, n2), (m1, m2)):
        torch.testing.assert_close(b, a)
    cots = [torch.randn_like(x) for x in (h1, C1, n1)]
    loss = lambda h, C, n: sum((x * c).sum() for x, c in zip((h, C, n), cots))  # noqa: E731
    g1 = torch.autograd.grad(loss(h1, C1, n1), args1 + list(st1))
    g2 = torch.autograd.grad(loss(h2, C2, n2), args2 + list(st2))
    for name, a, b in zip("q k v log_f log_i C0 n0 m0".split(), g1, g2):
        torch.testing.assert_close(b, a, msg=name)


def test_gradcheck_tiny():
    q, k, v, log_f, log_i, state = make(B=1, T=4, H=1, K=2, V=2)
    args = [x.requires_grad_() for x in (q, k, v, log_f, log_i)]
    assert torch.autograd.gradcheck(lambda *a: mlstm_chunked(*a, chunk_size=3)[0], args)


def test_chunk_size_splitting_and_step():
    q, k, v, log_f, log_i, state = make(T=30)
    h, st = mlstm(q, k, v, log_f, log_i, None, state)
    for C in (1, 4, 64):
        torch.testing.assert_close(mlstm_chunked(q, k, v, log_f, log_i, None, state, chunk_size=C)[0], h)
    ha, sa = mlstm(q[:, :11], k[:, :11], v[:, :11], log_f[:, :11], log_i[:, :11], None, state)
    hb, sb = mlstm(q[:, 11:], k[:, 11:], v[:, 11:], log_f[:, 11:], log_i[:, 11:], None, sa)
    torch.testing.assert_close(torch.cat([ha, hb], 1), h)
    for a, b in zip(sb, st):
        torch.testing.assert_close(a, b)
    h1, _ = mlstm_step(q[:, 0], k[:, 0], v[:, 0], log_f[:, 0], log_i[:, 0], None, state)
    torch.testing.assert_close(h1, h[:, 0])


def test_large_gates_stay_finite():
    q, k, v, log_f, log_i, state = make(T=200, gate_scale=30.0)  # exp(30): unstabilised would overflow
    h, st = mlstm(q, k, v, log_f, log_i, None, state)
    h_ref, _ = mlstm_recurrent(q, k, v, log_f, log_i, None, state)
    assert torch.isfinite(h).all() and all(torch.isfinite(s).all() for s in st)
    torch.testing.assert_close(h, h_ref)


def test_eps_joins_the_stabilised_denominator():
    """h = C^T q / (max(|n^T q|, exp(-m)) + eps) token by token, written from the returned states."""
    q, k, v, log_f, log_i, state = make(T=6)
    h0, _ = mlstm_recurrent(q, k, v, log_f, log_i, None, state)
    h, _ = mlstm_recurrent(q, k, v, log_f, log_i, None, state, eps=0.5)
    st = state
    for t in range(6):
        _, st = mlstm_recurrent(q[:, t:t + 1], k[:, t:t + 1], v[:, t:t + 1], log_f[:, t:t + 1], log_i[:, t:t + 1],
                                None, st)
        C, n, m = st
        qt = q[:, t] / q.shape[-1] ** 0.5
        den = torch.maximum((n * qt).sum(-1).abs(), torch.exp(-m)) + 0.5
        torch.testing.assert_close(h[:, t], torch.einsum("bhkv,bhk->bhv", C, qt) / den[..., None])
    assert not torch.allclose(h, h0)
