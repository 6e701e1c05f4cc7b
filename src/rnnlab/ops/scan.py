"""Kernel family A: the elementwise linear recurrence ``h_t = a_t * h_{t-1} + b_t`` along dim 1.

a, b (B, T, ...) of the same shape, real or complex (a may be real with b complex); the state h
(B, ...). Forms: :func:`linear_scan_recurrent` (the definition), :func:`linear_scan_chunked`
(parallel: a Hillis–Steele scan inside chunks — only products and sums, so zero, negative and
complex ``a`` need no logarithms — and a short carry pass across chunks), :func:`linear_scan_loop`
(a plain loop over time, faster on CPU with many lanes), :func:`linear_scan_step` (one token) and
the dispatch :func:`linear_scan`. The chunked and loop forms have their own backward: the
gradient of a linear scan is the same scan run in reverse, so no intermediate is stored but h.
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import tuning
from .registry import implementation, select

__all__ = ["linear_scan", "linear_scan_recurrent", "linear_scan_chunked", "linear_scan_loop", "linear_scan_step",
           "over_time_chunks"]


def _check(a, b, initial_state):
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (B, T, ...), got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"a and b must be at least (B, T), got {tuple(a.shape)}")
    if initial_state is not None and initial_state.shape != a.shape[:1] + a.shape[2:]:
        raise ValueError(f"initial_state must be (B, ...) = {tuple(a.shape[:1] + a.shape[2:])}, "
                         f"got {tuple(initial_state.shape)}")


def _acc(*xs) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def _out_dtype(a, b) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def linear_scan_recurrent(a, b, initial_state=None):
    """The definition: a loop over time. Returns (h (B, T, ...) in a and b's dtype, h_last (B, ...)
    in the accumulation dtype: float32 or wider, complex if any input is)."""
    _check(a, b, initial_state)
    acc = _acc(a, b, initial_state)
    h = torch.zeros_like(b[:, 0], dtype=acc) if initial_state is None else initial_state.to(acc)
    hs = []
    for t in range(a.shape[1]):
        h = a[:, t].to(acc) * h + b[:, t].to(acc)
        hs.append(h)
    return torch.stack(hs, dim=1).to(_out_dtype(a, b)), h


def linear_scan_step(a, b, state=None):
    """One token: a, b, state (B, ...) -> h (B, ...)."""
    return b if state is None else a * state + b


def one_token(a, b, initial_state=None):
    """The step form on a sequence of one token (a, b (B, 1, ...)). Returns (h (B, 1, ...), h_last)."""
    acc = _acc(a, b, initial_state)
    h = linear_scan_step(a[:, 0].to(acc), b[:, 0].to(acc), None if initial_state is None else initial_state.to(acc))
    return h.unsqueeze(1).to(_out_dtype(a, b)), h


def _scan_loop_reversed(a: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """out_t = g_t + conj(a_{t+1}) out_{t+1}, from t = T-1 down (the adjoint scan, without flips)."""
    out = torch.empty_like(g)
    acc = g[:, -1]
    out[:, -1] = acc
    for t in range(g.shape[1] - 2, -1, -1):
        acc = a[:, t + 1].conj() * acc + g[:, t]
        out[:, t] = acc
    return out


def _scan_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    out = torch.empty(b.shape, dtype=h0.dtype, device=b.device)
    h = h0
    for t in range(a.shape[1]):
        h = a[:, t] * h + b[:, t]
        out[:, t] = h
    return out


def _scan_hillis_steele(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk_size: int) -> torch.Tensor:
    """Hillis–Steele within chunks, then carry across chunks."""
    B, T = a.shape[:2]
    rest = a.shape[2:]
    C = min(chunk_size, T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # padding with a = 1, b = 0 leaves the carry unchanged
        a = torch.cat([a, torch.ones(B, pad, *rest, dtype=a.dtype, device=a.device)], dim=1)
        b = torch.cat([b, torch.zeros(B, pad, *rest, dtype=b.dtype, device=b.device)], dim=1)
    A = a.reshape(B, N, C, *rest).clone()  # (B, N, C, ...) running products
    H = b.reshape(B, N, C, *rest).clone()  # (B, N, C, ...) running sums (h with h_0 = 0)
    # 1. inclusive scan within each chunk: log2(C) steps of (A, H) <- (A_s A_{s-d}, A_s H_{s-d} + H_s)
    d = 1
    while d < C:
        H[:, :, d:] = A[:, :, d:] * H[:, :, :-d] + H[:, :, d:]
        A[:, :, d:] = A[:, :, d:] * A[:, :, :-d]
        d *= 2
    # 2. carry the state across chunks (N sequential steps on (B, ...) tensors)
    carry = [h0]
    for n in range(N - 1):
        carry.append(A[:, n, -1] * carry[-1] + H[:, n, -1])
    carry = torch.stack(carry, dim=1)  # (B, N, ...) state entering each chunk
    h = A * carry.unsqueeze(2) + H  # (B, N, C, ...)
    return h.reshape(B, N * C, *rest)[:, :T]


class _LinearScan(torch.autograd.Function):
    """h for all t by a loop over time (``chunk_size`` None) or the chunked log-depth scan; the
    backward pass runs the same core on the adjoint recurrence, reversed in time."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk_size):
        h = _scan_loop(a, b, h0) if chunk_size is None else _scan_hillis_steele(a, b, h0, chunk_size)
        ctx.save_for_backward(a, h, h0)
        ctx.chunk_size = chunk_size
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h, h0 = ctx.saved_tensors
        # dL/db_t = gh_t + conj(a_{t+1}) dL/db_{t+1}: the same scan, reversed in time
        if ctx.chunk_size is None:
            gb = _scan_loop_reversed(a, gh.to(h.dtype))
        else:
            a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).conj()
            gb = _scan_hillis_steele(a_next.flip(1), gh.flip(1).to(h.dtype), torch.zeros_like(h0),
                                     ctx.chunk_size).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        ga = gb * h_prev.conj()
        if not a.is_complex() and ga.is_complex():
            ga = ga.real
        gh0 = gb[:, 0] * a[:, 0].conj()
        return ga, gb, gh0, None


def _run(a, b, initial_state, chunk_size):
    _check(a, b, initial_state)
    acc = _acc(a, b, initial_state)
    h0 = torch.zeros_like(b[:, 0], dtype=acc) if initial_state is None else initial_state.to(acc)
    a_acc = a.to(torch.promote_types(a.dtype, torch.float32))
    h = _LinearScan.apply(a_acc, b.to(acc), h0, chunk_size)
    return h.to(_out_dtype(a, b)), h[:, -1]


def linear_scan_chunked(a, b, initial_state=None, chunk_size=None):
    """Parallel form (same results as the reference): a Hillis–Steele scan within chunks of
    ``chunk_size`` (None: the tuning table's ``scan.chunk_size``), a carry pass across them.
    Returns (h (B, T, ...), h_last (B, ...))."""
    return _run(a, b, initial_state, chunk_size or tuning.get("scan.chunk_size", a.device))


def linear_scan_loop(a, b, initial_state=None):
    """The recurrence as a plain loop over time writing into one preallocated tensor, with its own
    backward (the adjoint loop, run in reverse): on CPU with many lanes per step it reads each
    element once and beats the log-depth scan 3-10x. Same results as the reference: a, b
    (B, T, ...), initial_state (B, ...) -> (h (B, T, ...), h_last (B, ...))."""
    return _run(a, b, initial_state, None)


def linear_scan(a, b, initial_state=None):
    """``h_t = a_t * h_{t-1} + b_t`` along dim 1 — the form layers call; the form (one token: the
    step; many lanes on CPU: the loop; else chunks) comes from :func:`rnnlab.ops.registry.select`.

    a, b: (B, T, ...) real or complex; initial_state: (B, ...) or None (zeros).
    Returns (h (B, T, ...) in a and b's dtype, h_last (B, ...) in float32/float64/complex).
    """
    _check(a, b, initial_state)
    form, backend = select("scan", a=a, b=b, initial_state=initial_state)
    if form == "step":
        return one_token(a, b, initial_state)
    return implementation("scan", form, backend)(a, b, initial_state)


def over_time_chunks(step, seqs, state, chunk_size=256):
    """Run ``y, state = step(*seq_chunks, state)`` over consecutive time-chunks of ``seqs``.

    For ops whose per-token state is large (e.g. (B, T, D, N) decays): each chunk is a parallel
    scan and, under autograd with more than one chunk, is recomputed in the backward pass
    (activation checkpointing), so memory is O(chunk) rather than O(T). ``seqs`` are (B, T, ...)
    tensors; returns (the chunks' outputs concatenated along dim 1, the final state).
    """
    T = seqs[0].shape[1]
    ys = []
    for t0 in range(0, T, chunk_size):
        args = [s[:, t0:t0 + chunk_size] for s in seqs]
        if torch.is_grad_enabled() and T > chunk_size:
            y, state = checkpoint(step, *args, state, use_reentrant=False)
        else:
            y, state = step(*args, state)
        ys.append(y)
    return torch.cat(ys, dim=1), state
