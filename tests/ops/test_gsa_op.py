"""Gated slot attention: the chunked form equals the reference loop (float64, with gradients)."""
import pytest
import torch
import torch.nn.functional as F

from rnnlab.ops.gsa import gsa, gsa_chunked, gsa_recurrent


def make(B=2, T=45, H=2, K=4, V=3, M=5, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    log_g = F.logsigmoid(r(B, T, H, M) + 2)
    return r(B, T, H, K), r(B, T, H, K), r(B, T, H, V), 1 - log_g.exp(), log_g, (r(B, H, M, K), r(B, H, M, V))


def _equals_reference(args, **chunked):
    """gsa_chunked(**chunked) on args = (q, k, v, s, log_g, K0, V0) equals the loop, gradients too."""
    l1 = [a.clone().requires_grad_() for a in args]
    l2 = [a.clone().requires_grad_() for a in args]
    o1, (K1, V1) = gsa_recurrent(*l1[:5], (l1[5], l1[6]))
    o2, (K2, V2) = gsa_chunked(*l2[:5], (l2[5], l2[6]), **chunked)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(K2, K1)
    torch.testing.assert_close(V2, V1)
    c = [torch.randn_like(t) for t in (o1, K1, V1)]
    f1 = sum((a * b).sum() for a, b in zip((o1, K1, V1), c))
    f2 = sum((a * b).sum() for a, b in zip((o2, K2, V2), c))
    for a, b in zip(torch.autograd.grad(f1, l1), torch.autograd.grad(f2, l2)):
        torch.testing.assert_close(b, a)


@pytest.mark.parametrize("T,chunk,block", [(1, 16, 256), (45, 16, 256), (45, 8, 16), (64, 16, 32)])
def test_chunked_equals_reference_with_gradients(T, chunk, block):
    q, k, v, s, log_g, (K0, V0) = make(T=T)
    _equals_reference([q, k, v, s, log_g, K0, V0], chunk_size=chunk, block_size=block)


def test_splitting_strong_decay_and_zero_state():
    q, k, v, s, log_g, st0 = make(T=30)
    log_g = log_g * 40  # gates down to e^-80 per step: masked exponentials must not overflow
    o, st = gsa(q, k, v, s, log_g, st0)
    assert torch.isfinite(o).all()
    oa, sta = gsa(q[:, :11], k[:, :11], v[:, :11], s[:, :11], log_g[:, :11], st0)
    ob, stb = gsa(q[:, 11:], k[:, 11:], v[:, 11:], s[:, 11:], log_g[:, 11:], sta)
    torch.testing.assert_close(torch.cat([oa, ob], 1), o)
    torch.testing.assert_close(stb[1], st[1])
    o0, _ = gsa(q, k, v, s, log_g)
    oz, _ = gsa_recurrent(q, k, v, s, log_g, tuple(torch.zeros_like(t) for t in st0))
    torch.testing.assert_close(o0, oz)


def test_bad_shapes():
    q, k, v, s, log_g, st0 = make()
    with pytest.raises(ValueError, match="log_g"):
        gsa(q, k, v, s, log_g[..., :2])
    with pytest.raises(ValueError, match="k must"):
        gsa(q, k[..., :2], v, s, log_g)
    with pytest.raises(ValueError, match="initial_state"):
        gsa(q, k, v, s, log_g, (st0[0], st0[0]))


@pytest.mark.parametrize("per_token, factored", [(0.3, True), (200.0, False)])
def test_decays_factor_only_within_range(per_token, factored, monkeypatch):
    """Finite inputs with mild decays take long chunks whose decays factor into matmuls; strong
    decays (200 per token) the masked decay tensor in short chunks. Both equal the loop, with gradients."""
    import importlib
    mod = importlib.import_module("rnnlab.ops.gsa")
    chunks = []
    original = mod._block
    monkeypatch.setattr(mod, "_block", lambda *a: chunks.append(a[6]) or original(*a))
    fits = []
    fit = mod.decay_factors_fit
    monkeypatch.setattr(mod, "decay_factors_fit", lambda x: fits.append(fit(x)) or fits[-1])
    q, k, v, s, _, (K0, V0) = make(T=150)
    log_g = -per_token * (0.5 + torch.rand(s.shape, generator=torch.Generator().manual_seed(1), dtype=s.dtype))
    _equals_reference([q, k, v, s, log_g, K0, V0])
    assert set(chunks) == ({64} if factored else {8}) and set(fits) == {factored}
