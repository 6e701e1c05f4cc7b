"""Prefix linear attention (JRT-RNN): a non-causal encoder over the prompt, then causal decoding.

Arora et al. 2024, "Just read twice: closing the recall gap for recurrent language models". Per
head, with the encoder tokens P of a sequence (its prefix, marked by ``in_prefix``), their own
keys and values ``k_enc``, ``v_enc``, and the initial state S_0 (K x V):

    E   = sum_{s in P} k_enc_s v_enc_s^T                 (every encoder token at once: non-causal)
    S_t = S_{t-1} + k_t v_t^T,   S_{-1} = S_0 + E       (causal, over every token)
    o_t = scale * S_t^T q_t

so a prefix token reads the whole prefix through E (and the tokens up to itself through the
causal part), and after the prefix the state S_t is that of plain linear attention started from
S_0 + E: decoding, or any later piece fed with the returned state, continues causally. The
feature maps and the normaliser (a column of ones in v and v_enc) belong to the layer.

Layout: q, k, k_enc (B, T, H, K); v, v_enc (B, T, H, V); in_prefix (B, T) bool (None: no encoder
token, plain causal linear attention); state (B, H, K, V). The encoder's keys and values are read
only at the marked tokens (elsewhere they may hold anything, even NaN). With ``cu_seqlens`` (N
sequences packed in one row, B = 1; :mod:`rnnlab.ops.bounds`) each sequence has its own E and
initial state (N rows) and nothing crosses a boundary.

Forms: :func:`prefix_linear_attention_recurrent` (the definition: a loop), the fast form
:func:`prefix_linear_attention_parallel` (E as one masked product per sequence, then the chunked
linear attention of :func:`rnnlab.ops.gated_delta_rule`, family "ssd" of the op registry) and the
dispatcher :func:`prefix_linear_attention`. The op is not a family of its own in
:mod:`rnnlab.ops.registry`: its causal part is the "ssd" family there, and the registry's laws
for non-finite inputs (a NaN at a token reaches no earlier token, and always shows in its own
sequence) do not hold for an encoder input by design.
"""
from __future__ import annotations

import torch

from .bounds import check_cu_seqlens, state_rows
from .delta import gated_delta_rule

__all__ = ["prefix_linear_attention", "prefix_linear_attention_recurrent", "prefix_linear_attention_parallel",
           "check_prefix_args", "prefix_mask"]


def check_prefix_args(q, k, v, k_enc, v_enc, in_prefix, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the argument whose shape does not fit q (B, T, H, K); returns
    ``cu_seqlens`` as a list of ints (None without)."""
    if q.dim() != 4 or k.shape != q.shape or k_enc.shape != q.shape:
        raise ValueError(f"q, k and k_enc must all be (B, T, H, K); got q {tuple(q.shape)}, k {tuple(k.shape)}, "
                         f"k_enc {tuple(k_enc.shape)}")
    B, T, H, _ = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H) or v_enc.shape != v.shape:
        raise ValueError(f"v and v_enc must both be (B, T, H, V) = ({B}, {T}, {H}, V); got v {tuple(v.shape)}, "
                         f"v_enc {tuple(v_enc.shape)}")
    if in_prefix is not None and (in_prefix.shape != (B, T) or in_prefix.dtype != torch.bool):
        raise ValueError(f"in_prefix must be None or a bool (B, T) = ({B}, {T}) tensor, got "
                         f"{in_prefix.dtype} {tuple(in_prefix.shape)}")
    cu = check_cu_seqlens(cu_seqlens, B, T)
    R = state_rows(B, cu)
    if initial_state is not None and initial_state.shape != (R, H, q.shape[-1], v.shape[-1]):
        raise ValueError(f"initial_state must be ({'B' if cu is None else 'N'}, H, K, V) = "
                         f"({R}, {H}, {q.shape[-1]}, {v.shape[-1]}), got {tuple(initial_state.shape)}")
    return cu


def prefix_mask(prefix_len: torch.Tensor, B: int, T: int, cu: list[int] | None = None) -> torch.Tensor:
    """The bool (B, T) ``in_prefix`` mask of the first ``prefix_len[r]`` tokens of each row r (of
    each sequence r of the packed row with ``cu`` from :func:`rnnlab.ops.bounds.check_cu_seqlens`)."""
    pos = torch.arange(T, device=prefix_len.device)
    if cu is None:
        return pos[None, :] < prefix_len[:, None]  # (B, T)
    starts = torch.tensor(cu[:-1], device=prefix_len.device)
    seq = torch.bucketize(pos, torch.tensor(cu[1:-1], device=prefix_len.device), right=True)  # (T,) sequence of t
    return (pos - starts[seq] < prefix_len[seq])[None, :]  # (1, T)


def _acc(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def prefix_linear_attention_recurrent(q, k, v, k_enc, v_enc, in_prefix=None, scale=None, initial_state=None,
                                      cu_seqlens=None):
    """The definition: per sequence, a loop summing the encoder tokens, then a loop over time.
    Returns (o (B, T, H, V) in q's dtype, final_state (B|N, H, K, V))."""
    cu = check_prefix_args(q, k, v, k_enc, v_enc, in_prefix, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V, acc = v.shape[-1], _acc(q)
    scale = K ** -0.5 if scale is None else scale
    if cu is not None:  # each sequence alone, from its own initial state
        outs, finals = [], []
        for n, (a, b) in enumerate(zip(cu, cu[1:])):
            S0 = None if initial_state is None else initial_state[n:n + 1]
            if b == a:
                finals.append(q.new_zeros(1, H, K, V, dtype=acc) if S0 is None else S0.to(acc))
                continue
            o, S = prefix_linear_attention_recurrent(
                q[:, a:b], k[:, a:b], v[:, a:b], k_enc[:, a:b], v_enc[:, a:b],
                None if in_prefix is None else in_prefix[:, a:b], scale, S0)
            outs.append(o)
            finals.append(S)
        o = torch.cat(outs, dim=1) if outs else q.new_zeros(1, 0, H, V)
        return o, torch.cat(finals, dim=0)
    S = q.new_zeros(B, H, K, V, dtype=acc) if initial_state is None else initial_state.to(acc)
    for s in range(T if in_prefix is not None else 0):  # 1. the encoder: every prefix token, order-free
        m = in_prefix[:, s, None, None, None]  # (B, 1, 1, 1)
        kv = k_enc[:, s, :, :, None].to(acc) * v_enc[:, s, :, None, :].to(acc)  # (B, H, K, V)
        S = S + torch.where(m, kv, torch.zeros_like(kv))
    outs = []
    for t in range(T):  # 2. causal linear attention from S_0 + E
        S = S + k[:, t, :, :, None].to(acc) * v[:, t, :, None, :].to(acc)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), S))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, V, dtype=acc)
    return o.to(q.dtype), S


def _encoder_state(k_enc, v_enc, in_prefix, cu, acc):
    """E (R, H, K, V): the sum of k_enc v_enc^T over the marked tokens of each row / sequence."""
    zero = torch.zeros((), dtype=acc, device=k_enc.device)
    m = in_prefix[..., None, None]  # (B, T, 1, 1)
    ke = torch.where(m, k_enc.to(acc), zero)  # (B, T, H, K): unmarked tokens are exact zeros, NaN or not
    ve = torch.where(m, v_enc.to(acc), zero)  # (B, T, H, V)
    if cu is None:
        return torch.einsum("bthk,bthv->bhkv", ke, ve)  # (B, H, K, V)
    T = k_enc.shape[1]
    seq = torch.bucketize(torch.arange(T, device=k_enc.device),
                          torch.tensor(cu[1:-1], device=k_enc.device), right=True)  # (T,)
    member = (seq[None, :] == torch.arange(len(cu) - 1, device=k_enc.device)[:, None]).to(acc)  # (N, T)
    return torch.einsum("nt,thk,thv->nhkv", member, ke[0], ve[0])  # (N, H, K, V)


def prefix_linear_attention_parallel(q, k, v, k_enc, v_enc, in_prefix=None, scale=None, initial_state=None,
                                     cu_seqlens=None):
    """The fast form: E as one masked product per row or sequence, added to the initial state, then
    causal linear attention by :func:`rnnlab.ops.gated_delta_rule` (chunked, or its one-token
    step). Returns (o (B, T, H, V) in q's dtype, final_state (B|N, H, K, V))."""
    cu = check_prefix_args(q, k, v, k_enc, v_enc, in_prefix, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    acc = _acc(q)
    S0 = q.new_zeros(state_rows(B, cu), H, K, v.shape[-1], dtype=acc) if initial_state is None \
        else initial_state.to(acc)
    if in_prefix is not None:
        S0 = S0 + _encoder_state(k_enc, v_enc, in_prefix, cu, acc)
    return gated_delta_rule(q, k, v, scale=scale, initial_state=S0, cu_seqlens=cu_seqlens)


def prefix_linear_attention(q, k, v, k_enc, v_enc, in_prefix=None, scale=None, initial_state=None,
                            cu_seqlens=None):
    """Prefix linear attention (see the module docstring); layers call this. It runs the fast form."""
    return prefix_linear_attention_parallel(q, k, v, k_enc, v_enc, in_prefix, scale, initial_state, cu_seqlens)
