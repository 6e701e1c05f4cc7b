"""Dense LTI state spaces (LSSL): the convolution form equals the loop (float64, with gradients)."""
import math

import pytest
import torch

from rnnlab.ops import tuning
from rnnlab.ops.lti import bilinear, hippo_legs, legendre_delay, lti, lti_conv, lti_recurrent, lti_scan, zoh


def make(B=2, T=45, D=3, N=4, seed=0, kind="dense"):
    g = torch.Generator().manual_seed(seed)
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    if kind == "dense":  # LSSL: HiPPO-LegS, bilinear
        A, Bv = hippo_legs(N, torch.float64)
        dA, dB = bilinear(A, Bv, torch.exp(r(D) - 3))
        return r(B, T, D), dA, dB, r(D, N), r(B, D, N)
    if kind == "lmu":  # the LMU's Legendre delay system, zero-order hold, one window per channel
        A, Bv = legendre_delay(N, 1.0, torch.float64)
        dA, dB = zoh(A, Bv, 1 / (4 + 20 * torch.rand(D, generator=g, dtype=torch.float64)))
        return r(B, T, D), dA, dB, r(D, N), r(B, D, N)
    if kind == "diagonal":  # real diagonal, negative entries included
        return r(B, T, D), torch.rand(D, N, generator=g, dtype=torch.float64) * 1.8 - 0.9, r(D, N), r(D, N), r(B, D, N)
    c = lambda *s: torch.complex(r(*s), r(*s))  # noqa: E731  (S4D: complex diagonal inside the unit disc)
    dA = torch.exp(torch.complex(-torch.rand(D, N, generator=g, dtype=torch.float64), 3 * r(D, N)))
    return r(B, T, D), dA, c(D, N), c(D, N), c(B, D, N)


@pytest.mark.parametrize("T", [1, 2, 7, 64, 100])
@pytest.mark.parametrize("with_state", [False, True])
@pytest.mark.parametrize("kind,form,readout", [
    ("dense", "conv", True), ("diagonal", "conv", True), ("complex", "conv", True), ("diagonal", "scan", True),
    ("complex", "scan", True), ("lmu", "conv", True),
    ("lmu", "conv", False), ("dense", "conv", False), ("diagonal", "conv", False), ("complex", "conv", False),
    ("diagonal", "scan", False), ("complex", "scan", False)])
def test_fast_forms_equal_recurrent_with_gradients(T, with_state, kind, form, readout):
    """Outputs (C h_t, or the states h_t themselves without C), final state and every gradient."""
    u, dA, dB, C, h0 = make(T=T, kind=kind)
    args = [u, dA, dB, C] + ([h0] if with_state else [])
    l1 = [a.clone().requires_grad_() for a in args]
    l2 = [a.clone().requires_grad_() for a in args]
    if not readout:
        l1[3] = l2[3] = None
    y1, h1 = lti_recurrent(*l1)
    y2, h2 = (lti_conv if form == "conv" else lti_scan)(*l2)
    assert y1.shape == (2, T, 3) + (() if readout else (4,))
    torch.testing.assert_close(y2, y1)
    torch.testing.assert_close(h2, h1)
    cy, ch = torch.randn_like(y1), torch.randn_like(h1)
    f1 = ((y1 * cy).sum() + (h1 * ch).sum()).real
    f2 = ((y2 * cy).sum() + (h2 * ch).sum()).real
    names = [n for n, t in zip(["u", "dA", "dB", "C", "initial_state"], l1) if t is not None]
    g1 = torch.autograd.grad(f1, [t for t in l1 if t is not None], allow_unused=True)
    g2 = torch.autograd.grad(f2, [t for t in l2 if t is not None], allow_unused=True)
    for name, a, b, x in zip(names, g1, g2, [x for x, t in zip(args, l1) if t is not None]):
        zero = torch.zeros_like(x)  # T = 1 from zeros: dA is unused (or used with zero gradient)
        torch.testing.assert_close(zero if b is None else b, zero if a is None else a, msg=f"gradient of {name}")


@pytest.mark.parametrize("kind,B", [("dense", 2), ("complex", 1), ("complex", 2)])  # every branch of lti
def test_splitting_and_dispatch(kind, B):
    u, dA, dB, C, h0 = make(B=B, T=30, kind=kind)
    y, h = lti(u, dA, dB, C, h0)
    ya, ha = lti(u[:, :1], dA, dB, C, h0)
    yb, hb = lti(u[:, 1:], dA, dB, C, ha)
    torch.testing.assert_close(torch.cat([ya, yb], 1), y)
    torch.testing.assert_close(hb, h)


def test_hippo_legs_and_bilinear_by_hand():
    A, B = hippo_legs(4, torch.float64)
    s3, s5, s7, s15, s21, s35 = (math.sqrt(v) for v in (3, 5, 7, 15, 21, 35))
    torch.testing.assert_close(A, torch.tensor([[-1.0, 0, 0, 0],
                                                [-s3, -2, 0, 0],
                                                [-s5, -s15, -3, 0],
                                                [-s7, -s21, -s35, -4]], dtype=torch.float64))
    torch.testing.assert_close(B, torch.tensor([1.0, s3, s5, s7], dtype=torch.float64))
    A2 = torch.tensor([[-1.0, 0.0], [-2.0, -3.0]], dtype=torch.float64)
    B2 = torch.tensor([1.0, 2.0], dtype=torch.float64)
    dt = torch.tensor([0.5], dtype=torch.float64)
    dA, dB = bilinear(A2, B2, dt)
    inv = torch.linalg.inv(torch.eye(2, dtype=torch.float64) - 0.25 * A2)
    torch.testing.assert_close(dA[0], inv @ (torch.eye(2, dtype=torch.float64) + 0.25 * A2))
    torch.testing.assert_close(dB[0], inv @ (0.5 * B2))


def test_legs_long_sequence_is_stable_in_float32():
    A, B = hippo_legs(64)
    dA, dB = bilinear(A, B, torch.full((4,), 1e-2))
    u = torch.randn(1, 2048, 4)
    y, h = lti_conv(u, dA, dB, torch.randn(4, 64) / 8, torch.randn(1, 4, 64))
    assert torch.isfinite(y).all() and torch.isfinite(h).all()
    y_ref, h_ref = lti_recurrent(u[:, :256], dA, dB, torch.randn(4, 64) / 8)
    assert torch.isfinite(y_ref).all()


def test_bad_shapes():
    u, dA, dB, C, h0 = make()
    with pytest.raises(ValueError, match="dB"):
        lti(u, dA, dB[:, :2], C)
    with pytest.raises(ValueError, match="dA"):
        lti(u, dA[:2], dB, C)
    with pytest.raises(ValueError, match="initial_state"):
        lti(u, dA, dB, C, h0[:, :1])
    with pytest.raises(ValueError, match="u must"):
        lti_conv(u[0], dA, dB, C)
    with pytest.raises(ValueError, match="C must"):
        lti_conv(u, dA, dB, C[:, :2])
    with pytest.raises(ValueError, match="N must"):
        hippo_legs(0)
    A, Bv = hippo_legs(4, torch.float64)
    with pytest.raises(ValueError, match="dt must"):
        bilinear(A, Bv, torch.tensor(0.1))
    with pytest.raises(ValueError, match="A must"):
        bilinear(A.expand(2, 4, 4), Bv, torch.ones(3))
    with pytest.raises(ValueError, match="B must"):
        bilinear(A, Bv[:3], torch.ones(3))


def test_long_sequences_run_the_convolution_in_chunks():
    """Past the tuning table's lti.conv_chunk tokens the convolution runs chunk by chunk with the
    state passed along."""
    for kind in ("dense", "complex"):
        u, dA, dB, C, h0 = make(B=2, T=45, kind=kind)
        leaves = [t.clone().requires_grad_() for t in (u, dA, dB, C, h0)]
        with tuning.override(cpu={"lti.conv_chunk": 16}):
            y, h = lti(*leaves)
        y_ref, h_ref = lti_recurrent(u, dA, dB, C, h0)
        torch.testing.assert_close(y, y_ref)
        torch.testing.assert_close(h, h_ref)
        ((y * y.conj()).real.sum() + (h * h.conj()).real.sum()).backward()
        assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in leaves)


@pytest.mark.parametrize("kind", ["dense", "complex"])
@pytest.mark.parametrize("chunk", [None, 16])
def test_convolution_keeps_a_nan_from_earlier_tokens(kind, chunk):
    """A NaN input at token p of channel d: the convolution form (whose FFT would spread it over the
    whole sequence) leaves every token before p and every other channel as they were, and makes
    channel d non-finite from p on and in the final state, as the loop does."""
    u, dA, dB, C, h0 = make(T=45, kind=kind)
    bad = u.clone()
    bad[1, 30, 2] = float("nan")
    y, h = lti_conv(bad, dA, dB, C, h0, chunk_size=chunk)
    y_ref, h_ref = lti_recurrent(bad, dA, dB, C, h0)
    clean, _ = lti_conv(u, dA, dB, C, h0, chunk_size=chunk)
    assert torch.equal(torch.isfinite(y), torch.isfinite(y_ref)) and torch.equal(torch.isfinite(h), torch.isfinite(h_ref))
    assert not torch.isfinite(y[1, 30:, 2]).any() and torch.isfinite(y[1, :30]).all()
    torch.testing.assert_close(y[torch.isfinite(y)], clean[torch.isfinite(y)], rtol=0, atol=1e-12)


def test_legendre_delay_and_zoh_by_hand():
    """The LMU's (A, B) for N = 3 written out; zero-order hold against its power series and, for a
    scalar system, against exp(-a dt) and b (1 - exp(-a dt)) / a."""
    A, B = legendre_delay(3, 2.0, torch.float64)
    torch.testing.assert_close(A, torch.tensor([[-1.0, -1, -1], [3, -3, -3], [-5, 5, -5]], dtype=torch.float64) / 2)
    torch.testing.assert_close(B, torch.tensor([1.0, -3, 5], dtype=torch.float64) / 2)
    A, B = legendre_delay(6, 7.0, torch.float64)
    dt = torch.tensor([1.0, 0.3], dtype=torch.float64)
    dA, dB = zoh(A, B, dt)
    for d in range(2):
        M = torch.zeros(7, 7, dtype=torch.float64)
        M[:6, :6], M[:6, 6] = A * dt[d], B * dt[d]
        E, term = torch.eye(7, dtype=torch.float64), torch.eye(7, dtype=torch.float64)
        for k in range(1, 40):
            term = term @ M / k
            E = E + term
        torch.testing.assert_close(dA[d], E[:6, :6], rtol=0, atol=1e-13)
        torch.testing.assert_close(dB[d], E[:6, 6], rtol=0, atol=1e-13)
    a, b, h = 0.7, 1.3, torch.tensor([0.5], dtype=torch.float64)
    dA, dB = zoh(torch.tensor([[-a]], dtype=torch.float64), torch.tensor([b], dtype=torch.float64), h)
    torch.testing.assert_close(dA[0, 0, 0], torch.exp(-a * h[0]))
    torch.testing.assert_close(dB[0, 0], b * (1 - torch.exp(-a * h[0])) / a)
    with pytest.raises(ValueError, match="theta"):
        legendre_delay(4, 0.0)
    with pytest.raises(ValueError, match="dt must"):
        zoh(A, B, torch.tensor(1.0))


def test_legendre_memory_holds_the_window():
    """The LMU's defining property: the memory of order N and window theta decodes the input theta
    steps ago as sum_i m_i (the shifted Legendre polynomials at 1) and the current input as
    sum_i (-1)^i m_i, here to within 0.05 for a smooth signal (N = 12, theta = 50 steps)."""
    A, B = legendre_delay(12, 50.0, torch.float64)
    dA, dB = zoh(A, B, torch.ones(1, dtype=torch.float64))
    t = torch.arange(400, dtype=torch.float64)
    u = torch.sin(2 * math.pi * t / 80) + 0.5 * torch.cos(2 * math.pi * t / 130)
    m, _ = lti(u[None, :, None], dA, dB, None)  # (1, T, 1, N): the memory itself
    m = m[0, :, 0]
    assert (m.sum(-1)[100:] - u[50:350]).abs().max() < 0.05
    assert (m @ (-1.0) ** torch.arange(12, dtype=torch.float64))[100:].sub(u[100:]).abs().max() < 0.05


@pytest.mark.parametrize("kind", ["lmu", "complex"])
def test_states_output_in_chunks_and_packed(kind):
    """Without C the chunked convolution and packed rows (cu_seqlens) give the loop's states."""
    u, dA, dB, _, h0 = make(B=1, T=45, kind=kind)
    with tuning.override(cpu={"lti.conv_chunk": 16}):
        y, h = lti_conv(u, dA, dB, None, h0)
    y_ref, h_ref = lti_recurrent(u, dA, dB, None, h0)
    torch.testing.assert_close(y, y_ref)
    torch.testing.assert_close(h, h_ref)
    cu = torch.tensor([0, 5, 5, 30, 45])
    h0s = make(B=4, kind=kind)[4]
    y, h = lti_conv(u, dA, dB, None, h0s, cu_seqlens=cu)
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        if a == b:  # an empty sequence keeps its initial state
            torch.testing.assert_close(h[n], h0s[n])
            continue
        y_n, h_n = lti_recurrent(u[:, a:b], dA, dB, None, h0s[n:n + 1])
        torch.testing.assert_close(y[:, a:b], y_n)
        torch.testing.assert_close(h[n:n + 1], h_n)
