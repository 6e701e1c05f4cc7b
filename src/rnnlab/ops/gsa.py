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
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import tuning
from .registry import implementation, select
from .scan import linear_scan, over_time_chunks

__all__ = ["gsa", "gsa_chunked", "gsa_recurrent"]


def _check(q, k, v, s, log_g, initial_state):
    Bsz, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, T, H, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (Bsz, T, H):
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(v.shape)}")
    if s.dim() != 4 or s.shape[:3] != (Bsz, T, H):
        raise ValueError(f"s must be (B, T, H, M) with (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(s.shape)}")
    if log_g.shape != s.shape:
        raise ValueError(f"log_g must have s's shape (B, T, H, M) = {tuple(s.shape)}, got {tuple(log_g.shape)}")
    if initial_state is not None:
        M, V = s.shape[3], v.shape[3]
        if (not isinstance(initial_state, (tuple, list)) or len(initial_state) != 2
                or initial_state[0].shape != (Bsz, H, M, K) or initial_state[1].shape != (Bsz, H, M, V)):
            got = [tuple(t.shape) for t in initial_state] if isinstance(initial_state, (tuple, list)) else initial_state
            raise ValueError(f"initial_state must be (K̃ (B, H, M, K), Ṽ (B, H, M, V)) = "
                             f"(({Bsz}, {H}, {M}, {K}), ({Bsz}, {H}, {M}, {V})), got {got}")


def _start(q, v, s, initial_state, acc):
    Bsz, _, H, K = q.shape
    M, V = s.shape[3], v.shape[3]
    if initial_state is None:
        return q.new_zeros(Bsz, H, M, K, dtype=acc), q.new_zeros(Bsz, H, M, V, dtype=acc)
    return initial_state[0].to(acc), initial_state[1].to(acc)


def gsa_recurrent(q, k, v, s, log_g, initial_state=None):
    """The definition: a loop over time. Returns (o (B, T, H, V), (K̃, Ṽ))."""
    _check(q, k, v, s, log_g, initial_state)
    acc, dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    q, k, v, s, g = (t.to(acc) for t in (q, k, v, s, log_g.exp()))
    Kt, Vt = _start(q, v, s, initial_state, acc)
    os = []
    for t in range(q.shape[1]):
        Kt = g[:, t, :, :, None] * Kt + s[:, t, :, :, None] * k[:, t, :, None, :]  # (B, H, M, K)
        Vt = g[:, t, :, :, None] * Vt + s[:, t, :, :, None] * v[:, t, :, None, :]  # (B, H, M, V)
        p = torch.softmax(torch.einsum("bhmk,bhk->bhm", Kt, q[:, t]), dim=-1)  # (B, H, M)
        os.append(torch.einsum("bhmv,bhm->bhv", Vt, p))
    return torch.stack(os, dim=1).to(dtype), (Kt, Vt)


def _block(q, k, v, s, log_g, state, chunk_size):
    """Chunked form on a block of T' tokens (T' a multiple of chunk_size); tensors (B, H, n, C, ·)."""
    Kt0, Vt0 = state
    K = q.shape[-1]
    q, k, v, s, log_g = (rearrange(t, "b (n c) h d -> b h n c d", c=chunk_size) for t in (q, k, v, s, log_g))
    C = chunk_size
    # 1. cumulative log decay inside each chunk and the masked (C, C, M) decay between positions
    G = log_g.cumsum(dim=3)  # (B, H, n, C, M)
    causal = torch.ones(C, C, dtype=torch.bool, device=q.device).tril()
    diff = (G[..., :, None, :] - G[..., None, :, :]).masked_fill(~causal[:, :, None], float("-inf"))
    Dts = diff.exp()  # (B, H, n, C, C, M): prod of g over (s, t], zero above the diagonal
    # 2. chunk-start states: one scan over chunks of [K̃ | Ṽ] with the chunk's total decay
    w_end = (G[..., -1:, :] - G).exp() * s  # (B, H, n, C, M): weight of each write at chunk end
    U = torch.einsum("bhncm,bhncd->bhnmd", w_end, torch.cat([k, v], dim=-1))  # (B, H, n, M, K+V)
    a = G[..., -1, :, None].exp().expand_as(U)  # (B, H, n, M, K+V)
    S0 = torch.cat([Kt0, Vt0], dim=-1)  # (B, H, M, K+V)
    ends, _ = linear_scan(a.transpose(1, 2), U.transpose(1, 2), S0)  # (B, n, H, M, K+V)
    starts = torch.cat([S0[:, None], ends[:, :-1]], dim=1).transpose(1, 2)  # (B, H, n, M, K+V)
    Kst, Vst = starts[..., :K], starts[..., K:]
    # 3. pass 1: slot scores K̃_t q_t = decayed start state + intra-chunk writes
    A = q @ k.transpose(-1, -2)  # (B, H, n, C, C)
    DS = Dts * s[..., None, :, :]  # (B, H, n, C, C, M): decay from s to t times s's write weight
    scores = (A.unsqueeze(-2) @ DS).squeeze(-2)  # sum_s A[t, s] DS[t, s, m]
    scores = scores + G.exp() * (q @ Kst.transpose(-1, -2))  # (B, H, n, C, M)
    p = torch.softmax(scores, dim=-1)  # (B, H, n, C, M)
    # 4. pass 2: o_t = Ṽ_t^T p_t, the same decays with the slots as keys
    P = (DS @ p.unsqueeze(-1)).squeeze(-1)  # (B, H, n, C, C): sum_m p[t, m] DS[t, s, m]
    o = P @ v + torch.einsum("bhncm,bhnmd->bhncd", p * G.exp(), Vst)  # (B, H, n, C, V)
    end = ends[:, -1]  # (B, H, M, K+V)
    return rearrange(o, "b h n c d -> b (n c) h d"), (end[..., :K], end[..., K:])


def gsa_chunked(q, k, v, s, log_g, initial_state=None, chunk_size=None, block_size=None):
    """Chunked form (same results as :func:`gsa_recurrent`). Chunks of ``chunk_size`` are computed
    in parallel within blocks of ``block_size`` tokens; blocks run one after the other and, under
    autograd, are recomputed in the backward pass, so memory is O(block · C · M) per head. None:
    the tuning table's ``gsa.chunk_size`` and ``gsa.block_size``."""
    _check(q, k, v, s, log_g, initial_state)
    acc = torch.promote_types(q.dtype, torch.float32)
    chunk_size = chunk_size or tuning.get("gsa.chunk_size", q.device)
    block_size = block_size or tuning.get("gsa.block_size", q.device)
    T = q.shape[1]
    state = _start(q, v, s, initial_state, acc)
    pad = -T % chunk_size  # padded tokens write nothing (s = 0) and do not decay (log_g = 0)
    seqs = [F.pad(t.to(acc), (0, 0, 0, 0, 0, pad)) for t in (q, k, v, s, log_g)]
    block = max(chunk_size, block_size // chunk_size * chunk_size)
    o, (Kt, Vt) = over_time_chunks(lambda *a: _block(*a[:5], a[5], chunk_size), seqs, state, block)
    return o[:, :T].to(q.dtype), (Kt, Vt)


def gsa(q, k, v, s, log_g, initial_state=None):
    """Gated slot attention — the form layers call; the form comes from
    :func:`rnnlab.ops.registry.select`: the loop for one token, chunks otherwise."""
    _check(q, k, v, s, log_g, initial_state)
    form, backend = select("gsa", q=q, k=k, v=v, s=s, log_g=log_g, initial_state=initial_state)
    if form == "reference":
        return gsa_recurrent(q, k, v, s, log_g, initial_state)
    return implementation("gsa", form, backend)(q, k, v, s, log_g, initial_state)
