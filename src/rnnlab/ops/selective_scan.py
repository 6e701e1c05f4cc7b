"""Mamba-1's selective scan (S6), on family A, one time-chunk at a time.

Per channel d and state index n:
    h_t[d, n] = exp(dt_t[d] A[d, n]) h_{t-1}[d, n] + dt_t[d] B_t[n] u_t[d],
    y_t[d]    = sum_n C_t[n] h_t[d, n] + D[d] u_t[d],   then y_t *= silu(z_t) if z is given.
With ``allow_neg_eigval=True`` the decay is ``2 exp(dt A) - 1`` in (-1, 1) (Grazzi et al. 2024).

Shapes: u, dt, z (B, T, D); A (D, N); B, C (B, T, N) or (B, T, G, N) with G groups dividing D;
D (D,); state h (B, D, N). y is returned in u's dtype, the state in float32 or wider. The
(B, T, D, N) tensors exist for one time-chunk at a time (and are recomputed in the backward pass),
never for the whole sequence.

``cu_seqlens`` (:mod:`rnnlab.ops.bounds`): N sequences packed in one row (B = 1), each from its
own row of the initial state (N, D, N; None: zeros) to its own row of the final state; each
time-chunk is a segmented linear scan (:func:`rnnlab.ops.scan.linear_scan` with the pieces of
the sequences in it).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from . import tuning
from .bounds import check_cu_seqlens, state_rows, token_carry
from .registry import implementation, select
from .scan import linear_scan, over_compiled_chunks, over_time_chunks

__all__ = ["selective_scan", "selective_scan_chunked", "selective_scan_chunked_compiled", "selective_scan_recurrent",
           "selective_scan_step"]


def _check(u, dt, A, B, C, D, z, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    Bsz, T, Dm = u.shape
    if dt.shape != u.shape:
        raise ValueError(f"dt must have u's shape (B, T, D) = {tuple(u.shape)}, got {tuple(dt.shape)}")
    if A.dim() != 2 or A.shape[0] != Dm:
        raise ValueError(f"A must be (D, N) with D = {Dm}, got {tuple(A.shape)}")
    N = A.shape[1]
    for name, X in (("B", B), ("C", C)):
        ok = X.shape == (Bsz, T, N) or (X.dim() == 4 and X.shape[:2] == (Bsz, T) and X.shape[3] == N
                                         and Dm % X.shape[2] == 0)
        if not ok:
            raise ValueError(f"{name} must be (B, T, N) or (B, T, G, N) with G dividing D; got {tuple(X.shape)}")
    if D is not None and D.shape != (Dm,):
        raise ValueError(f"D must be ({Dm},), got {tuple(D.shape)}")
    if z is not None and z.shape != u.shape:
        raise ValueError(f"z must have u's shape {tuple(u.shape)}, got {tuple(z.shape)}")
    cu = check_cu_seqlens(cu_seqlens, Bsz, T)
    R, rows = state_rows(Bsz, cu), ("B" if cu is None else "N")
    if initial_state is not None and initial_state.shape != (R, Dm, N):
        raise ValueError(f"initial_state must be ({rows}, D, N) = ({R}, {Dm}, {N}), got {tuple(initial_state.shape)}")
    return cu


def _per_channel(X: torch.Tensor, Dm: int) -> torch.Tensor:
    """B or C as (B, T, D, N): shared by all channels, or by the channels of each group."""
    if X.dim() == 3:
        return X.unsqueeze(2)  # (B, T, 1, N) broadcasts over D
    return X.repeat_interleave(Dm // X.shape[2], dim=2)  # (B, T, D, N)


def _decay(dt, A, allow_neg_eigval):
    a = (dt.unsqueeze(-1) * A).exp_()  # (B, T, D, N)
    return 2 * a - 1 if allow_neg_eigval else a


def _update(h, u, dt, A, Bc, allow_neg_eigval):
    """One token's update of the state h (B, D, N) from u, dt (B, D) and Bc (B, 1|D, N): the step
    form's, and each token's in the compiled chunks."""
    return torch.addcmul(_decay(dt, A, allow_neg_eigval) * h, (dt * u).unsqueeze(-1), Bc)


def _finish(y, u, D, z):
    if D is not None:
        y = y + D * u
    if z is not None:
        y = y * F.silu(z)
    return y


def selective_scan_recurrent(u, dt, A, B, C, D=None, z=None, initial_state=None, allow_neg_eigval=False,
                             cu_seqlens=None):
    """The definition: a loop over time. Returns (y (B, T, D), final_state (B, D, N)); with
    ``cu_seqlens`` h is reset to sequence n's initial state (row n, or zeros) at its first token
    and the final state is (N, D, N)."""
    cu = _check(u, dt, A, B, C, D, z, initial_state, cu_seqlens)
    acc, dtype = torch.promote_types(u.dtype, torch.float32), u.dtype
    u, dt, A, B, C = (t.to(acc) for t in (u, dt, A, B, C))
    Bc, Cc = _per_channel(B, u.shape[2]), _per_channel(C, u.shape[2])
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc),
                        lambda rows: u.new_zeros(rows, *A.shape), u.shape[0], u.shape[1])
    h, ys = None, []
    for t in range(u.shape[1]):
        h = carry.enter(t, h)
        h = _decay(dt[:, t], A, allow_neg_eigval) * h + (dt[:, t] * u[:, t]).unsqueeze(-1) * Bc[:, t]  # (B, D, N)
        carry.leave(t, h)
        ys.append((h * Cc[:, t]).sum(-1))  # (B, D)
    y = _finish(torch.stack(ys, dim=1), u, None if D is None else D.to(acc), None if z is None else z.to(acc))
    return y.to(dtype), carry.final()


def selective_scan_step(u, dt, A, B, C, D=None, z=None, state=None, allow_neg_eigval=False):
    """One token: u, dt, z (B, D); B, C (B, N) or (B, G, N); state (B, D, N). Returns (y (B, D), state).

    The loop's update written for one token, with no per-call bookkeeping: decoding runs it once
    per layer per token."""
    acc, dtype = torch.promote_types(u.dtype, torch.float32), u.dtype
    u, dt, A = u.to(acc), dt.to(acc), A.to(acc)
    Bc = B.to(acc)[:, None] if B.dim() == 2 else B.to(acc).repeat_interleave(u.shape[1] // B.shape[1], dim=1)
    Cc = C.to(acc)[:, None] if C.dim() == 2 else C.to(acc).repeat_interleave(u.shape[1] // C.shape[1], dim=1)
    h = u.new_zeros(*u.shape, A.shape[-1]) if state is None else state.to(acc)  # (B, D, N)
    h = _update(h, u, dt, A, Bc, allow_neg_eigval)  # (B, D, N)
    y = (h * Cc).sum(-1)  # (B, D)
    y = _finish(y, u, None if D is None else D.to(acc), None if z is None else z.to(acc))
    return y.to(dtype), h


def one_token(u, dt, A, B, C, D=None, z=None, initial_state=None, allow_neg_eigval=False):
    """The step form on a sequence of one token (u (B, 1, D), ...): what the dispatch runs when
    decoding. Returns (y (B, 1, D), final_state (B, D, N))."""
    y, h = selective_scan_step(u[:, 0], dt[:, 0], A, B[:, 0], C[:, 0], D, None if z is None else z[:, 0],
                               initial_state, allow_neg_eigval)
    return y[:, None], h


def _chunk(u, dt, B, C, h, A, allow_neg_eigval, cu_seqlens=None):
    """One time-chunk on family A: (B, Tc, D), ... , h (B, D, N) -> y without D/z (B, Tc, D), h
    (packed: h and the result one row per sequence piece of ``cu_seqlens``)."""
    a = _decay(dt, A, allow_neg_eigval)  # (B, Tc, D, N)
    b = (dt * u).unsqueeze(-1) * _per_channel(B, u.shape[2])  # (B, Tc, D, N)
    hs, h_last = linear_scan(a, b, h, cu_seqlens=cu_seqlens)
    if C.dim() == 3:  # C shared by all channels: a matrix-vector product per token, one pass over hs
        return (hs @ C.unsqueeze(-1)).squeeze(-1), h_last  # (B, Tc, D)
    return (hs * _per_channel(C, u.shape[2])).sum(-1), h_last  # (B, Tc, D)


def _unrolled(u, dt, B, C, h, A, allow_neg_eigval: bool):
    """One time-chunk as a loop over its tokens, for ``torch.compile``: unrolled, the chunk becomes
    fused kernels that carry h across its tokens and never write the (B, Tc, D, N) decays and
    states out (the backward recomputes them). Eagerly it would be the slowest form. u, dt
    (B, Tc, D), B, C (B, Tc, N) | (B, Tc, G, N), h (B, D, N) -> y without D/z (B, Tc, D), h."""
    Bc, Cc = _per_channel(B, u.shape[2]), _per_channel(C, u.shape[2])  # (B, Tc, 1|D, N)
    ys = []
    for t in range(u.shape[1]):
        h = _update(h, u[:, t], dt[:, t], A, Bc[:, t], allow_neg_eigval)  # (B, D, N)
        ys.append((h * Cc[:, t]).sum(-1))  # (B, D)
    return torch.stack(ys, dim=1), h  # (B, Tc, D)


def selective_scan_chunked_compiled(u, dt, A, B, C, D=None, z=None, initial_state=None, allow_neg_eigval=False,
                                    chunk_size=None, cu_seqlens=None):
    """The "compile" backend's chunked form: same arguments and results as
    :func:`selective_scan_recurrent`, without ``cu_seqlens`` (packed rows stay on the torch
    backend). Each full time-chunk of the tuning table's ``selective_scan.compile_chunk`` tokens
    is :func:`_unrolled`, compiled once per shape; the tokens after the last full chunk take the
    eager chunk. ``chunk_size`` is not used: the unrolled length sets the compile time."""
    if _check(u, dt, A, B, C, D, z, initial_state, cu_seqlens) is not None:
        raise ValueError("the compiled selective scan takes no cu_seqlens: packed rows run on the torch backend")
    acc = torch.promote_types(u.dtype, torch.float32)
    Tc = tuning.get("selective_scan.compile_chunk", u.device)
    u_, dt_, A_, B_, C_ = (t.to(acc) for t in (u, dt, A, B, C))
    h = u_.new_zeros(u.shape[0], *A.shape) if initial_state is None else initial_state.to(acc)
    y, h = over_compiled_chunks(_unrolled, _chunk, (u_, dt_, B_, C_), h, Tc, A_, allow_neg_eigval)
    y = _finish(y, u_, None if D is None else D.to(acc), None if z is None else z.to(acc))
    return y.to(u.dtype), h


def selective_scan_chunked(u, dt, A, B, C, D=None, z=None, initial_state=None, allow_neg_eigval=False, chunk_size=None,
                           cu_seqlens=None):
    """Time-chunked form; same arguments and results as :func:`selective_scan_recurrent`.

    Time is cut into chunks of ``chunk_size`` (None: the tuning table's ``selective_scan.time_chunk``);
    each chunk is a parallel linear scan, the state is passed from chunk to chunk, and with
    autograd on each chunk is recomputed in the backward pass (activation checkpointing), so memory
    is O(B·chunk·D·N) rather than O(B·T·D·N). With ``cu_seqlens`` each time-chunk is a segmented
    scan over the pieces of the sequences in it.
    """
    cu = _check(u, dt, A, B, C, D, z, initial_state, cu_seqlens)
    acc = torch.promote_types(u.dtype, torch.float32)
    chunk_size = chunk_size or tuning.get("selective_scan.time_chunk", u.device)
    u_, dt_, A_, B_, C_ = (t.to(acc) for t in (u, dt, A, B, C))
    zeros = lambda rows: u_.new_zeros(rows, *A.shape)  # noqa: E731
    if cu is None:
        h = zeros(u.shape[0]) if initial_state is None else initial_state.to(acc)
        y, h = over_time_chunks(lambda u, dt, B, C, h: _chunk(u, dt, B, C, h, A_, allow_neg_eigval),
                                (u_, dt_, B_, C_), h, chunk_size)
    else:
        y, h = over_time_chunks(lambda u, dt, B, C, h, cu: _chunk(u, dt, B, C, h, A_, allow_neg_eigval, cu),
                                (u_, dt_, B_, C_), None if initial_state is None else initial_state.to(acc),
                                chunk_size, cu, zeros)
    y = _finish(y, u_, None if D is None else D.to(acc), None if z is None else z.to(acc))
    return y.to(u.dtype), h


def selective_scan(u, dt, A, B, C, D=None, z=None, initial_state=None, allow_neg_eigval=False, chunk_size=None,
                   cu_seqlens=None):
    """The selective scan — the form layers call; same arguments and results as
    :func:`selective_scan_recurrent`. The form comes from :func:`rnnlab.ops.registry.select`: the
    step for one token, :func:`selective_scan_chunked` otherwise (``chunk_size`` None: the
    tuning table's). ``cu_seqlens``: None, or int64 (N + 1,) for N sequences packed in one row
    (B = 1), with initial and final states of N rows."""
    _check(u, dt, A, B, C, D, z, initial_state, cu_seqlens)
    form, backend = select("selective_scan", u=u, dt=dt, A=A, B=B, C=C, D=D, z=z, initial_state=initial_state,
                           cu_seqlens=cu_seqlens)
    if form == "step":
        return one_token(u, dt, A, B, C, D, z, initial_state, allow_neg_eigval)
    return implementation("selective_scan", form, backend)(u, dt, A, B, C, D, z, initial_state, allow_neg_eigval,
                                                           chunk_size, cu_seqlens)
