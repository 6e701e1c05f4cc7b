"""Gated slot attention (Zhang et al. 2024): two gated linear-attention passes with a softmax between.

Per head, M memory slots hold keys K̃ (M, K) and values Ṽ (M, V). With the forget gate
g_t = exp(log_g_t) in (0, 1]^M and the write weights s_t (M):

    K̃_t = Diag(g_t) K̃_{t-1} + s_t k_t^T,        Ṽ_t = Diag(g_t) Ṽ_{t-1} + s_t v_t^T,
    o_t = Ṽ_t^T softmax(K̃_t q_t)                 (the paper takes s_t = 1 - g_t)

Pass 1 reads the slots (a linear attention whose decay acts on its value axis, the slots), the
softmax picks slots, pass 2 reads their values (a linear attention whose decay acts on its key
axis). Both passes share the decay, so the chunked form builds the (C, C, M) intra-chunk decay
tensor once and uses it twice; the chunk-start states come from one family-A scan over chunks of
the stacked [K̃ | Ṽ].

Shapes: q, k (B, T, H, K); v (B, T, H, V); s, log_g (B, T, H, M); state (K̃ (B, H, M, K),
Ṽ (B, H, M, V)); o is returned in q's dtype, the state in float32 or wider, where the softmax is
taken.

``cu_seqlens`` (:mod:`rnnlab.ops.bounds`): N sequences packed in one row (B = 1), each from its
own row of the state (N rows; None: zeros) to its own final row. The chunked form pads each
sequence to whole chunks (s = 0, log g = 0: neutral), segments the scan over chunks at sequence
starts, and masks by selection.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import tuning
from .bounds import (ChunkLayout, causal_product, check_cu_seqlens, chunk_middle, decay_factors_fit, known_finite,
                     state_rows, token_carry)
from .registry import implementation, select
from .scan import linear_scan, over_time_chunks

__all__ = ["gsa", "gsa_chunked", "gsa_recurrent"]


def _check(q, k, v, s, log_g, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    Bsz, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, T, H, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (Bsz, T, H):
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(v.shape)}")
    if s.dim() != 4 or s.shape[:3] != (Bsz, T, H):
        raise ValueError(f"s must be (B, T, H, M) with (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(s.shape)}")
    if log_g.shape != s.shape:
        raise ValueError(f"log_g must have s's shape (B, T, H, M) = {tuple(s.shape)}, got {tuple(log_g.shape)}")
    cu = check_cu_seqlens(cu_seqlens, Bsz, T)
    R, r = state_rows(Bsz, cu), ("B" if cu is None else "N")
    if initial_state is not None:
        M, V = s.shape[3], v.shape[3]
        if (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2
                or initial_state[0].shape != (R, H, M, K) or initial_state[1].shape != (R, H, M, V)):
            got = [tuple(t.shape) for t in initial_state] if isinstance(initial_state, (tuple, list)) else initial_state
            raise ValueError(f"initial_state must be (K̃ ({r}, H, M, K), Ṽ ({r}, H, M, V)) = "
                             f"(({R}, {H}, {M}, {K}), ({R}, {H}, {M}, {V})), got {got}")
    return cu


def _start(q, v, s, initial_state, acc):
    """(initial state in ``acc`` or None, zeros(rows) -> a zero state)."""
    _, _, H, K = q.shape
    M, V = s.shape[3], v.shape[3]
    zeros = lambda R: (q.new_zeros(R, H, M, K, dtype=acc), q.new_zeros(R, H, M, V, dtype=acc))  # noqa: E731
    return (None if initial_state is None else (initial_state[0].to(acc), initial_state[1].to(acc))), zeros


def gsa_recurrent(q, k, v, s, log_g, initial_state=None, cu_seqlens=None):
    """The definition: a loop over time. Returns (o (B, T, H, V), (K̃, Ṽ)); with ``cu_seqlens`` the
    state is reset to sequence n's initial state (row n, or zeros) at its first token and the final
    state has N rows."""
    cu = _check(q, k, v, s, log_g, initial_state, cu_seqlens)
    acc, dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    q, k, v, s, g = (t.to(acc) for t in (q, k, v, s, log_g.exp()))
    carry = token_carry(cu, *_start(q, v, s, initial_state, acc), q.shape[0], q.shape[1])
    state, os = None, []
    for t in range(q.shape[1]):
        Kt, Vt = state = carry.enter(t, state)
        Kt = g[:, t, :, :, None] * Kt + s[:, t, :, :, None] * k[:, t, :, None, :]  # (B, H, M, K)
        Vt = g[:, t, :, :, None] * Vt + s[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, M, V)
        p = torch.softmax(torch.einsum("bhmk,bhk->bhm", Kt, q[:, t]), dim=-1)  # (B, H, M)
        os.append(torch.einsum("bhmv,bhm->bhv", Vt, p))
        state = (Kt, Vt)
        carry.leave(t, state)
    return torch.stack(os, dim=1).to(dtype), carry.final()


def _block(q, k, v, s, log_g, state, chunk_size, cu_local=None, finite=False):
    """Chunked form on a block of T' tokens (T' a multiple of chunk_size); tensors (B, H, n, C, ·).
    Packed (``cu_local``: int64 cumulative lengths in the block, multiples of chunk_size, one per
    sequence piece): the state has one row per piece and the scan over chunks restarts at each.
    ``finite``: the inputs are known finite, so the decays may factor (see step 1)."""
    Kt0, Vt0 = state
    K = q.shape[-1]
    q, k, v, s, log_g = (rearrange(t, "b (n c) h d -> b h n c d", c=chunk_size) for t in (q, k, v, s, log_g))
    C = chunk_size
    # 1. cumulative log decay inside each chunk; the decay from s to t, exp(G_t - G_s), either
    # factors as e^(G_t - r) e^(r - G_s) around the chunk's middle r (when both stay in range),
    # so both passes below are matmuls, or is the masked (C, C, M) tensor
    G = log_g.cumsum(dim=3)  # (B, H, n, C, M)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    rel = G - chunk_middle(G) if finite else None
    if rel is None or not decay_factors_fit(rel):
        rel = None
        diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
        Dts = diff.exp()  # (B, H, n, C, C, M): prod of g over (s, t], zero above the diagonal
    # 2. chunk-start states: one scan over chunks of [K̃ | Ṽ] with the chunk's total decay
    w_end = (G[..., -1:, :] - G).exp() * s  # (B, H, n, C, M): weight of each write at chunk end
    U = torch.einsum("bhncm,bhncd->bhnmd", w_end, torch.cat([k, v], dim=-1))  # (B, H, n, M, K+V)
    a = G[..., -1, :, None].exp().expand_as(U)  # (B, H, n, M, K+V)
    S0 = torch.cat([Kt0, Vt0], dim=-1)  # (B or pieces, H, M, K+V)
    if cu_local is None:
        ends, _ = linear_scan(a.transpose(1, 2), U.transpose(1, 2), S0)  # (B, n, H, M, K+V)
        starts = torch.cat([S0[:, None], ends[:, :-1]], dim=1).transpose(1, 2)  # (B, H, n, M, K+V)
        end = ends[:, -1]  # (B, H, M, K+V)
    else:  # a segmented scan over chunks; a piece's first chunk starts from its own state (by selection)
        in_chunks = cu_local // C
        ends, end = linear_scan(a.transpose(1, 2), U.transpose(1, 2), S0, cu_seqlens=in_chunks)  # (1, n, ...)
        starts = torch.cat([torch.zeros_like(ends[:, :1]), ends[:, :-1]], dim=1)
        starts = starts.index_copy(1, in_chunks[:-1].to(starts.device), S0[None]).transpose(1, 2)
    Kst, Vst = starts[..., :K], starts[..., K:]
    # 3. pass 1: slot scores K̃_t q_t = decayed start state + intra-chunk writes
    A = torch.where(causal, q @ k.transpose(-1, -2), 0.0)  # (B, H, n, C, C); selections keep 0 * NaN out
    if rel is not None:  # sum_s A[t, s] e^(G_t - G_s) s_s = e^(G_t - r) (A @ s e^(r - G))[t]
        e_to, e_from = rel.exp(), torch.exp(-rel) * s  # (B, H, n, C, M)
        scores = e_to * (A @ e_from)
    else:
        DS = torch.where(causal[:, :, None], Dts * s[..., None, :, :], 0.0)  # (B, H, n, C, C, M): decay s -> t, s's weight
        scores = (A.unsqueeze(-2) @ DS).squeeze(-2)  # sum_s A[t, s] DS[t, s, m]
    scores = scores + G.exp() * (q @ Kst.transpose(-1, -2))  # (B, H, n, C, M)
    p = torch.softmax(scores, dim=-1)  # (B, H, n, C, M)
    # 4. pass 2: o_t = Ṽ_t^T p_t, the same decays with the slots as keys
    if rel is not None:  # sum_m p[t, m] e^(G_t,m - G_s,m) s_s,m, s <= t
        P = torch.where(causal, (p * e_to) @ e_from.transpose(-1, -2), 0.0)  # (B, H, n, C, C)
    else:
        P = (DS @ p.unsqueeze(-1)).squeeze(-1)  # (B, H, n, C, C): sum_m p[t, m] DS[t, s, m]
    o = causal_product(P, v) + torch.einsum("bhncm,bhnmd->bhncd", p * G.exp(), Vst)  # (B, H, n, C, V)
    return rearrange(o, "b h n c d -> b (n c) h d"), (end[..., :K], end[..., K:])


def gsa_chunked(q, k, v, s, log_g, initial_state=None, chunk_size=None, block_size=None, cu_seqlens=None):
    """Chunked form (same results as :func:`gsa_recurrent`). Chunks of ``chunk_size`` are computed
    in parallel within blocks of ``block_size`` tokens; blocks run one after the other and, under
    autograd, are recomputed in the backward pass, so memory is O(block · C · M) per head. None:
    the tuning table's ``gsa.block_size`` and ``gsa.factored_chunk_size`` where the decays factor
    in every chunk of that size, else ``gsa.chunk_size``. With ``cu_seqlens`` every
    sequence is padded to whole chunks (:class:`rnnlab.ops.bounds.ChunkLayout`)."""
    cu = _check(q, k, v, s, log_g, initial_state, cu_seqlens)
    acc = torch.promote_types(q.dtype, torch.float32)
    finite = known_finite(q, k, v, s, log_g, *(initial_state or ()))
    if chunk_size is None:  # long chunks where every chunk's decays will factor: a chunk's middle is
        # at most C/2 tokens from any of its positions
        long = tuning.get("gsa.factored_chunk_size", q.device)
        fits = finite and long is not None and decay_factors_fit(log_g.to(acc).abs().amax() * (long // 2))
        chunk_size = long if fits else tuning.get("gsa.chunk_size", q.device)
    block_size = block_size or tuning.get("gsa.block_size", q.device)
    T = q.shape[1]
    init, zeros = _start(q, v, s, initial_state, acc)
    block = max(chunk_size, block_size // chunk_size * chunk_size)
    if cu is None:
        pad = -T % chunk_size  # padded tokens write nothing (s = 0) and do not decay (log_g = 0)
        seqs = [F.pad(t.to(acc), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, s, log_g)]
        o, (Kt, Vt) = over_time_chunks(lambda *a: _block(*a[:5], a[5], chunk_size, None, finite), seqs,
                                       zeros(q.shape[0]) if init is None else init, block)
        return o[:, :T].to(q.dtype), (Kt, Vt)
    layout = ChunkLayout(cu, chunk_size, q.device)  # zero padding: s = 0, log_g = 0
    seqs = [layout.pad(t.to(acc)) for t in (q, k, v, s, log_g)]
    o, (Kt, Vt) = over_time_chunks(lambda *a: _block(*a[:5], a[5], chunk_size, a[6], finite), seqs, init, block,
                                   layout.padded_cu, zeros)
    return layout.unpad(o).to(q.dtype), (Kt, Vt)


def gsa(q, k, v, s, log_g, initial_state=None, cu_seqlens=None):
    """Gated slot attention — the form layers call; the form comes from
    :func:`rnnlab.ops.registry.select`: the loop for one token, chunks otherwise. ``cu_seqlens``:
    None, or int64 (N + 1,) for N sequences packed in one row (B = 1), with states of N rows."""
    _check(q, k, v, s, log_g, initial_state, cu_seqlens)
    form, backend = select("gsa", q=q, k=k, v=v, s=s, log_g=log_g, initial_state=initial_state, cu_seqlens=cu_seqlens)
    if form == "reference":
        return gsa_recurrent(q, k, v, s, log_g, initial_state, cu_seqlens)
    return implementation("gsa", form, backend)(q, k, v, s, log_g, initial_state, cu_seqlens=cu_seqlens)
