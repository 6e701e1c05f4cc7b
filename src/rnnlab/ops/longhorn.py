"""Longhorn's closed-form online-learning update (Liu et al. 2024), on family A.

Each channel d keeps a row S[d] (N) that learns online to map the key k_t to the value v_t[d]. The
step solves min_s ||s - S_{t-1}[d]||² + beta_t[d] (s·k_t - v_t[d])² with the key's outer product
kept diagonal, which gives, per channel d and state index n:

    eps_t[d]  = beta_t[d] / (1 + beta_t[d] ||k_t||²)
    S_t[d, n] = (1 - eps_t[d] k_t[n]²) S_{t-1}[d, n] + eps_t[d] v_t[d] k_t[n],      o_t[d] = S_t[d] · q_t

The decay 1 - eps k² lies in (0, 1] for beta >= 0, so no forget gate or A matrix is needed.
Shapes: v, beta (B, T, D); q, k (B, T, N); state S (B, D, N); o is returned in v's dtype, S in
float32 or wider. The fast form cuts time into chunks and runs each as a parallel linear scan (the
(B, T, D, N) decays exist for one chunk at a time).

``cu_seqlens`` (:mod:`rnnlab.ops.bounds`): N sequences packed in one row (B = 1), each from its
own row of the initial state (N, D, N; None: zeros) to its own row of the final state.
"""
from __future__ import annotations

import torch

from . import tuning
from .bounds import check_cu_seqlens, state_rows, token_carry
from .registry import implementation, select
from .scan import linear_scan, over_compiled_chunks, over_time_chunks

__all__ = ["longhorn", "longhorn_chunked", "longhorn_chunked_compiled", "longhorn_recurrent"]


def _check(q, k, v, beta, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    Bsz, T, D = v.shape
    if beta.shape != v.shape:
        raise ValueError(f"beta must have v's shape (B, T, D) = {tuple(v.shape)}, got {tuple(beta.shape)}")
    if k.dim() != 3 or k.shape[:2] != (Bsz, T):
        raise ValueError(f"k must be (B, T, N) with (B, T) = ({Bsz}, {T}), got {tuple(k.shape)}")
    if q.shape != k.shape:
        raise ValueError(f"q must have k's shape {tuple(k.shape)}, got {tuple(q.shape)}")
    cu = check_cu_seqlens(cu_seqlens, Bsz, T)
    R, rows = state_rows(Bsz, cu), ("B" if cu is None else "N")
    if initial_state is not None and initial_state.shape != (R, D, k.shape[2]):
        raise ValueError(f"initial_state must be ({rows}, D, N) = ({R}, {D}, {k.shape[2]}), "
                         f"got {tuple(initial_state.shape)}")
    return cu


def _update(S, k, v, beta):
    """One token's update of S (B, D, N) from k (B, N), v, beta (B, D): the definition's, and each
    token's in the compiled chunks."""
    eps = beta / (1 + beta * (k ** 2).sum(-1, keepdim=True))  # (B, D)
    return (1 - eps[:, :, None] * k[:, None] ** 2) * S + (eps * v)[:, :, None] * k[:, None]  # (B, D, N)


def _coefficients(k, v, beta):
    """The decay a (B, T, D, N) and input b (B, T, D, N) of the update."""
    eps = beta / (1 + beta * k.square().sum(-1, keepdim=True))  # (B, T, D)
    a = 1 - eps.unsqueeze(-1) * k.square().unsqueeze(-2)  # (B, T, D, N)
    b = (eps * v).unsqueeze(-1) * k.unsqueeze(-2)  # (B, T, D, N)
    return a, b


def longhorn_recurrent(q, k, v, beta, initial_state=None, cu_seqlens=None):
    """The definition: a loop over time. Returns (o (B, T, D) in v's dtype, final_state (B, D, N));
    with ``cu_seqlens`` S is reset to sequence n's initial state (row n, or zeros) at its first
    token and the final state is (N, D, N)."""
    cu = _check(q, k, v, beta, initial_state, cu_seqlens)
    acc, dtype = torch.promote_types(v.dtype, torch.float32), v.dtype
    q, k, v, beta = (t.to(acc) for t in (q, k, v, beta))
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc),
                        lambda rows: v.new_zeros(rows, v.shape[2], k.shape[2]), v.shape[0], v.shape[1])
    S, os = None, []
    for t in range(v.shape[1]):
        S = _update(carry.enter(t, S), k[:, t], v[:, t], beta[:, t])
        carry.leave(t, S)
        os.append((S * q[:, t, None]).sum(-1))  # (B, D)
    return torch.stack(os, dim=1).to(dtype), carry.final()


def _chunk(q, k, v, beta, S, cu_seqlens=None):
    a, b = _coefficients(k, v, beta)
    Ss, S_last = linear_scan(a, b, S, cu_seqlens=cu_seqlens)  # (B, Tc, D, N)
    return (Ss @ q.unsqueeze(-1)).squeeze(-1), S_last  # (B, Tc, D): q is shared by all channels


def _unrolled(q, k, v, beta, S):
    """One time-chunk as a loop over its tokens, for ``torch.compile`` (see
    :func:`rnnlab.ops.scan.over_compiled_chunks`): the loop of :func:`longhorn_recurrent`, without
    sequence resets. q, k (B, Tc, N), v, beta (B, Tc, D), S (B, D, N) -> o (B, Tc, D), S."""
    os = []
    for t in range(v.shape[1]):
        S = _update(S, k[:, t], v[:, t], beta[:, t])
        os.append((S * q[:, t, None]).sum(-1))  # (B, D)
    return torch.stack(os, dim=1), S  # (B, Tc, D)


def longhorn_chunked_compiled(q, k, v, beta, initial_state=None, chunk_size=None, cu_seqlens=None):
    """The "compile" backend's chunked form: same arguments and results as
    :func:`longhorn_recurrent`, without ``cu_seqlens`` (packed rows stay on the torch backend).
    Full time-chunks of the tuning table's ``longhorn.compile_chunk`` tokens run :func:`_unrolled`
    compiled, the rest the eager chunk. ``chunk_size`` is not used: the unrolled length sets the
    compile time."""
    if _check(q, k, v, beta, initial_state, cu_seqlens) is not None:
        raise ValueError("the compiled Longhorn update takes no cu_seqlens: packed rows run on the torch backend")
    acc, dtype = torch.promote_types(v.dtype, torch.float32), v.dtype
    q, k, v, beta = (t.to(acc) for t in (q, k, v, beta))
    S = v.new_zeros(v.shape[0], v.shape[2], k.shape[2]) if initial_state is None else initial_state.to(acc)
    o, S = over_compiled_chunks(_unrolled, _chunk, (q, k, v, beta), S, tuning.get("longhorn.compile_chunk", v.device))
    return o.to(dtype), S


def longhorn_chunked(q, k, v, beta, initial_state=None, chunk_size=None, cu_seqlens=None):
    """The update as parallel scans over time-chunks of ``chunk_size`` (None: the tuning table's
    ``longhorn.time_chunk``); same arguments and results as :func:`longhorn_recurrent` (with
    ``cu_seqlens`` each time-chunk is a segmented scan over the pieces of sequences in it)."""
    cu = _check(q, k, v, beta, initial_state, cu_seqlens)
    acc, dtype = torch.promote_types(v.dtype, torch.float32), v.dtype
    chunk_size = chunk_size or tuning.get("longhorn.time_chunk", v.device)
    q, k, v, beta = (t.to(acc) for t in (q, k, v, beta))
    zeros = lambda rows: v.new_zeros(rows, v.shape[2], k.shape[2])  # noqa: E731
    init = None if initial_state is None else initial_state.to(acc)
    if cu is None:
        o, S = over_time_chunks(_chunk, (q, k, v, beta), zeros(v.shape[0]) if init is None else init, chunk_size)
    else:
        o, S = over_time_chunks(_chunk, (q, k, v, beta), init, chunk_size, cu, zeros)
    return o.to(dtype), S


def longhorn(q, k, v, beta, initial_state=None, chunk_size=None, cu_seqlens=None):
    """Longhorn's update — the form layers call; same arguments and results as
    :func:`longhorn_recurrent`. The form comes from :func:`rnnlab.ops.registry.select`: the
    recurrence for one token, :func:`longhorn_chunked` otherwise. ``cu_seqlens``: None, or int64
    (N + 1,) for N sequences packed in one row (B = 1), with initial and final states of N rows."""
    _check(q, k, v, beta, initial_state, cu_seqlens)
    form, backend = select("longhorn", q=q, k=k, v=v, beta=beta, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if form == "reference":
        return longhorn_recurrent(q, k, v, beta, initial_state, cu_seqlens)
    return implementation("longhorn", form, backend)(q, k, v, beta, initial_state, chunk_size, cu_seqlens)
