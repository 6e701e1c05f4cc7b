"""TTT's inner learner: the dual (mini-batch) form equals the token loop in float64, outputs, final
state and gradients, from any state and place in the mini-batch; the inner gradient is the
gradient of the loss; splits anywhere continue exactly."""
import pytest
import torch

from rnnlab.ops.ttt import TTTState, default_token_eta, minibatch_places, ttt, ttt_chunked, ttt_recurrent

F64 = torch.float64


def make(B=2, T=37, H=2, K=4, Fh=6, mlp=False, pos=0, chunk=8, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    q, k, v = r(B, T, H, K), r(B, T, H, K), r(B, T, H, K)
    eta = 0.3 * torch.rand(B, T, H, generator=g, dtype=F64)
    ln_w, ln_b = 1 + r(H, K) / 4, r(H, K) / 4
    token_eta = default_token_eta(chunk, F64) + 0.1 * r(chunk)
    shapes = [(K, K), (K,)] if not mlp else [(Fh, K), (Fh,), (K, Fh), (K,)]
    w = lambda s: tuple(s * r(B, H, *sh) for sh in shapes)  # noqa: E731
    return [q, k, v, eta, ln_w, ln_b, token_eta], TTTState(w(0.5), w(0.1), torch.full((B,), pos))


def _flat(st):
    return [*st.weights, *st.grads]


def _state(leaves, n, pos, B=2):
    return TTTState(tuple(leaves[7:7 + n]), tuple(leaves[7 + n:7 + 2 * n]), torch.full((B,), pos))


@pytest.mark.parametrize("mlp", [False, True])
@pytest.mark.parametrize("T,chunk,pos", [(1, 16, 0), (37, 16, 0), (37, 8, 5), (16, 16, 15), (9, 4, 3), (24, 8, 0)])
def test_dual_form_equals_loop_with_gradients(mlp, T, chunk, pos):
    args, st = make(T=T, mlp=mlp, pos=pos, chunk=chunk)
    n = len(st.weights)
    leaves = args + _flat(st)
    l1 = [a.clone().requires_grad_() for a in leaves]
    l2 = [a.clone().requires_grad_() for a in leaves]
    o1, s1 = ttt_recurrent(*l1[:7], _state(l1, n, pos), chunk_size=chunk)
    o2, s2 = ttt_chunked(*l2[:7], _state(l2, n, pos), chunk_size=chunk)
    torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12)
    assert s1.pos.tolist() == s2.pos.tolist() == [(pos + T) % chunk] * 2
    for a, b in zip(_flat(s1), _flat(s2)):
        torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)
    outs1, outs2 = [o1, *_flat(s1)], [o2, *_flat(s2)]
    cots = [torch.randn_like(t) for t in outs1]
    g1 = torch.autograd.grad(sum((a * c).sum() for a, c in zip(outs1, cots)), l1)
    g2 = torch.autograd.grad(sum((a * c).sum() for a, c in zip(outs2, cots)), l2)
    names = ["q", "k", "v", "eta", "ln_w", "ln_b", "token_eta"] + [f"state[{i}]" for i in range(2 * n)]
    for name, a, b in zip(names, g1, g2):
        torch.testing.assert_close(b, a, rtol=1e-10, atol=1e-10, msg=lambda m: f"gradient of {name}: {m}")
    assert all(g.abs().sum() > 0 for g in g1[:7]), "every input moves the result"


@pytest.mark.parametrize("mlp", [False, True])
def test_inner_gradient_is_the_gradient_of_the_loss(mlp):
    """One token at place 0 with token_eta[0] = 1 and eta = 1 takes exactly one step of autograd's
    gradient of ½||LN(f(k; W)) - (v - k)||² (tanh GELU between the MLP's layers)."""
    args, st = make(T=1, mlp=mlp)
    q, k, v, _, ln_w, ln_b, _ = args
    W = tuple(w.clone().requires_grad_() for w in st.weights)
    h = k[:, 0]  # (B, H, K)
    for i in range(0, len(W), 2):
        h = torch.einsum("bhoi,bhi->bho", W[i], h) + W[i + 1]
        if i + 2 < len(W):
            h = torch.nn.functional.gelu(h, approximate="tanh")
    ln = torch.nn.functional.layer_norm
    z = torch.stack([ln(h[:, j], (h.shape[-1],), ln_w[j], ln_b[j], 1e-6) for j in range(h.shape[1])], 1)
    loss = 0.5 * (z - (v[:, 0] - k[:, 0])).pow(2).sum()
    grads = torch.autograd.grad(loss, W)
    zero = TTTState(st.weights, tuple(torch.zeros_like(w) for w in st.weights), torch.zeros(2, dtype=torch.long))
    _, s = ttt_recurrent(q, k, v, torch.ones(2, 1, 2, dtype=F64), ln_w, ln_b, torch.ones(1, dtype=F64), zero,
                         chunk_size=1)
    for w0, w1, gr in zip(st.weights, s.weights, grads):
        torch.testing.assert_close(w0 - w1, gr)
    assert s.pos.tolist() == [0, 0] and all(g.abs().max() == 0 for g in s.grads)


def test_output_reads_the_updated_weights_with_the_residual_and_norm():
    """o_t = q_t + LN(W_t q_t + b_t) for a linear inner model (checked at the first token)."""
    args, st = make(T=1)
    q, k, v, eta, ln_w, ln_b, te = args
    o, s = ttt_recurrent(*args, TTTState(st.weights, st.grads, torch.full((2,), 3)), chunk_size=8)
    W, b = s.weights[0] - te[3] * s.grads[0], s.weights[1] - te[3] * s.grads[1]  # mid-batch: W_0 kept, G grown
    z = torch.einsum("bhoi,bhi->bho", W, q[:, 0]) + b
    ln = torch.nn.functional.layer_norm
    want = q[:, 0] + torch.stack([ln(z[:, j], (4,), ln_w[j], ln_b[j], 1e-6) for j in range(2)], 1)
    torch.testing.assert_close(o[:, 0], want)
    torch.testing.assert_close(s.weights[0], st.weights[0])  # the anchor stays until the mini-batch ends


@pytest.mark.parametrize("mlp", [False, True])
def test_any_split_continues_exactly(mlp):
    args, st = make(T=30, mlp=mlp)
    o, s = ttt(*args, st, chunk_size=8)
    for cut in (1, 5, 8, 11, 29):
        oa, sa = ttt(*[a[:, :cut] if a.dim() >= 3 else a for a in args], st, chunk_size=8)
        ob, sb = ttt(*[a[:, cut:] if a.dim() >= 3 else a for a in args], sa, chunk_size=8)
        assert sa.pos.tolist() == [cut % 8] * 2
        torch.testing.assert_close(torch.cat([oa, ob], 1), o, rtol=1e-12, atol=1e-12)
        for a, b in zip(_flat(s), _flat(sb)):
            torch.testing.assert_close(b, a, rtol=1e-12, atol=1e-12)


def test_defaults_zero_state_and_paper_token_eta():
    args, _ = make(T=10)
    o, s = ttt(*args[:6])
    o2, s2 = ttt_recurrent(*args[:6], default_token_eta(16, F64))
    torch.testing.assert_close(o, o2)
    assert len(s.weights) == 2 and s.pos.tolist() == [10, 10]
    torch.testing.assert_close(default_token_eta(4, F64), torch.tensor([1, 1 / 2, 1 / 3, 1 / 4], dtype=F64))


@pytest.mark.parametrize("mlp", [False, True])
def test_rows_at_different_places(mlp):
    args, st = make(T=23, mlp=mlp)
    st = st._replace(pos=torch.tensor([5, 0]))
    for fn in (ttt, ttt_recurrent):
        o, s = fn(*args, st, chunk_size=8)
        for r in range(2):
            one = TTTState(tuple(w[r:r + 1] for w in st.weights), tuple(g[r:r + 1] for g in st.grads), st.pos[r:r + 1])
            o_r, s_r = ttt_recurrent(*[a[r:r + 1] if a.dim() >= 3 else a for a in args], one, chunk_size=8)
            torch.testing.assert_close(o[r:r + 1], o_r)
            assert s.pos[r].item() == s_r.pos.item() == ((5, 0)[r] + 23) % 8
            for a, b in zip(_flat(s), _flat(s_r)):
                torch.testing.assert_close(a[r:r + 1], b)


def test_minibatch_places():
    pos = torch.tensor([3, 0])
    assert minibatch_places(pos, 6, 4).tolist() == [[3, 0, 1, 2, 3, 0], [0, 1, 2, 3, 0, 1]]
    cu = torch.tensor([0, 2, 2, 7])
    assert minibatch_places(torch.tensor([1, 2, 3]), 7, 4, cu).tolist() == [[1, 2, 3, 0, 1, 2, 3]]


def test_bad_inputs():
    args, st = make(mlp=True)
    with pytest.raises(ValueError, match="eta must be"):
        ttt(*args[:3], args[3][..., :1], *args[4:], st)
    with pytest.raises(ValueError, match="V = K"):
        ttt(args[0], args[1], args[2][..., :3], *args[3:], st)
    with pytest.raises(ValueError, match="ln_b must be"):
        ttt(*args[:5], args[5][:1], args[6], st)
    with pytest.raises(ValueError, match=r"token_eta must be \(chunk_size,\) = \(16,\)"):
        ttt(*args, st, chunk_size=16)
    with pytest.raises(ValueError, match=r"initial_state.grads\[3\] \(b2\)"):
        ttt(*args, st._replace(grads=st.grads[:3] + (st.grads[1],)), chunk_size=8)
    with pytest.raises(ValueError, match="2 \\(linear: W, b\\) or 4"):
        ttt(*args, st._replace(weights=st.weights[:3]), chunk_size=8)
    with pytest.raises(ValueError, match=r"initial_state.pos must lie in \[0, chunk_size=8\), got \[8, 0\]"):
        ttt(*args, st._replace(pos=torch.tensor([8, 0])), chunk_size=8)
    with pytest.raises(ValueError, match="chunk_size"):
        ttt(*args[:6], None, st, chunk_size=0)
