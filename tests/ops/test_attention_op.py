"""Softmax attention with sequence boundaries (cu_seqlens): block-diagonal causal attention equals
each sequence attended alone (float64, outputs, log-sum-exps and gradients), and a NaN stays in
its sequence and never reaches an earlier query."""
import pytest
import torch

from rnnlab.ops.attention import attention_reference, causal_attention, softmax_attention

LENGTHS = [3, 16, 1, 37, 8, 0, 5]  # blocks of 8 queries: boundaries inside and on blocks, an empty sequence
F64 = torch.float64


def _inputs(seed=0, H=2, K=4, V=3):
    g = torch.Generator().manual_seed(seed)
    T = sum(LENGTHS)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64)  # noqa: E731
    cu = torch.tensor([0] + torch.tensor(LENGTHS).cumsum(0).tolist(), dtype=torch.int64)
    return r(1, H, T, K), r(1, H, T, K), r(1, H, T, V), cu


def _alone(q, k, v, cu, **kw):
    outs, lses = [], []
    for a, b in zip(cu.tolist(), cu.tolist()[1:]):
        if b > a:
            idx = torch.arange(b - a)
            o, lse = softmax_attention(q[:, :, a:b], k[:, :, a:b], v[:, :, a:b], idx, idx, **kw)
            outs.append(o)
            lses.append(lse)
    return torch.cat(outs, dim=2), torch.cat(lses, dim=2)


@pytest.mark.parametrize("kw", [dict(), dict(window=5), dict(block_size=1), dict(block_size=64)])
def test_packed_equals_each_sequence_alone(kw):
    kw = {"block_size": 8, **kw}
    q, k, v, cu = _inputs()
    leaves = [t.clone().requires_grad_() for t in (q, k, v)]
    idx = torch.arange(q.shape[2])
    o, lse = softmax_attention(*leaves, idx, idx, cu_seqlens=cu, **kw)
    o_ref, lse_ref = _alone(*leaves, cu, **kw)
    torch.testing.assert_close(o, o_ref)
    torch.testing.assert_close(lse, lse_ref)
    g = torch.Generator().manual_seed(1)
    cot = torch.randn(o.shape, generator=g, dtype=F64)
    grads = torch.autograd.grad((o * cot).sum() + lse.sum(), leaves)
    want = torch.autograd.grad((o_ref * cot).sum() + lse_ref.sum(), leaves)
    for name, a, b in zip("qkv", grads, want):
        torch.testing.assert_close(a, b, msg=lambda m: f"gradient of {name}: {m}")


@pytest.mark.parametrize("where", ["q", "k", "v"])
@pytest.mark.parametrize("window", [None, 5])
def test_a_nan_stays_in_its_sequence(where, window):
    q, k, v, cu = _inputs(seed=3)
    T, c = q.shape[2], cu.tolist()
    p = c[3] + 21  # token 21 of the sequence of 37: inside a block of 8 queries
    o_ref, _ = _alone(q, k, v, cu, window=window, block_size=8)
    x = dict(q=q, k=k, v=v)
    x[where] = x[where].clone()
    x[where][:, :, p] = float("nan")
    idx = torch.arange(T)
    o, lse = softmax_attention(x["q"], x["k"], x["v"], idx, idx, window=window, block_size=8, cu_seqlens=cu)
    keep = torch.ones(T, dtype=torch.bool)
    keep[p:c[4]] = False
    assert torch.isfinite(o[:, :, keep]).all(), "a NaN reached another sequence or an earlier query"
    torch.testing.assert_close(o[:, :, keep], o_ref[:, :, keep])
    assert not torch.isfinite(o[:, :, p]).all()  # the NaN itself is not hidden


def test_a_nan_never_reaches_earlier_queries_without_cu_seqlens():
    q, k, v, _ = _inputs(seed=4)
    T = q.shape[2]
    idx = torch.arange(T)
    clean, _ = softmax_attention(q, k, v, idx, idx)
    v = v.clone()
    v[:, :, 30] = float("nan")
    o, _ = softmax_attention(q, k, v, idx, idx)  # one block of 256 holds all queries
    assert torch.isfinite(o[:, :, :30]).all()
    torch.testing.assert_close(o[:, :, :30], clean[:, :, :30])
    assert torch.isnan(o[:, :, 30:]).all()


def test_bad_cu_seqlens_name_the_argument():
    q, k, v, cu = _inputs()
    idx = torch.arange(q.shape[2])
    decreasing = cu.clone()
    decreasing[2] = 1
    for why, bad in {"int64": cu.int(), "start at 0": cu + 1, "end at T": cu[:-1],
                     "non-decreasing": decreasing}.items():
        with pytest.raises(ValueError, match=f"cu_seqlens must .*{why}"):
            softmax_attention(q, k, v, idx, idx, cu_seqlens=bad)
    with pytest.raises(ValueError, match="B = 1"):
        softmax_attention(q.expand(2, -1, -1, -1), k.expand(2, -1, -1, -1), v.expand(2, -1, -1, -1), idx, idx,
                          cu_seqlens=cu)


def test_positions_per_row_equal_each_row_alone():
    """q_idx (B, T) and k_idx (B, L): each row at its own positions (a ragged batch) attends as it
    would alone, with a window and a first key, across several query blocks."""
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, dtype=torch.float64) for n in (9, 14, 14))
    starts = torch.tensor([0, 5, 40])
    q_idx = starts[:, None] + 5 + torch.arange(9)  # (3, 9)
    k_idx = starts[:, None] + torch.arange(14)  # (3, 14)
    o, lse = softmax_attention(q, k, v, q_idx, k_idx, window=6, min_key=3, block_size=4)
    for b in range(3):
        o_b, lse_b = softmax_attention(q[b:b + 1], k[b:b + 1], v[b:b + 1], q_idx[b], k_idx[b], window=6, min_key=3)
        torch.testing.assert_close(o[b:b + 1], o_b)
        torch.testing.assert_close(lse[b:b + 1], lse_b)


# -- causal_attention (SDPA) against the definition -------------------------------------------------------
def _sdpa_inputs(B, H, G, T, L, seed):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=F64, requires_grad=True)  # noqa: E731
    return r(B, H, T, 8), r(B, G, L, 8), r(B, G, L, 6)


@pytest.mark.parametrize("B,H,G,T,L,ragged", [(2, 4, 2, 7, 7, False), (2, 4, 4, 5, 12, False),
                                               (3, 4, 1, 6, 15, True), (2, 2, 2, 1, 9, False),
                                               (3, 4, 2, 1, 11, True)])
@pytest.mark.parametrize("guarded", [False, True])  # True: the path taken when k or v may be non-finite
def test_causal_attention_equals_the_definition(B, H, G, T, L, ragged, guarded, monkeypatch):
    """SDPA with grouped heads, plain causal (L == T), after cached keys (L > T) and with a
    position per row (a ragged batch): outputs and gradients of q, k, v equal the loop, float64."""
    if guarded:
        monkeypatch.setattr("rnnlab.ops.attention.known_finite", lambda *xs: False)
    q, k, v = _sdpa_inputs(B, H, G, T, L, seed=T * L)
    if ragged:
        q_pos = torch.tensor([L - T, 2, 5])[:B, None] + torch.arange(T)  # (B, T) rows at their own positions
    else:
        q_pos = (L - T + torch.arange(T)).expand(B, T)
    o = causal_attention(q, k, v, q_pos if ragged else None)
    ref = attention_reference(q, k, v, q_pos)
    err = (o - ref).abs().max().item()
    assert err < 1e-12, f"max |o - reference| = {err:.3g}"
    blocks, _ = softmax_attention(q, k.repeat_interleave(H // G, 1), v.repeat_interleave(H // G, 1), q_pos,
                                  torch.arange(L), block_size=4)  # the blockwise form too
    assert (blocks - ref).abs().max().item() < 1e-12
    cot = torch.randn(o.shape, generator=torch.Generator().manual_seed(5), dtype=F64)
    grads = torch.autograd.grad((o * cot).sum(), (q, k, v))
    want = torch.autograd.grad((ref * cot).sum(), (q, k, v))
    for name, a, b in zip("qkv", grads, want):
        assert (a - b).abs().max().item() < 1e-12, f"gradient of {name}: max diff {(a - b).abs().max().item():.3g}"


@pytest.mark.parametrize("where", ["k", "v"])
@pytest.mark.parametrize("ragged", [False, True])
def test_causal_attention_keeps_a_nan_from_earlier_queries(where, ragged):
    """A non-finite key or value at slot p reaches no query before p; the queries that see it get
    NaN (every column for a key, its column for a value), as the definition gives."""
    B, H, G, T, L = 2, 4, 2, 12, 15
    q, k, v = (t.detach() for t in _sdpa_inputs(B, H, G, T, L, seed=9))
    q_pos = torch.tensor([[3], [0]]) + torch.arange(T) if ragged else (L - T + torch.arange(T)).expand(B, T)
    x = dict(k=k.clone(), v=v.clone())
    p = int(q_pos[0, 4])  # the slot of query 4 of row 0
    x[where][0, 1, p, 2] = float("nan")
    o = causal_attention(q, x["k"], x["v"], q_pos if ragged else None)
    ref = attention_reference(q, x["k"], x["v"], q_pos)
    clean = attention_reference(q, k, v, q_pos)
    heads = slice(2, 4)  # query heads of key head 1
    assert torch.isfinite(o[0, :, :4]).all() and torch.isfinite(o[1]).all() and torch.isfinite(o[0, :2]).all()
    torch.testing.assert_close(o[0, :, :4], clean[0, :, :4], rtol=0, atol=1e-12)
    torch.testing.assert_close(o[1], clean[1], rtol=0, atol=1e-12)
    assert torch.equal(o[0, heads, 4:].isnan(), ref[0, heads, 4:].isnan()) and o[0, heads, 4:].isnan().any()
    fine = ~ref.isnan()
    torch.testing.assert_close(o[fine], ref[fine], rtol=0, atol=1e-12)


@pytest.mark.parametrize("window, block", [(None, 256), (6, 4), (3, 8)])
def test_without_lse_equals_with_it(window, block, monkeypatch):
    """with_lse=False (masked SDPA per block on finite inputs) gives the output of the log-sum-exp
    path, gradients included, rows at their own positions; it is the SDPA path that ran."""
    import torch.nn.functional as F
    calls = []
    sdpa = F.scaled_dot_product_attention
    monkeypatch.setattr(F, "scaled_dot_product_attention", lambda *a, **kw: calls.append(1) or sdpa(*a, **kw))
    torch.manual_seed(0)
    q, k, v = (torch.randn(3, 2, n, 8, dtype=F64, requires_grad=True) for n in (9, 14, 14))
    starts = torch.tensor([0, 5, 40])
    q_idx, k_idx = starts[:, None] + 5 + torch.arange(9), starts[:, None] + torch.arange(14)
    want, _ = softmax_attention(q, k, v, q_idx, k_idx, window=window, block_size=block)
    assert not calls
    got, lse = softmax_attention(q, k, v, q_idx, k_idx, window=window, block_size=block, with_lse=False)
    assert lse is None and calls
    torch.testing.assert_close(got, want)
    cot = torch.randn_like(want)
    for a, b in zip(torch.autograd.grad(want, (q, k, v), cot), torch.autograd.grad(got, (q, k, v), cot)):
        torch.testing.assert_close(b, a)
