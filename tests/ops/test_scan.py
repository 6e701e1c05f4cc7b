"""Family A: the chunked linear scan equals its reference loop (float64, real and complex)."""
import pytest
import torch

from rnnlab.ops import linear_scan, linear_scan_chunked, linear_scan_loop, linear_scan_recurrent


def make(B=2, T=77, D=3, kind="real", seed=0):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(B, T, D, generator=g, dtype=torch.float64) * 2 - 1  # negative values included
    b = torch.randn(B, T, D, generator=g, dtype=torch.float64)
    h0 = torch.randn(B, D, generator=g, dtype=torch.float64)
    if kind == "complex":
        a = a.abs() * torch.exp(1j * torch.rand(B, T, D, generator=g, dtype=torch.float64) * 6)
        b = b + 1j * torch.randn(B, T, D, generator=g, dtype=torch.float64)
        h0 = h0 + 1j * torch.randn(B, D, generator=g, dtype=torch.float64)
    elif kind == "real_a_complex_b":
        b = b + 1j * torch.randn(B, T, D, generator=g, dtype=torch.float64)
        h0 = h0 + 0j
    return a, b, h0


def _loss_grads(fn, a, b, h0, cot):
    a, b, h0 = (x.detach().requires_grad_() for x in (a, b, h0))
    h, last = fn(a, b, h0)
    loss = (h * cot).real.sum() + last.abs().sum()
    loss.backward()
    return h, last, (a.grad, b.grad, h0.grad)


@pytest.mark.parametrize("form", ["loop", "hillis_steele"])
@pytest.mark.parametrize("kind", ["real", "complex", "real_a_complex_b"])
@pytest.mark.parametrize("T", [1, 5, 64, 77])
def test_fast_forms_equal_reference_complex(kind, T, form):
    """Both fast forms (CPU loop for many lanes, log-depth scan otherwise) on complex values too."""
    a, b, h0 = make(T=T, kind=kind)
    cot = torch.randn(b.shape, dtype=torch.float64)
    fast = linear_scan_loop if form == "loop" else lambda a, b, h: linear_scan_chunked(a, b, h, chunk_size=16)
    h1, l1, g1 = _loss_grads(linear_scan_recurrent, a, b, h0, cot)
    h2, l2, g2 = _loss_grads(fast, a, b, h0, cot)
    torch.testing.assert_close(h2, h1)
    torch.testing.assert_close(l2, l1)
    for name, x, y in zip("a b initial_state".split(), g1, g2):
        torch.testing.assert_close(y, x, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind", ["real", "complex"])
def test_gradcheck(kind):
    a, b, h0 = make(B=1, T=6, D=2, kind=kind)
    args = [x.requires_grad_() for x in (a, b, h0)]
    assert torch.autograd.gradcheck(lambda a, b, h: linear_scan_chunked(a, b, h, chunk_size=4)[0], args)


def test_chunk_size_and_splitting_invariance():
    a, b, h0 = make(T=100, kind="complex")
    h, last = linear_scan(a, b, h0)
    for C in (1, 2, 7, 64, 256):
        torch.testing.assert_close(linear_scan_chunked(a, b, h0, chunk_size=C)[0], h)
    h_a, last_a = linear_scan(a[:, :33], b[:, :33], h0)
    h_b, last_b = linear_scan(a[:, 33:], b[:, 33:], last_a)
    torch.testing.assert_close(torch.cat([h_a, h_b], 1), h)
    torch.testing.assert_close(last_b, last)


@pytest.mark.parametrize("extreme", ["zero", "tiny", "one", "unit_complex"])
def test_extremes_are_finite_and_exact(extreme):
    a, b, h0 = make(T=4096, D=2, kind="complex" if extreme == "unit_complex" else "real")
    if extreme == "zero":
        a = torch.where(torch.rand_like(a) < 0.3, torch.zeros_like(a), a)
    elif extreme == "tiny":
        a = torch.full_like(a, 1e-30)
    elif extreme == "one":
        a = torch.full_like(a, 1 - 1e-7)
    else:
        a = a / a.abs()
    h, last = linear_scan(a, b, h0)
    h_ref, last_ref = linear_scan_recurrent(a, b, h0)
    assert torch.isfinite(torch.view_as_real(h) if h.is_complex() else h).all()
    torch.testing.assert_close(h, h_ref, atol=1e-9, rtol=1e-9)


def test_low_precision_and_bad_shapes():
    a, b, h0 = make(T=50)
    h, _ = linear_scan(a.float(), b.bfloat16(), h0.float())
    assert h.dtype == torch.float32
    torch.testing.assert_close(h.double(), linear_scan_recurrent(a, b, h0)[0], atol=5e-2, rtol=5e-2)
    with pytest.raises(ValueError, match="same shape"):
        linear_scan(a, b[:, :3])
    with pytest.raises(ValueError, match="initial_state"):
        linear_scan(a, b, h0[:, :1])
