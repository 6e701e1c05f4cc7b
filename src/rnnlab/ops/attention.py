"""Kernel family C: softmax attention with log-sum-exp outputs, windows and merging.

Causal softmax attention ``o_t = sum_j softmax_j(q_t . k_j * scale) v_j`` over an allowed key set.
Attention to two disjoint key sets (attention sinks and a sliding window) is computed separately and
merged exactly with :func:`merge_attention`, using each part's log-sum-exp of scores.

Forms: :func:`attention_reference` is the definition (a loop over queries, each attending to the
keys of its prefix); :func:`causal_attention` is the same attention by torch's
``scaled_dot_product_attention`` (flash-style kernels, grouped-query heads); :func:`softmax_attention`
adds windows, a first key and log-sum-exps, blockwise.

Layout here is head-first, as in ``scaled_dot_product_attention``: q (B, H, T, K), k (B, H, L, K),
v (B, H, L, V). Key/query *indices* are absolute token positions (int64), used for masking only.

Packed rows (``cu_seqlens``, :mod:`rnnlab.ops.bounds`): positions ``cu_seqlens[n] <= p <
cu_seqlens[n + 1]`` form sequence n, and a query attends only to keys of its own sequence
(block-diagonal causal attention). Masks are selections and a non-finite value never reaches a
query that may not see it.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from .bounds import check_cu_seqlens, known_finite

__all__ = ["attention_reference", "causal_attention", "softmax_attention", "merge_attention"]


def attention_reference(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor,
                        scale: float | None = None) -> torch.Tensor:
    """The definition of causal attention, one query at a time: query t of row b attends to keys
    ``0 .. q_pos[b, t]`` of its row, ``o = softmax(k[:p+1] q * scale) @ v[:p+1]``.

    q (B, H, T, K); k (B, G, L, K), v (B, G, L, V) with G dividing H (query head h reads key head
    ``h // (H / G)``); q_pos (B, T) int64. Returns o (B, H, T, V) in the dtype of q.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, T, _ = q.shape
    rep = H // k.shape[1]
    o = q.new_zeros(B, H, T, v.shape[-1])
    for b in range(B):
        for h in range(H):
            for t in range(T):
                p = int(q_pos[b, t]) + 1  # keys 0 .. q_pos[b, t]
                s = k[b, h // rep, :p] @ q[b, h, t] * scale  # (p,)
                o[b, h, t] = torch.softmax(s, dim=0) @ v[b, h // rep, :p]  # (V,)
    return o


def causal_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_pos: torch.Tensor | None = None,
                     scale: float | None = None) -> torch.Tensor:
    """:func:`attention_reference` by ``scaled_dot_product_attention``: query t of row b attends to
    keys ``0 .. q_pos[b, t]``.

    q (B, H, T, K); k (B, G, L, K), v (B, G, L, V) with G dividing H; q_pos (B, T) int64, or None:
    the last T keys are the queries' own (``q_pos[b, t] = L - T + t``: plain causal attention when
    L == T, after L - T cached keys otherwise). Returns o (B, H, T, V) in the dtype of q.

    Isolation: torch's CPU kernels compute ``0 * NaN`` for a masked key (a NaN key with a boolean
    mask, a NaN value with either mask), which would carry a non-finite value of a later token to
    earlier queries. So, when T > 1, non-finite entries of k and v are zeroed (a selection) for the
    product, and a query is given NaN where a key it may see had one: its whole row for a key, the
    column for a value. For finite inputs both steps select nothing (the result is SDPA's, and so
    are the gradients), and where the inputs are known finite they are skipped. With T == 1 (decoding) no key before the query is masked; keys past a row's
    last query are never read and must be finite (the attention layer keeps zeros there).
    """
    B, H, T, _ = q.shape
    G, L = k.shape[1], k.shape[2]
    causal, mask = False, None
    if q_pos is not None:
        mask = (torch.arange(L, device=q.device) <= q_pos[..., None])[:, None]  # (B, 1, T, L)
    elif T == L:
        causal = T > 1
    elif T > 1:
        mask = torch.arange(L, device=q.device) <= (L - T + torch.arange(T, device=q.device))[:, None]  # (T, L)
    if T == 1 or known_finite(k, v):  # nothing to keep out (decided on CPU only: see known_finite)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                              enable_gqa=G != H)
    bad_k = ~torch.isfinite(k).all(dim=-1)  # (B, G, L) keys with a non-finite entry
    bad_v = ~torch.isfinite(v)  # (B, G, L, V)
    k = torch.where(bad_k[..., None], 0.0, k)
    v = torch.where(bad_v, 0.0, v)
    o = F.scaled_dot_product_attention(q, k, v, attn_mask=mask, is_causal=causal, scale=scale,
                                       enable_gqa=G != H)  # (B, H, T, V)
    # bad keys and values among each query's keys 0 .. q_pos: prefix counts read at q_pos
    n_k = bad_k.to(torch.int32).cumsum(dim=-1, dtype=torch.int32)  # (B, G, L)
    n_v = bad_v.to(torch.int32).cumsum(dim=-2, dtype=torch.int32)  # (B, G, L, V)
    if q_pos is None:
        n_k, n_v = n_k[:, :, L - T:], n_v[:, :, L - T:]  # (B, G, T), (B, G, T, V)
    else:
        at = q_pos[:, None].expand(B, G, T)  # (B, G, T)
        n_k, n_v = n_k.gather(2, at), n_v.gather(2, at[..., None].expand(B, G, T, v.shape[-1]))
    poisoned = (n_v > 0) | (n_k > 0)[..., None]  # (B, G, T, V)
    o = rearrange(o, "b (g r) t v -> b g r t v", g=G).masked_fill(poisoned[:, :, None], float("nan"))
    return rearrange(o, "b g r t v -> b (g r) t v")


def _attend_block(q, k, v, mask, scale):
    """Masked attention of one query block with its log-sum-exp. mask (B or 1, Tq, L) True = allowed,
    a contiguous range of keys per query (keys sorted by position, every bound an interval)."""
    acc = torch.promote_types(q.dtype, torch.float32)
    B, H, Tq, _ = q.shape
    if k.shape[2] == 0:  # no key in reach of this block
        return q.new_zeros(B, H, Tq, v.shape[-1], dtype=acc), q.new_full((B, H, Tq), float("-inf"), dtype=acc)
    s = torch.einsum("bhtk,bhlk->bhtl", q.to(acc), k.to(acc)) * scale  # (B, H, Tq, L)
    s = s.masked_fill(~mask[:, None], float("-inf"))
    m = s.amax(dim=-1, keepdim=True)  # (B, H, Tq, 1); -inf where no key is allowed
    m = m.masked_fill(torch.isinf(m), 0.0).detach()
    p = torch.exp(s - m)  # masked scores give exactly 0
    den = p.sum(dim=-1)  # (B, H, Tq)
    # p @ v with 0 * NaN kept out: a non-finite value of a key a query may not see must not reach it
    v = v.to(acc)
    if known_finite(v):  # nothing to keep out (decided on CPU only)
        o = torch.einsum("bhtl,bhlv->bhtv", p, v) / den.clamp_min(1e-30).unsqueeze(-1)
    else:
        bad = ~torch.isfinite(v)  # (B, H, L, V)
        o = torch.einsum("bhtl,bhlv->bhtv", p, v.masked_fill(bad, 0.0)) / den.clamp_min(1e-30).unsqueeze(-1)
        first = mask.int().argmax(dim=-1)  # (B or 1, Tq) the first allowed key
        last = first + mask.sum(dim=-1)  # (B or 1, Tq) one past the last allowed key
        n_bad = torch.cat([torch.zeros_like(bad[..., :1, :], dtype=torch.long), bad.long().cumsum(dim=-2)], dim=-2)
        at = lambda i: n_bad.gather(-2, i[:, None, :, None].expand(B, H, Tq, v.shape[-1]))  # noqa: E731
        o = o.masked_fill((at(last) - at(first)) > 0, float("nan"))  # (B, H, Tq, V)
    lse = torch.where(den > 0, torch.log(den.clamp_min(1e-30)) + m.squeeze(-1), float("-inf"))
    return o, lse


def softmax_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, q_idx: torch.Tensor,
                      k_idx: torch.Tensor, window: int | None = None, min_key: int = 0,
                      scale: float | None = None, block_size: int = 256,
                      cu_seqlens: torch.Tensor | None = None,
                      with_lse: bool = True) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Causal softmax attention with an optional sliding window, returning the log-sum-exp.

    Query ``t`` (absolute index ``q_idx[t]``) attends to key ``j`` iff
    ``k_idx[j] <= q_idx[t]``, ``q_idx[t] - k_idx[j] < window`` (if a window is given) and
    ``k_idx[j] >= min_key``. Queries are processed in blocks of ``block_size`` and, when there are
    several, each block only sees the keys its window can reach, so memory is O(T * (window +
    block_size)); a single block (T <= block_size) reads every key given.

    Args:
        q: (B, H, T, K) queries; k: (B, H, L, K) keys; v: (B, H, L, V) values.
        q_idx: (T,) or, one per row, (B, T) increasing absolute positions of the queries;
            k_idx: (L,) or (B, L) increasing, of the keys (rows of a batch may sit at different
            positions: a ragged batch).
        cu_seqlens: None, or int64 (N + 1,) cumulative lengths of N sequences packed in one row
            (B = 1) over positions 0 .. q_idx[-1]: a query also needs ``k_idx[j] >= cu_seqlens[n]``
            for its sequence n (block-diagonal causal attention).
        with_lse: False when the caller needs no log-sum-exp (returned as None): on finite CPU
            inputs with ``min_key = 0`` and no ``cu_seqlens`` (so every query sees at least itself)
            each block then runs as one masked SDPA call.
    Returns:
        o (B, H, T, V) in float32 (float64 for float64 inputs) (zeros for a query with no allowed key) and lse (B, H, T)
        (``-inf`` for such a query), or None without ``with_lse``.
    """
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    B, H, T, _ = q.shape
    rows = B if q_idx.dim() == 2 or k_idx.dim() == 2 else 1
    q_idx = q_idx.expand(rows, T)  # (B or 1, T)
    k_idx = k_idx.expand(rows, k_idx.shape[-1]).contiguous()  # (B or 1, L)
    seq_start = None  # (1, T) the first position of each query's sequence
    if cu_seqlens is not None:
        check_cu_seqlens(cu_seqlens, B, int(q_idx[0, -1]) + 1 if T else 0)
        cu = cu_seqlens.to(q_idx.device)
        seq_start = cu[torch.searchsorted(cu, q_idx, right=True) - 1]
    outs, lses = [], []
    sdpa = not with_lse and min_key == 0 and cu_seqlens is None and known_finite(q, k, v)
    for t0 in range(0, T, block_size):
        qi = q_idx[:, t0:t0 + block_size]  # (B or 1, Tq)
        if T <= block_size:  # one block: every key given, masked (no host sync; decoding is such a call)
            j0, j1 = 0, k_idx.shape[1]
        else:
            lo = torch.full_like(qi[:, :1], min_key) if window is None else (qi[:, :1] - window + 1).clamp_min(min_key)
            if seq_start is not None:
                lo = torch.maximum(lo, seq_start[:, t0:t0 + 1])
            j0 = int(torch.searchsorted(k_idx, lo).min())  # the first key any row of the block may see
            j1 = int(torch.searchsorted(k_idx, qi[:, -1:].contiguous(), right=True).max())  # one past the last
        kj = k_idx[:, None, j0:j1]  # (B or 1, 1, Lb)
        mask = (kj <= qi[:, :, None]) & (kj >= min_key)  # (B or 1, Tq, Lb)
        if seq_start is not None:
            mask &= kj >= seq_start[:, t0:t0 + block_size, None]
        if window is not None:
            mask &= (qi[:, :, None] - kj) < window
        qb, kb, vb = q[:, :, t0:t0 + block_size], k[:, :, j0:j1], v[:, :, j0:j1]
        if sdpa:  # every query sees itself: no empty row, which SDPA would turn into NaN
            acc = torch.promote_types(q.dtype, torch.float32)
            outs.append(F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask[:, None], scale=scale).to(acc))
            continue
        o, lse = _attend_block(qb, kb, vb, mask, scale)
        outs.append(o)
        lses.append(lse)
    return torch.cat(outs, dim=2), (torch.cat(lses, dim=2) if with_lse else None)


def merge_attention(o1: torch.Tensor, lse1: torch.Tensor, o2: torch.Tensor,
                    lse2: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge attention over two disjoint key sets: o (B, H, T, V), lse (B, H, T) each.

    ``o = (exp(lse1) o1 + exp(lse2) o2) / (exp(lse1) + exp(lse2))``, computed stably; a part with
    ``lse = -inf`` (no keys) contributes nothing.
    """
    lse = torch.logaddexp(lse1, lse2)  # (B, H, T)
    safe = lse.masked_fill(torch.isinf(lse), 0.0)
    w1 = torch.exp(lse1 - safe).unsqueeze(-1)
    w2 = torch.exp(lse2 - safe).unsqueeze(-1)
    return o1 * w1 + o2 * w2, lse
