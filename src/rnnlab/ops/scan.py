"""Kernel family A: the elementwise linear recurrence ``h_t = a_t * h_{t-1} + b_t`` along dim 1.

a, b (B, T, ...) of the same shape, real or complex (a may be real with b complex); the state h
(B, ...). Forms: :func:`linear_scan_recurrent` (the definition), :func:`linear_scan_chunked`
(parallel: a Hillis–Steele scan inside chunks — only products and sums, so zero, negative and
complex ``a`` need no logarithms — and a short carry pass across chunks), :func:`linear_scan_loop`
(a plain loop over time, faster on CPU with many lanes), :func:`linear_scan_step` (one token) and
the dispatch :func:`linear_scan`. The chunked and loop forms have their own backward: the
gradient of a linear scan is the same scan run in reverse, so no intermediate is stored but h.

With ``cu_seqlens`` (:mod:`rnnlab.ops.bounds`: N sequences packed in one row, B = 1) every form
runs a *segmented* scan: at the first token t of a sequence ``h_t = a_t h0 + b_t`` with the
sequence's own initial state h0, whatever came before (a selection, so not even a NaN crosses).
"""
from __future__ import annotations

import torch
from torch.utils.checkpoint import checkpoint

from . import tuning
from .bounds import cat_rows, check_cu_seqlens, rows, state_rows, token_carry
from .registry import implementation, select, use_backend

__all__ = ["linear_scan", "linear_scan_recurrent", "linear_scan_chunked", "linear_scan_loop", "linear_scan_step",
           "over_time_chunks", "over_compiled_chunks", "running_max"]


def _check(a, b, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    if a.shape != b.shape:
        raise ValueError(f"a and b must have the same shape (B, T, ...), got a {tuple(a.shape)}, b {tuple(b.shape)}")
    if a.dim() < 2:
        raise ValueError(f"a and b must be at least (B, T), got {tuple(a.shape)}")
    cu = check_cu_seqlens(cu_seqlens, a.shape[0], a.shape[1])
    rows = (state_rows(a.shape[0], cu),) + a.shape[2:]
    if initial_state is not None and initial_state.shape != rows:
        raise ValueError(f"initial_state must be ({'B' if cu is None else 'N'}, ...) = {rows}, "
                         f"got {tuple(initial_state.shape)}")
    return cu


def _acc(*xs) -> torch.dtype:
    dt = torch.float32
    for x in xs:
        if x is not None:
            dt = torch.promote_types(dt, x.dtype)
    return dt


def _out_dtype(a, b) -> torch.dtype:
    return torch.promote_types(a.dtype, b.dtype)


def linear_scan_recurrent(a, b, initial_state=None, cu_seqlens=None):
    """The definition: a loop over time. Returns (h (B, T, ...) in a and b's dtype, h_last (B, ...)
    in the accumulation dtype: float32 or wider, complex if any input is).

    With ``cu_seqlens`` (int64 (N + 1,), B = 1): h is reset to sequence n's initial state (row n of
    ``initial_state`` (N, ...), or zeros) before its first token; h_last is (N, ...)."""
    cu = _check(a, b, initial_state, cu_seqlens)
    acc = _acc(a, b, initial_state)
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc),
                        lambda rows: b.new_zeros(rows, *b.shape[2:], dtype=acc), a.shape[0], a.shape[1])
    h, hs = None, []
    for t in range(a.shape[1]):
        h = a[:, t].to(acc) * carry.enter(t, h) + b[:, t].to(acc)
        carry.leave(t, h)
        hs.append(h)
    return torch.stack(hs, dim=1).to(_out_dtype(a, b)), carry.final()


def linear_scan_step(a, b, state=None):
    """One token: a, b, state (B, ...) -> h (B, ...)."""
    return b if state is None else a * state + b


def one_token(a, b, initial_state=None):
    """The step form on a sequence of one token (a, b (B, 1, ...)). Returns (h (B, 1, ...), h_last)."""
    acc = _acc(a, b, initial_state)
    h = linear_scan_step(a[:, 0].to(acc), b[:, 0].to(acc), None if initial_state is None else initial_state.to(acc))
    return h.unsqueeze(1).to(_out_dtype(a, b)), h


def _scan_loop_reversed(a: torch.Tensor, g: torch.Tensor, starts: frozenset = frozenset()) -> torch.Tensor:
    """out_t = g_t + conj(a_{t+1}) out_{t+1}, from t = T-1 down (the adjoint scan, without flips);
    out_t = g_t where t + 1 starts a sequence."""
    out = torch.empty_like(g)
    acc = out[:, -1].copy_(g[:, -1])
    for t in range(g.shape[1] - 2, -1, -1):  # one op per step, written in place
        if t + 1 in starts:
            acc = out[:, t].copy_(g[:, t])
        else:
            acc = torch.addcmul(g[:, t], a[:, t + 1].conj(), acc, out=out[:, t])
    return out


def _scan_loop(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, starts: frozenset = frozenset()) -> torch.Tensor:
    """h_t = a_t h_{t-1} + b_t from h0, and h_t = b_t at the tokens in ``starts``."""
    out = torch.empty(b.shape, dtype=h0.dtype, device=b.device)
    h = h0
    for t in range(a.shape[1]):  # one op per step, written in place
        if t in starts:
            h = out[:, t].copy_(b[:, t])
        else:
            h = torch.addcmul(b[:, t], a[:, t], h, out=out[:, t])
    return out


def _where(flag, x, y):
    return y if flag is None else torch.where(flag, x, y)


def _scan_hillis_steele(a: torch.Tensor, b: torch.Tensor, h0: torch.Tensor, chunk_size: int,
                        reset: torch.Tensor | None = None) -> torch.Tensor:
    """Hillis–Steele within chunks, then carry across chunks. ``reset`` (T,) bool or None: at a
    reset token h_t = b_t (a segmented scan: the flag travels with the partial results and a
    flagged right operand discards its left one, by selection)."""
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
    F = None  # (1, N, C, 1, ...): a reset within the span of each partial result
    if reset is not None:
        F = torch.cat([reset, reset.new_zeros(pad)]).reshape(1, N, C, *([1] * len(rest)))
    # 1. inclusive scan within each chunk: log2(C) steps of (A, H) <- (A_s A_{s-d}, A_s H_{s-d} + H_s)
    d = 1
    while d < C:
        f = None if F is None else F[:, :, d:]
        H[:, :, d:] = _where(f, H[:, :, d:], A[:, :, d:] * H[:, :, :-d] + H[:, :, d:])
        A[:, :, d:] = _where(f, A[:, :, d:], A[:, :, d:] * A[:, :, :-d])
        if F is not None:
            F = torch.cat([F[:, :, :d], f | F[:, :, :-d]], dim=2)
        d *= 2
    # 2. carry the state across chunks (N sequential steps on (B, ...) tensors)
    carry = [h0]
    for n in range(N - 1):
        carry.append(_where(None if F is None else F[:, n, -1], H[:, n, -1], A[:, n, -1] * carry[-1] + H[:, n, -1]))
    carry = torch.stack(carry, dim=1)  # (B, N, ...) state entering each chunk
    h = _where(F, H, A * carry.unsqueeze(2) + H)  # (B, N, C, ...)
    return h.reshape(B, N * C, *rest)[:, :T]


class _LinearScan(torch.autograd.Function):
    """h for all t by a loop over time (``chunk_size`` None) or the chunked log-depth scan; the
    backward pass runs the same core on the adjoint recurrence, reversed in time."""

    @staticmethod
    def forward(ctx, a, b, h0, chunk_size, starts):
        """``starts``: the tokens (a frozenset) where h_t = b_t (sequence starts), empty without."""
        reset = None
        if starts:
            reset = torch.zeros(a.shape[1], dtype=torch.bool, device=a.device)
            reset[list(starts)] = True
        h = _scan_loop(a, b, h0, starts) if chunk_size is None else _scan_hillis_steele(a, b, h0, chunk_size, reset)
        ctx.save_for_backward(a, h, h0, *([] if reset is None else [reset]))
        ctx.chunk_size, ctx.starts = chunk_size, starts
        return h

    @staticmethod
    def backward(ctx, gh):
        a, h, h0, *reset = ctx.saved_tensors
        reset = reset[0] if reset else None
        # dL/db_t = gh_t + conj(a_{t+1}) dL/db_{t+1}: the same scan, reversed in time (and cut
        # where t + 1 starts a sequence)
        if ctx.chunk_size is None:
            gb = _scan_loop_reversed(a, gh.to(h.dtype), ctx.starts)
        else:
            a_next = torch.cat([a[:, 1:], torch.zeros_like(a[:, :1])], dim=1).conj()
            cut = None if reset is None else torch.cat([reset[1:], reset.new_zeros(1)]).flip(0)
            gb = _scan_hillis_steele(a_next.flip(1), gh.flip(1).to(h.dtype), torch.zeros_like(h0),
                                     ctx.chunk_size, cut).flip(1)
        h_prev = torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
        ga = gb * h_prev.conj()
        if not a.is_complex() and ga.is_complex():
            ga = ga.real
        gh0 = gb[:, 0] * a[:, 0].conj()
        if reset is not None:  # a_t does not act at a reset (h_t = b_t there)
            ga = torch.where(reset.reshape(1, -1, *([1] * (a.dim() - 2))), 0, ga)
            gh0 = torch.zeros_like(gh0) if reset[0] else gh0
        return ga, gb, gh0, None, None


def _run(a, b, initial_state, chunk_size, cu_seqlens):
    cu = _check(a, b, initial_state, cu_seqlens)
    acc = _acc(a, b, initial_state)
    a_acc, b_acc = a.to(torch.promote_types(a.dtype, torch.float32)), b.to(acc)
    zeros = lambda rows: b.new_zeros(rows, *b.shape[2:], dtype=acc)  # noqa: E731
    if cu is None:
        h0 = zeros(b.shape[0]) if initial_state is None else initial_state.to(acc)
        h = _LinearScan.apply(a_acc, b_acc, h0, chunk_size, frozenset())
        return h.to(_out_dtype(a, b)), h[:, -1]
    # packed: the scan restarts at each sequence's first token t with b_t + a_t h0_n
    seqs = [(n, s, e) for n, (s, e) in enumerate(zip(cu, cu[1:])) if e > s]
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc), zeros, 1, a.shape[1])
    if initial_state is not None and seqs:
        first = torch.tensor([s for _, s, _ in seqs], device=b.device)
        h0_at = zeros(1).unsqueeze(1).expand_as(b_acc).index_copy(
            1, first, initial_state.to(acc)[[n for n, _, _ in seqs]].unsqueeze(0))  # (1, T, ...)
        b_acc = b_acc + a_acc * h0_at
    h = _LinearScan.apply(a_acc, b_acc, zeros(1), chunk_size, frozenset(s for _, s, _ in seqs))
    for _, _, e in seqs:
        carry.leave(e - 1, h[:, e - 1])
    return h.to(_out_dtype(a, b)), carry.final()


def linear_scan_chunked(a, b, initial_state=None, chunk_size=None, cu_seqlens=None):
    """Parallel form (same results as the reference): a Hillis–Steele scan within chunks of
    ``chunk_size`` (None: the tuning table's ``scan.chunk_size``), a carry pass across them;
    segmented at sequence starts with ``cu_seqlens``. Returns (h (B, T, ...), h_last (B|N, ...))."""
    return _run(a, b, initial_state, chunk_size or tuning.get("scan.chunk_size", a.device), cu_seqlens)


def linear_scan_loop(a, b, initial_state=None, cu_seqlens=None):
    """The recurrence as a plain loop over time writing into one preallocated tensor, with its own
    backward (the adjoint loop, run in reverse): on CPU with many lanes per step it reads each
    element once and beats the log-depth scan 3-10x. Same results as the reference: a, b
    (B, T, ...), initial_state (B, ...) -> (h (B, T, ...), h_last (B|N, ...))."""
    return _run(a, b, initial_state, None, cu_seqlens)


def linear_scan(a, b, initial_state=None, cu_seqlens=None):
    """``h_t = a_t * h_{t-1} + b_t`` along dim 1 — the form layers call; the form (one token: the
    step; many lanes on CPU: the loop; else chunks) comes from :func:`rnnlab.ops.registry.select`.

    a, b: (B, T, ...) real or complex; initial_state: (B, ...) or None (zeros). ``cu_seqlens``:
    None, or int64 (N + 1,) cumulative lengths of N sequences packed in one row (B = 1;
    :mod:`rnnlab.ops.bounds`), with initial_state (N, ...) or None.
    Returns (h (B, T, ...) in a and b's dtype, h_last (B|N, ...) in float32/float64/complex).
    """
    _check(a, b, initial_state, cu_seqlens)
    form, backend = select("scan", a=a, b=b, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if form == "step":
        return one_token(a, b, initial_state)
    return implementation("scan", form, backend)(a, b, initial_state, cu_seqlens=cu_seqlens)


def over_time_chunks(step, seqs, state, chunk_size=256, cu_seqlens=None, zeros=None):
    """Run ``y, state = step(*seq_chunks, state)`` over consecutive time-chunks of ``seqs``.

    For ops whose per-token state is large (e.g. (B, T, D, N) decays): each chunk is a parallel
    scan and, under autograd with more than one chunk, is recomputed in the backward pass
    (activation checkpointing), so memory is O(chunk) rather than O(T). ``seqs`` are (B, T, ...)
    tensors; returns (the chunks' outputs concatenated along dim 1, the final state).

    Packed rows: with ``cu_seqlens`` (a list from :func:`rnnlab.ops.bounds.check_cu_seqlens`; B = 1)
    ``state`` is the (N, ...) initial states (a tensor or a tuple of tensors) or None (then
    ``zeros(rows)`` makes them) and the call
    is ``y, finals = step(*seq_chunks, initial, cu_local)``: the pieces of sequences in the chunk
    as a packed row of their own (``cu_local`` int64), a sequence continuing from the previous
    chunk starting from where it stopped. Returns (y, the (N, ...) final states).
    """
    T = seqs[0].shape[1]
    ckpt = torch.is_grad_enabled() and T > chunk_size
    run = (lambda *a: checkpoint(step, *a, use_reentrant=False)) if ckpt else step  # noqa: E731
    ys = []
    # split, not slice: the backward of a split is one concatenation of the chunks' gradients, where
    # each slice's backward would write its gradient into a zero tensor of the whole (B, T, ...)
    # input (O(T^2/chunk) memory traffic: Mamba fwd+bwd at T=8192 spent 2.6 of 5.5 s there)
    pieces = list(zip(*[s.split(chunk_size, dim=1) for s in seqs]))
    if cu_seqlens is None:
        for chunk in pieces:
            y, state = run(*chunk, state)
            ys.append(y)
        return torch.cat(ys, dim=1), state
    cu = cu_seqlens
    init = lambda n: zeros(1) if state is None else rows(state, n, n + 1)  # noqa: E731
    seqs_in = [(n, a, b) for n, (a, b) in enumerate(zip(cu, cu[1:])) if b > a]
    finals, carried = {}, None
    for t0, chunk in zip(range(0, T, chunk_size), pieces):
        t1 = min(t0 + chunk_size, T)
        here = [(n, a < t0, b) for n, a, b in seqs_in if a < t1 and b > t0]  # (n, continues, end)
        initial = cat_rows([carried if cont else init(n) for n, cont, _ in here])
        cu_local = torch.tensor([0] + [min(b, t1) - t0 for _, _, b in here], dtype=torch.int64)
        y, fin = run(*chunk, initial, cu_local)
        for i, (n, _, b) in enumerate(here):
            if b <= t1:
                finals[n] = rows(fin, i, i + 1)
        carried = rows(fin, len(here) - 1, len(here))
        ys.append(y)
    return torch.cat(ys, dim=1), cat_rows([finals.get(n, init(n)) for n in range(len(cu) - 1)])


def running_max(x, initial_state, cu_seqlens=None):
    """``m_t = max(m_{t-1}, x_t)`` along dim 1 from ``m_0 = initial_state`` (a stabiliser, e.g. of
    a softmax computed as a scan). x: (B, T, ...) real; initial_state: (B, ...), or (N, ...) with
    ``cu_seqlens`` (N sequences packed in one row, B = 1; each starts from its own row).

    Returns (m (B, T, ...), the maximum entering each token m_{t-1} (B, T, ...), the final maximum
    (B|N, ...)). A NaN stays in its own sequence (from its token on, as in ``torch.cummax``).
    """
    cu = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    rows_ = (state_rows(x.shape[0], cu),) + x.shape[2:]
    if initial_state.shape != rows_:
        raise ValueError(f"initial_state must be ({'B' if cu is None else 'N'}, ...) = {rows_}, "
                         f"got {tuple(initial_state.shape)}")
    spans = [(0, x.shape[1], initial_state)] if cu is None else [
        (a, b, initial_state[n:n + 1]) for n, (a, b) in enumerate(zip(cu, cu[1:]))]
    ms, entering, finals = [], [], []
    for a, b, m0 in spans:  # one sequence (or all B rows) at a time
        m = torch.maximum(torch.cummax(x[:, a:b], dim=1).values, m0[:, None])  # (B, b-a, ...)
        ms.append(m)
        entering.append(torch.cat([m0[:, None], m], dim=1)[:, :-1])
        finals.append(torch.cat([m0[:, None], m], dim=1)[:, -1])  # an empty sequence keeps m0
    return torch.cat(ms, dim=1), torch.cat(entering, dim=1), torch.cat(finals, dim=0)


def over_compiled_chunks(unrolled, eager, seqs, state, chunk_size: int, *consts):
    """Run ``y, state = fn(*seq_chunks, state, *consts)`` over consecutive time-chunks of ``seqs``
    ((B, T, ...) tensors; no packed rows): every full chunk of ``chunk_size`` tokens through
    ``torch.compile`` of ``unrolled`` (a loop over the chunk's tokens, which the compiler unrolls
    into kernels that carry the state across the chunk without writing per-token states out), the
    tokens after the last full chunk through ``eager``. The state and outputs may be tuples of
    tensors (a complex value as its real and imaginary parts). Returns (the outputs concatenated
    along dim 1, part by part, the final state). The "compile" backend's form of the time-chunked
    diagonal scans (Mamba-1's selective scan, Longhorn, S4D's LTI scan)."""
    from .backends import compiled
    step, ys = compiled(unrolled), []
    # split, not slice (see over_time_chunks); each full piece copied to fresh strides (a piece of a
    # B=1 row counts as contiguous but keeps the row's strides), so that the compiled chunk sees
    # the same shapes and strides at every T and is not compiled again
    for piece in zip(*(t.split(chunk_size, dim=1) for t in seqs)):
        if piece[0].shape[1] == chunk_size:
            y, state = step(*(t.clone(memory_format=torch.contiguous_format) for t in piece), state, *consts)
        else:
            with use_backend("torch"):  # its own ops (the linear scan) have no compiled form
                y, state = eager(*piece, state, *consts)
        ys.append(y)
    if isinstance(ys[0], tuple):  # outputs in parts (a complex output as its real and imaginary parts)
        return tuple(torch.cat(parts, dim=1) for parts in zip(*ys)), state
    return torch.cat(ys, dim=1), state
