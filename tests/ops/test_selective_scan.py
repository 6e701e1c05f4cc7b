"""Mamba-1's selective scan: the chunked form equals the reference loop (float64, with gradients)."""
import pytest
import torch
import torch.nn.functional as F

from rnnlab.ops import selective_scan, selective_scan_recurrent, selective_scan_step


def make(B=2, T=45, D=6, N=4, G=None, seed=0):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u, dt, z = r(B, T, D), F.softplus(r(B, T, D)), r(B, T, D)
    A = -torch.exp(r(D, N))
    Bm, Cm = (r(B, T, N), r(B, T, N)) if G is None else (r(B, T, G, N), r(B, T, G, N))
    return u, dt, A, Bm, Cm, r(D), z, r(B, D, N)


@pytest.mark.parametrize("G", [None, 2])
@pytest.mark.parametrize("neg", [False, True])
@pytest.mark.parametrize("with_dz", [False, True])
def test_chunked_equals_reference_with_gradients(G, neg, with_dz):
    u, dt, A, Bm, Cm, D, z, h0 = make(G=G)
    if not with_dz:
        D, z = None, None
    args = [u, dt, A, Bm, Cm, D, z, h0]
    leaves = [None if a is None else a.clone().requires_grad_() for a in args]
    leaves2 = [None if a is None else a.clone().requires_grad_() for a in args]
    y1, h1 = selective_scan_recurrent(*leaves, allow_neg_eigval=neg)
    y2, h2 = selective_scan(*leaves2, allow_neg_eigval=neg, chunk_size=16)
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(h2, h1)
    cot, cot_h = torch.randn_like(y1), torch.randn_like(h1)
    g1 = torch.autograd.grad((y1 * cot).sum() + (h1 * cot_h).sum(), [a for a in leaves if a is not None])
    g2 = torch.autograd.grad((y2 * cot).sum() + (h2 * cot_h).sum(), [a for a in leaves2 if a is not None])
    for a, b in zip(g1, g2):
        torch.testing.assert_close(b, a)


def test_step_and_splitting():
    u, dt, A, Bm, Cm, D, z, h0 = make(T=20)
    y, h = selective_scan(u, dt, A, Bm, Cm, D, z, h0)
    ya, ha = selective_scan(u[:, :7], dt[:, :7], A, Bm[:, :7], Cm[:, :7], D, z[:, :7], h0)
    yb, hb = selective_scan(u[:, 7:], dt[:, 7:], A, Bm[:, 7:], Cm[:, 7:], D, z[:, 7:], ha)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y)
    torch.testing.assert_close(hb, h)
    y1, h1 = selective_scan_step(u[:, 0], dt[:, 0], A, Bm[:, 0], Cm[:, 0], D, z[:, 0], h0)
    torch.testing.assert_close(y1, y[:, 0])


def test_bad_shapes():
    u, dt, A, Bm, Cm, D, z, h0 = make()
    with pytest.raises(ValueError, match="A must"):
        selective_scan(u, dt, A[:3], Bm, Cm)
    with pytest.raises(ValueError, match="B must"):
        selective_scan(u, dt, A, Bm[..., :2], Cm)
    with pytest.raises(ValueError, match="initial_state"):
        selective_scan(u, dt, A, Bm, Cm, initial_state=h0[:, :2])
