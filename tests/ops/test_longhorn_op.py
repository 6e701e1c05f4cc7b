"""Longhorn's update: the chunked form equals the reference loop (float64, with gradients)."""
import pytest
import torch

from rnnlab.ops.longhorn import longhorn, longhorn_recurrent


def make(B=2, T=45, D=6, N=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r(B, T, N), r(B, T, N), r(B, T, D), torch.sigmoid(r(B, T, D)), r(B, D, N)


@pytest.mark.parametrize("T,chunk", [(1, 16), (45, 16), (45, 64)])
def test_chunked_equals_reference_with_gradients(T, chunk):
    args = make(T=T)
    l1 = [a.clone().requires_grad_() for a in args]
    l2 = [a.clone().requires_grad_() for a in args]
    o1, S1 = longhorn_recurrent(*l1)
    o2, S2 = longhorn(*l2, chunk_size=chunk)
    torch.testing.assert_close(o2, o1)
    torch.testing.assert_close(S2, S1)
    cot, cot_S = torch.randn_like(o1), torch.randn_like(S1)
    g1 = torch.autograd.grad((o1 * cot).sum() + (S1 * cot_S).sum(), l1)
    g2 = torch.autograd.grad((o2 * cot).sum() + (S2 * cot_S).sum(), l2)
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


def test_splitting_and_zero_state():
    q, k, v, beta, S0 = make(T=20)
    o, S = longhorn(q, k, v, beta, S0)
    oa, Sa = longhorn(q[:, :7], k[:, :7], v[:, :7], beta[:, :7], S0)
    ob, Sb = longhorn(q[:, 7:], k[:, 7:], v[:, 7:], beta[:, 7:], Sa)
    torch.testing.assert_close(torch.cat([oa, ob], 1), o)
    torch.testing.assert_close(Sb, S)
    o0, _ = longhorn(q, k, v, beta)
    oz, _ = longhorn_recurrent(q, k, v, beta, torch.zeros_like(S0))
    torch.testing.assert_close(o0, oz)


def test_decay_stays_in_unit_interval_for_large_keys():
    """eps k_n² <= beta ||k||² / (1 + beta ||k||²) < 1: the state stays bounded even for huge keys."""
    q, k, v, beta, _ = make(T=200)
    o, S = longhorn(q, 100 * k, v, beta)
    assert torch.isfinite(o).all() and S.abs().max() < 10 * v.abs().max() / 100 + 1


def test_bad_shapes():
    q, k, v, beta, S0 = make()
    with pytest.raises(ValueError, match="beta"):
        longhorn(q, k, v, beta[:, :, :2])
    with pytest.raises(ValueError, match="q must"):
        longhorn(q[..., :2], k, v, beta)
    with pytest.raises(ValueError, match="initial_state"):
        longhorn(q, k, v, beta, S0[:, :2])
