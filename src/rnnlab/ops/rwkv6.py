"""RWKV-6's time-mix recurrence: gated linear attention read *before* the write, plus a bonus.

Per head, with a matrix state S (K x V), a decay vector g_t = exp(log_g_t) over K and a bonus u (K):

    o_t = scale * (S_{t-1}^T q_t + (q_t . (u * k_t)) v_t),      S_t = Diag(g_t) S_{t-1} + k_t v_t^T

(Peng et al. 2024, "Eagle and Finch"; q is RWKV's receptance r.) The state is GLA's
(:mod:`rnnlab.ops.delta`, no delta term, a vector decay); only the read differs: it sees the state
before token t's decay and write, and token t's own pair enters through the bonus u instead.

The fast form reuses the chunked GLA op exactly (no division by a decay): GLA run with the
queries moved one token earlier, ``q'_s = q_{s+1}``, returns ``q_{s+1}^T S_s``, which is token
s+1's read; a sequence's first token reads its initial state directly, and the bonus is added
outside. Layout: q, k, log_g (B, T, H, K); v (B, T, H, V); u (H, K); state (B, H, K, V).
``cu_seqlens`` (int64 (N + 1,), B = 1; :mod:`rnnlab.ops.bounds`): N sequences packed in one row,
initial and final states (N, H, K, V).

Forms: :func:`rwkv6_recurrent` (the definition), :func:`rwkv6_chunked` and the dispatch
:func:`rwkv6` (family "rwkv6" in :mod:`rnnlab.ops.registry`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .bounds import token_carry
from .delta import check_delta_args, gated_delta_rule_chunked
from .registry import implementation, select

__all__ = ["rwkv6", "rwkv6_recurrent", "rwkv6_chunked"]


def _check(q, k, v, log_g, u, initial_state, cu_seqlens):
    if log_g is None or log_g.dim() != 4:
        raise ValueError(f"log_g must be (B, T, H, K) = {tuple(q.shape)}, got "
                         f"{None if log_g is None else tuple(log_g.shape)}")
    cu = check_delta_args(q, k, v, log_g, None, initial_state, cu_seqlens)
    if u.shape != q.shape[2:]:
        raise ValueError(f"u must be (H, K) = {tuple(q.shape[2:])}, got {tuple(u.shape)}")
    return cu


def _acc(q):
    return torch.promote_types(q.dtype, torch.float32)


def rwkv6_recurrent(q, k, v, log_g, u, scale=None, initial_state=None, cu_seqlens=None):
    """The definition, a loop over time. q, k, log_g (B, T, H, K), v (B, T, H, V), u (H, K),
    initial_state (B|N, H, K, V) or None; ``scale`` None: K^-0.5 (RWKV-6 layers pass 1).
    Returns (o (B, T, H, V) in q's dtype, final_state (B|N, H, K, V) in float32/float64)."""
    cu = _check(q, k, v, log_g, u, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    acc = _acc(q)
    scale = K ** -0.5 if scale is None else scale
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc),
                        lambda rows: q.new_zeros(rows, H, K, v.shape[-1], dtype=acc), B, T)
    u = u.to(acc)
    S, outs = None, []
    for t in range(T):
        S = carry.enter(t, S)
        qt, kt, vt = q[:, t].to(acc), k[:, t].to(acc), v[:, t].to(acc)  # (B, H, K|V)
        kv = kt[..., :, None] * vt[..., None, :]  # (B, H, K, V)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qt, S + u[..., None] * kv))  # read before the write
        S = log_g[:, t].to(acc).exp()[..., None] * S + kv
        carry.leave(t, S)
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1], dtype=acc)
    return o.to(q.dtype), carry.final()


def rwkv6_chunked(q, k, v, log_g, u, scale=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    """Chunkwise-parallel form (same arguments and results as the reference): the chunked GLA op
    (:func:`rnnlab.ops.delta.gated_delta_rule_chunked`, ``chunk_size`` None: its tuning entry) on
    the queries shifted one token earlier, the first tokens' reads of their initial states, and
    the bonus. Every step is a selection or a product of finite factors: a non-finite input stays
    in its own sequence, at and after its token."""
    cu = _check(q, k, v, log_g, u, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V, acc, dtype = v.shape[-1], _acc(q), q.dtype
    scale = K ** -0.5 if scale is None else scale
    q, k, v, log_g, u = (x.to(acc) for x in (q, k, v, log_g, u))
    R = B if cu is None else len(cu) - 1
    S0 = q.new_zeros(R, H, K, V) if initial_state is None else initial_state.to(acc)
    q_next = F.pad(q[:, 1:], (0, 0, 0, 0, 0, 1))  # (B, T, H, K): q'_s = q_{s+1}; the last read is dropped
    o_next, S = gated_delta_rule_chunked(q_next, k, v, log_g, None, scale, S0, chunk_size, cu_seqlens=cu_seqlens)
    if cu is None:
        first = scale * torch.einsum("bhk,bhkv->bhv", q[:, 0], S0)[:, None]  # (B, 1, H, V)
        o = torch.cat([first, o_next[:, :-1]], dim=1)  # (B, T, H, V)
    else:
        seqs = [(n, a) for n, (a, b) in enumerate(zip(cu, cu[1:])) if b > a]
        starts = torch.tensor([a for _, a in seqs], dtype=torch.long, device=q.device)
        rows = torch.tensor([n for n, _ in seqs], dtype=torch.long, device=q.device)
        first = scale * torch.einsum("thk,thkv->thv", q[0, starts], S0[rows])[None]  # (1, N', H, V)
        o = torch.cat([o_next.new_zeros(1, 1, H, V), o_next[:, :-1]], dim=1)  # (1, T, H, V)
        o = o.index_copy(1, starts, first)  # a replacement: the previous sequence's last read is not kept
    bonus = scale * (q * u * k).sum(-1, keepdim=True) * v  # (B, T, H, V)
    return (o + bonus).to(dtype), S


def rwkv6(q, k, v, log_g, u, scale=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    """RWKV-6's recurrence (see module docstring); the form comes from
    :func:`rnnlab.ops.registry.select` (one token: the reference loop; otherwise the chunked form).
    Returns (o (B, T, H, V) in q's dtype, final_state (B|N, H, K, V) in float32/float64)."""
    _check(q, k, v, log_g, u, initial_state, cu_seqlens)
    form, backend = select("rwkv6", q=q, k=k, v=v, log_g=log_g, u=u, initial_state=initial_state,
                           cu_seqlens=cu_seqlens)
    fn = implementation("rwkv6", form, backend)
    if form == "reference":
        return fn(q, k, v, log_g, u, scale, initial_state, cu_seqlens=cu_seqlens)
    return fn(q, k, v, log_g, u, scale, initial_state, chunk_size, cu_seqlens=cu_seqlens)
