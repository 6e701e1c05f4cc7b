"""Linear time-invariant state spaces (LSSL, Gu et al. 2021; S4D, Gu et al. 2022), per channel.

Per channel d (of D), with a state h (N) and fixed discrete matrices:

    h_t = dA[d] h_{t-1} + dB[d] u_t[d],      y_t[d] = sum_n C[d, n] h_t[n]   (or y_t[d] = h_t if C is None)

dA is dense, (D, N, N) real (LSSL's HiPPO-LegS), or diagonal, (D, N) real or complex (S4D), in
which case ``dA[d] h`` is elementwise. Forms: :func:`lti_recurrent` (the definition, a loop over
time); :func:`lti_scan` (diagonal dA: chunked parallel scans of family A); :func:`lti_conv` (y is
the causal convolution of u with the kernel K_l = C dA^l dB — Krylov / Vandermonde vectors built
by doubling in log2(T) steps, applied with an FFT; the initial state adds C dA^(t+1) h_0 and the
final state is dA^T h_0 + sum_s dA^(T-1-s) dB u_s); :func:`lti` (the dispatch layers call). Also :func:`hippo_legs` (the
HiPPO-LegS matrices), :func:`legendre_delay` (the Legendre Memory Unit's delay system),
:func:`bilinear` (the discretisation LSSL uses) and :func:`zoh` (zero-order hold, as the LMU's).

Shapes: u (B, T, D) real; dA (D, N, N) or (D, N); dB, C (D, N); state h (B, D, N). With complex
dB, C or dA, h and y are complex (S4D takes 2 Re(y)). With ``C=None`` every form returns the states
themselves, y (B, T, D, N): the LMU reads its whole memory, not one projection of it.
"""
from __future__ import annotations

import math

import torch

from . import tuning
from .registry import implementation, select
from .bounds import check_cu_seqlens, known_finite, state_rows, token_carry
from .scan import linear_scan, over_compiled_chunks, over_time_chunks

__all__ = ["hippo_legs", "legendre_delay", "bilinear", "zoh", "lti", "lti_conv", "lti_recurrent", "lti_scan",
           "lti_scan_compiled"]


def hippo_legs(N: int, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """HiPPO-LegS (Gu et al. 2020): A[n, k] = -sqrt(2n+1) sqrt(2k+1) for n > k, -(n+1) for n = k,
    0 above the diagonal; B[n] = sqrt(2n+1). Returns (A (N, N), B (N,))."""
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    q = torch.sqrt(2 * torch.arange(N, dtype=torch.float64) + 1)  # (N,)
    A = -torch.tril(q[:, None] * q[None, :], diagonal=-1) - torch.diag(torch.arange(1, N + 1, dtype=torch.float64))
    return A.to(dtype), q.to(dtype)


def legendre_delay(N: int, theta: float, dtype: torch.dtype = torch.float32) -> tuple[torch.Tensor, torch.Tensor]:
    """The Legendre delay system of order N and window theta (Voelker et al. 2019, the LMU), whose
    state holds the last theta time units of its input in the first N shifted Legendre polynomials:
    A[i, j] = (2i+1)/theta · (-1 if i < j else (-1)^(i-j+1)), B[i] = (2i+1)/theta · (-1)^i.
    Returns (A (N, N), B (N,))."""
    if not isinstance(N, int) or N < 1:
        raise ValueError(f"N must be a positive int, got {N!r}")
    if not theta > 0:
        raise ValueError(f"theta must be > 0, got {theta!r}")
    i = torch.arange(N, dtype=torch.float64)
    r = (2 * i + 1) / theta  # (N,)
    d = i[:, None] - i[None, :]  # (N, N) i - j
    A = r[:, None] * torch.where(d < 0, -1.0, (-1.0) ** (d + 1))
    return A.to(dtype), (r * (-1.0) ** i).to(dtype)


def zoh(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Zero-order hold with step dt per channel: dA = exp(dt A), dB = A^-1 (exp(dt A) - I) B, both
    read off one matrix exponential of [[A, B], [0, 0]] dt (no inverse of A needed).
    A (N, N) or (D, N, N); B (N,) or (D, N); dt (D,). Returns (dA (D, N, N), dB (D, N))."""
    if dt.dim() != 1:
        raise ValueError(f"dt must be (D,), got {tuple(dt.shape)}")
    N, D = A.shape[-1], dt.shape[0]
    if A.shape[-2:] != (N, N) or A.dim() not in (2, 3) or (A.dim() == 3 and A.shape[0] != D):
        raise ValueError(f"A must be (N, N) or (D, N, N) with D = {D} (the length of dt), got {tuple(A.shape)}")
    if B.shape[-1] != N or B.dim() not in (1, 2) or (B.dim() == 2 and B.shape[0] != D):
        raise ValueError(f"B must be (N,) or (D, N) with D = {D}, N = {N}, got {tuple(B.shape)}")
    M = A.new_zeros(D, N + 1, N + 1)
    M[:, :N, :N] = A
    M[:, :N, N] = B
    E = torch.linalg.matrix_exp(dt[:, None, None] * M)  # (D, N+1, N+1)
    return E[:, :N, :N], E[:, :N, N]


def bilinear(A: torch.Tensor, B: torch.Tensor, dt: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Bilinear (Tustin) discretisation with step dt per channel:
    dA = (I - dt/2 A)^-1 (I + dt/2 A), dB = (I - dt/2 A)^-1 dt B.
    A (N, N) or (D, N, N); B (N,) or (D, N); dt (D,). Returns (dA (D, N, N), dB (D, N))."""
    if dt.dim() != 1:
        raise ValueError(f"dt must be (D,), got {tuple(dt.shape)}")
    N = A.shape[-1]
    D = dt.shape[0]
    if A.shape[-2:] != (N, N) or A.dim() not in (2, 3) or (A.dim() == 3 and A.shape[0] != D):
        raise ValueError(f"A must be (N, N) or (D, N, N) with D = {D} (the length of dt), got {tuple(A.shape)}")
    if B.shape[-1] != N or B.dim() not in (1, 2) or (B.dim() == 2 and B.shape[0] != D):
        raise ValueError(f"B must be (N,) or (D, N) with D = {D}, N = {N}, got {tuple(B.shape)}")
    eye = torch.eye(N, dtype=A.dtype, device=A.device)
    half = (dt / 2)[:, None, None] * A  # (D, N, N)
    lhs = eye - half
    dA = torch.linalg.solve(lhs, eye + half)  # (D, N, N)
    dB = torch.linalg.solve(lhs, (dt[:, None] * B.expand(dt.shape[0], N)).unsqueeze(-1)).squeeze(-1)  # (D, N)
    return dA, dB


def _check(u, dA, dB, C, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    if u.dim() != 3:
        raise ValueError(f"u must be (B, T, D), got {tuple(u.shape)}")
    Bsz, T, D = u.shape
    if u.is_complex():
        raise ValueError(f"u must be real, got {u.dtype}")
    dense = dA.dim() == 3
    if dA.shape[0] != D or dA.dim() not in (2, 3) or (dense and dA.shape[1] != dA.shape[2]):
        raise ValueError(f"dA must be (D, N, N) (dense) or (D, N) (diagonal) with D = {D}, got {tuple(dA.shape)}")
    N = dA.shape[1]
    for name, X in (("dB", dB), ("C", C)):
        if X is not None and X.shape != (D, N):
            raise ValueError(f"{name} must be (D, N) = ({D}, {N}), got {tuple(X.shape)}")
    cu = check_cu_seqlens(cu_seqlens, Bsz, T)
    R, rows = state_rows(Bsz, cu), ("B" if cu is None else "N")
    if initial_state is not None and initial_state.shape != (R, D, N):
        raise ValueError(f"initial_state must be ({rows}, D, N) = ({R}, {D}, {N}), got {tuple(initial_state.shape)}")
    return cu


def _cast(acc, *ts):
    """Real tensors to ``acc``, complex ones to its complex counterpart."""
    cplx = torch.complex128 if acc == torch.float64 else torch.complex64
    return [None if t is None else t.to(cplx if t.is_complex() else acc) for t in ts]


def _state_dtype(acc, *ts):
    cplx = torch.complex128 if acc == torch.float64 else torch.complex64
    return cplx if any(t is not None and t.is_complex() for t in ts) else acc


def _out(y, dtype):
    """y in u's dtype when real; complex y stays complex64/complex128 (no low-precision complex)."""
    return y if y.is_complex() else y.to(dtype)


def lti_recurrent(u, dA, dB, C, initial_state=None, cu_seqlens=None):
    """The definition: a loop over time. Returns (y (B, T, D), final_state (B, D, N)); with
    ``cu_seqlens`` (N sequences packed in one row, B = 1; :mod:`rnnlab.ops.bounds`) h is reset to
    sequence n's initial state (row n, or zeros) at its first token and the final state is (N, D, N).
    With ``C=None``, y is the states (B, T, D, N)."""
    cu = _check(u, dA, dB, C, initial_state, cu_seqlens)
    acc, dtype = torch.promote_types(u.dtype, torch.float32), u.dtype
    hdt = _state_dtype(acc, dA, dB, C, initial_state)
    u, dA, dB, C = _cast(acc, u, dA, dB, C)
    carry = token_carry(cu, None if initial_state is None else initial_state.to(hdt),
                        lambda rows: u.new_zeros(rows, *dB.shape, dtype=hdt), u.shape[0], u.shape[1])
    h, ys = None, []
    for t in range(u.shape[1]):
        h = carry.enter(t, h)
        Ah = (dA @ h.unsqueeze(-1)).squeeze(-1) if dA.dim() == 3 else dA * h
        h = Ah + dB * u[:, t, :, None]  # (B, D, N)
        carry.leave(t, h)
        ys.append(h if C is None else (C * h).sum(-1))  # (B, D) | (B, D, N)
    return _out(torch.stack(ys, dim=1), dtype), carry.final()


def _powers(dA: torch.Tensor, v: torch.Tensor, L: int) -> torch.Tensor:
    """[v, dA v, dA² v, ...] for L terms by doubling: dA (D, N, N) or (D, N), v (..., D, N) -> (..., D, N, L)."""
    dense = dA.dim() == 3
    K, P = v.unsqueeze(-1), dA  # P = dA^(number of columns so far)
    while K.shape[-1] < L:
        K = torch.cat([K, P @ K if dense else P.unsqueeze(-1) * K], dim=-1)
        P = P @ P if dense else P * P
    return K[..., :L]


def _causal_conv(u: torch.Tensor, K: torch.Tensor) -> torch.Tensor:
    """y_t = sum_{s<=t} K_{t-s} u_s per channel, by FFT: u (B, T, D) real, K (D, T) or (D, N, T)
    (N kernels per channel) real or complex -> y (B, T, D) or (B, T, D, N)."""
    T, extra = u.shape[1], K.dim() - 2
    n = 2 ** math.ceil(math.log2(2 * T))  # zero-padded: no wrap-around
    Kr = torch.stack([K.real, K.imag]) if K.is_complex() else K  # ([2,] D, [N,] T)
    uf = torch.fft.rfft(u.transpose(1, 2), n=n)  # (B, D, F)
    uf = uf.unsqueeze(-2) if extra else uf  # (B, D, [1,] F)
    y = torch.fft.irfft(uf * torch.fft.rfft(Kr, n=n).unsqueeze(-3 - extra), n=n)[..., :T]  # ([2,] B, D, [N,] T)
    y = y.movedim(-1, -2 - extra)  # ([2,] B, T, D, [N])
    return torch.complex(y[0], y[1]) if K.is_complex() else y


def _kernels(dA, dB, C, L: int, with_state: bool):
    """What the convolution form needs for chunks of up to L tokens: V_l = dA^l dB (D, N, L), the
    kernel K_l = C V_l (D, L) (V itself without C), and with a state W_t = C dA^(t+1) (D, L, N)
    (without C: for a diagonal dA, dA^(t+1) (D, L, N); for a dense one None, built per call from
    the state) and dA^L."""
    dense = dA.dim() == 3
    if dense:
        V = _powers(dA, dB, L)  # (D, N, L)
    else:
        P = _powers(dA, torch.ones_like(dA), L)  # (D, N, L): dA^l, a Vandermonde matrix
        V = P * dB.unsqueeze(-1)
    K = V if C is None else torch.einsum("dn,dnl->dl", C, V)  # (D, L) | (D, N, L)
    if not with_state:
        return V, K, None, None
    if dense and C is None:
        return V, K, None, torch.linalg.matrix_power(dA, L)
    if dense:
        At = dA.transpose(-1, -2)
        W = _powers(At, (At @ C.unsqueeze(-1)).squeeze(-1), L).transpose(-1, -2)  # (D, L, N): C dA^(t+1)
        return V, K, W, torch.linalg.matrix_power(dA, L)
    return V, K, (P * (dA if C is None else C * dA).unsqueeze(-1)).transpose(-1, -2), P[..., -1] * dA


def _conv_apply(u, dA, kernels, h0):
    """One convolution pass over u (B, T, D), T <= the kernels' length L; h0 None or (B, D, N)."""
    V, K, W, A_L = kernels
    T, dense, states = u.shape[1], dA.dim() == 3, K.dim() == 3
    y = _causal_conv(u, K[..., :T])  # (B, T, D) | (B, T, D, N) without C
    h = torch.einsum("dnl,bld->bdn", V[..., :T], u.flip(1).to(V.dtype))  # sum_s dA^(T-1-s) dB u_s
    if h0 is not None:
        if not states:
            y = y + torch.einsum("dtn,bdn->btd", W[:, :T], h0)  # C dA^(t+1) h_0
        elif dense:  # dA^(t+1) h_0: Krylov vectors of each row's state
            y = y + _powers(dA, (dA @ h0.unsqueeze(-1)).squeeze(-1), T).movedim(-1, 1)  # (B, T, D, N)
        else:
            y = y + W[:, :T].transpose(0, 1) * h0.unsqueeze(1)  # (T, D, N) * (B, 1, D, N) -> (B, T, D, N)
        A_T = A_L if T == K.shape[1] else (torch.linalg.matrix_power(dA, T) if dense else dA ** T)
        h = h + ((A_T @ h0.unsqueeze(-1)).squeeze(-1) if dense else A_T * h0)
    return y, h


def lti_conv(u, dA, dB, C, initial_state=None, chunk_size=None, cu_seqlens=None):
    """Convolution form (same results as :func:`lti_recurrent`). Past ``chunk_size`` tokens (None:
    the tuning table's ``lti.conv_chunk``) it runs on time-chunks of that length with the state
    passed between them and the chunk kernels computed once: the kernel's Krylov vectors take
    D·N·T memory, so bounding T bounds it; under autograd each chunk is recomputed. With
    ``cu_seqlens`` it convolves sequence by sequence (one convolution over the packed row would
    mix them).

    An FFT spreads a non-finite input over every output; so a non-finite u_s[d] is zeroed for the
    convolution (a selection) and channel d is made NaN from token s on and in the final state,
    where the recurrence makes it non-finite: nothing reaches earlier tokens, and for finite inputs
    nothing is selected (results and gradients are the convolution's)."""
    cu = _check(u, dA, dB, C, initial_state, cu_seqlens)
    if cu is not None:
        ys, finals = [], []
        for n, (a, b) in enumerate(zip(cu, cu[1:])):
            h0 = None if initial_state is None else initial_state[n:n + 1]
            if b == a:  # an empty sequence keeps its initial state
                hdt = _state_dtype(torch.promote_types(u.dtype, torch.float32), dA, dB, C, initial_state)
                finals.append(u.new_zeros(1, *dB.shape, dtype=hdt) if h0 is None else h0.to(hdt))
                continue
            y, h = lti_conv(u[:, a:b], dA, dB, C, h0, chunk_size)
            ys.append(y)
            finals.append(h)
        return torch.cat(ys, dim=1), torch.cat(finals)
    acc, dtype = torch.promote_types(u.dtype, torch.float32), u.dtype
    hdt = _state_dtype(acc, dA, dB, C, initial_state)
    u, dA, dB, C = _cast(acc, u, dA, dB, C)
    bad = None if known_finite(u) else ~torch.isfinite(u)  # (B, T, D): the FFT would spread a NaN everywhere
    if bad is not None:
        u = torch.where(bad, 0.0, u)
    T = u.shape[1]
    L = min(T, chunk_size or tuning.get("lti.conv_chunk", u.device))
    kernels = _kernels(dA, dB, C, L, with_state=initial_state is not None or T > L)
    if T == L:
        y, h = _conv_apply(u, dA, kernels, None if initial_state is None else initial_state.to(hdt))
    else:
        h0 = u.new_zeros(u.shape[0], *dB.shape, dtype=hdt) if initial_state is None else initial_state.to(hdt)
        y, h = over_time_chunks(lambda u, h: _conv_apply(u, dA, kernels, h), (u,), h0, L)
    if bad is not None:
        reached = bad.cumsum(dim=1) > 0  # (B, T, D): from each bad input on
        y = y.masked_fill(reached if y.dim() == 3 else reached[..., None], float("nan"))  # (B, T, D[, N])
        h = h.masked_fill(bad.any(dim=1)[..., None], float("nan"))  # (B, D, N)
    return _out(y, dtype), h.to(hdt)


def _scan_chunk(u, h, dA, dB, C, cu_seqlens=None):
    hs, h_last = linear_scan(dA.expand(*u.shape, dA.shape[-1]), dB * u.unsqueeze(-1), h,
                             cu_seqlens=cu_seqlens)  # (B, Tc, D, N)
    return (hs if C is None else (hs * C).sum(-1)), h_last


def lti_scan(u, dA, dB, C, initial_state=None, chunk_size=None, cu_seqlens=None):
    """Diagonal dA only: the recurrence as parallel scans over time-chunks of ``chunk_size`` (None:
    the tuning table's ``lti.scan_time_chunk``; family A); same results as :func:`lti_recurrent`
    (with ``cu_seqlens``: segmented scans over the pieces of the sequences in each time-chunk)."""
    cu = _check(u, dA, dB, C, initial_state, cu_seqlens)
    if dA.dim() != 2:
        raise ValueError(f"lti_scan needs a diagonal dA (D, N), got {tuple(dA.shape)}")
    acc, dtype = torch.promote_types(u.dtype, torch.float32), u.dtype
    hdt = _state_dtype(acc, dA, dB, C, initial_state)
    u, dA, dB, C = _cast(acc, u, dA, dB, C)
    zeros = lambda rows: u.new_zeros(rows, *dB.shape, dtype=hdt)  # noqa: E731
    init = None if initial_state is None else initial_state.to(hdt)
    chunk_size = chunk_size or tuning.get("lti.scan_time_chunk", u.device)
    if cu is None:
        y, h = over_time_chunks(lambda u, h: _scan_chunk(u, h, dA, dB, C), (u,),
                                zeros(u.shape[0]) if init is None else init, chunk_size)
    else:
        y, h = over_time_chunks(lambda u, h, cu: _scan_chunk(u, h, dA, dB, C, cu), (u,), init, chunk_size, cu, zeros)
    return _out(y, dtype), h


def _unrolled(u, h, dA, dB, C):
    """One time-chunk of the diagonal recurrence as a loop over its tokens, for ``torch.compile``
    (see :func:`rnnlab.ops.scan.over_compiled_chunks`), on real tensors: a complex system comes as
    (real, imaginary) pairs of tensors, multiplied out here. u (B, Tc, D); h (B, D, N); dA, dB, C
    (D, N) -> y (B, Tc, D), h (pairs for a complex system)."""
    if isinstance(h, tuple):  # complex: h <- dA h + dB x, y = sum_n C h
        (hr, hi), (ar, ai), (br, bi), (cr, ci) = h, dA, dB, C
        yr, yi = [], []
        for t in range(u.shape[1]):
            x = u[:, t, :, None]  # (B, D, 1)
            hr, hi = ar * hr - ai * hi + br * x, ar * hi + ai * hr + bi * x  # (B, D, N)
            yr.append((cr * hr - ci * hi).sum(-1))  # (B, D)
            yi.append((cr * hi + ci * hr).sum(-1))
        return (torch.stack(yr, dim=1), torch.stack(yi, dim=1)), (hr, hi)
    ys = []
    for t in range(u.shape[1]):
        h = dA * h + dB * u[:, t, :, None]  # (B, D, N)
        ys.append((C * h).sum(-1))  # (B, D)
    return torch.stack(ys, dim=1), h


def _pairs(t: torch.Tensor):
    """A complex tensor as its (real, imaginary) parts, each contiguous; a real one as itself."""
    return (t.real.contiguous(), t.imag.contiguous()) if t.is_complex() else t


def _complex(t):
    return torch.complex(*t) if isinstance(t, tuple) else t


def _scan_chunk_pairs(u, h, dA, dB, C):
    """:func:`_scan_chunk` with :func:`_unrolled`'s arguments (complex values as pairs)."""
    y, h = _scan_chunk(u, *(_complex(t) for t in (h, dA, dB, C)))
    return _pairs(y), _pairs(h)


def lti_scan_compiled(u, dA, dB, C, initial_state=None, chunk_size=None, cu_seqlens=None):
    """The "compile" backend's scan form: same arguments and results as :func:`lti_scan`, for a
    diagonal dA, with C given and no ``cu_seqlens`` (else the torch backend runs). Full time-chunks
    of the tuning table's ``lti.compile_chunk`` tokens run :func:`_unrolled` compiled, the rest the
    eager chunk. ``chunk_size`` is not used: the unrolled length sets the compile time."""
    if _check(u, dA, dB, C, initial_state, cu_seqlens) is not None or dA.dim() != 2 or C is None:
        raise ValueError("the compiled LTI scan takes a diagonal dA, a C and no cu_seqlens")
    acc, dtype = torch.promote_types(u.dtype, torch.float32), u.dtype
    hdt = _state_dtype(acc, dA, dB, C, initial_state)
    u = u.to(acc)
    dA, dB, C = (t.to(hdt) for t in (dA, dB, C))
    h = u.new_zeros(u.shape[0], *dB.shape, dtype=hdt) if initial_state is None else initial_state.to(hdt)
    y, h = over_compiled_chunks(_unrolled, _scan_chunk_pairs, (u,), _pairs(h), tuning.get("lti.compile_chunk", u.device),
                                _pairs(dA), _pairs(dB), _pairs(C))
    return _out(_complex(y), dtype), _complex(h)


def lti(u, dA, dB, C, initial_state=None, cu_seqlens=None):
    """The LTI state space as layers call it; the form comes from :func:`rnnlab.ops.registry.select`
    (family "lssl" for a dense dA, "s4d" for a diagonal one): one step of the recurrence for one
    token (decoding); for a diagonal dA and small batches (the tuning table's
    ``lti.scan_max_batch``: the scan's work grows with the batch, the convolution's kernel does
    not), chunked scans; the convolution form otherwise.

    ``cu_seqlens``: None, or int64 (N + 1,) for N sequences packed in one row (B = 1), with
    initial and final states of N rows.

    Returns (y (B, T, D) in u's dtype, or complex; final_state (B|N, D, N) in float32 or wider)."""
    _check(u, dA, dB, C, initial_state, cu_seqlens)
    family = "lssl" if dA.dim() == 3 else "s4d"
    form, backend = select(family, u=u, dA=dA, dB=dB, C=C, initial_state=initial_state, cu_seqlens=cu_seqlens)
    return implementation(family, form, backend)(u, dA, dB, C, initial_state, cu_seqlens=cu_seqlens)
