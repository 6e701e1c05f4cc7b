"""xLSTM's mLSTM (Beck et al. 2024): a matrix memory with exponential input gates, stabilised.

Per head, with log-gates ``log_f`` (the log of the forget gate, e.g. logsigmoid of its
pre-activation) and ``log_i`` (the input gate's pre-activation: ``i = exp(log_i)``), the state is
kept divided by ``exp(m)`` with the running stabiliser m:

    m_t = max(log_f_t + m_{t-1}, log_i_t)
    C_t = exp(log_f_t + m_{t-1} - m_t) C_{t-1} + exp(log_i_t - m_t) k_t v_t^T      (K x V)
    n_t = exp(log_f_t + m_{t-1} - m_t) n_{t-1} + exp(log_i_t - m_t) k_t             (K)
    h_t = C_t^T (s q_t) / (max(|n_t . (s q_t)|, exp(-m_t)) + eps)                    (V)

(s = ``scale``, default K^-1/2, the paper's 1/sqrt(d) on the keys moved to the queries.) This is
the paper's stabilised form: with ``eps = 0`` (the default) h equals the unstabilised
``C^T q / max(|n^T q|, 1)``; xLSTM-7B (NX-AI's ``xlstm_large``) adds ``eps = 1e-6`` to the
stabilised denominator. ``state=None``
means C = 0, n = 0, m = 0.

Because ``m_t = F_t + max(m_0, max_{s<=t}(log_i_s - F_s))`` with ``F`` the cumulative log_f, every
weight ``exp(F_t - F_s + log_i_s - m_t)`` is at most 1, and a block of tokens can be done at once
by masked matrix products (:func:`mlstm_parallel`, quadratic in T); :func:`mlstm_chunked` does that
per chunk and passes (C, n, m) between chunks.

Shapes: q, k (B, T, H, K); v (B, T, H, V); log_f, log_i (B, T, H); state (C (B, H, K, V),
n (B, H, K), m (B, H)). Returns h (B, T, H, V) in q's dtype and the state in float32/float64.

``cu_seqlens`` (:mod:`rnnlab.ops.bounds`): N sequences packed in one row (B = 1), each from its
own row of the state (N rows; None: zeros) to its own final row. The chunked forms pad each
sequence to whole chunks with neutral tokens (f = 1, i = 0) and mask by selection, so a
non-finite value reaches neither an earlier token nor another sequence.
"""
from __future__ import annotations

import torch

from . import tuning
from .backends import compiled
from .bounds import ChunkLayout, causal_product, check_cu_seqlens, state_rows, token_carry
from .registry import implementation, select

__all__ = ["mlstm", "mlstm_recurrent", "mlstm_parallel", "mlstm_chunked", "mlstm_chunked_compiled", "mlstm_step"]


def _check(q, k, v, log_f, log_i, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, T, H, K); got {tuple(q.shape)} and {tuple(k.shape)}")
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    for name, g in (("log_f", log_f), ("log_i", log_i)):
        if g.shape != (B, T, H):
            raise ValueError(f"{name} must be (B, T, H) = ({B}, {T}, {H}), got {tuple(g.shape)}")
    cu = check_cu_seqlens(cu_seqlens, B, T)
    R, rows = state_rows(B, cu), ("B" if cu is None else "N")
    if initial_state is not None:
        C, n, m = initial_state
        if C.shape != (R, H, K, v.shape[-1]) or n.shape != (R, H, K) or m.shape != (R, H):
            raise ValueError(f"initial_state must be (C ({rows},H,K,V), n ({rows},H,K), m ({rows},H)) for {rows}={R}, "
                             f"H={H}, K={K}, V={v.shape[-1]}; got {tuple(C.shape)}, {tuple(n.shape)}, {tuple(m.shape)}")
    return cu


def _init(q, v, initial_state, acc):
    """(initial state in ``acc`` or None, zeros(rows) -> a zero state)."""
    _, _, H, K = q.shape
    z = q.new_zeros
    zeros = lambda R: (z(R, H, K, v.shape[-1], dtype=acc), z(R, H, K, dtype=acc), z(R, H, dtype=acc))  # noqa: E731
    return (None if initial_state is None else tuple(s.to(acc) for s in initial_state)), zeros


def mlstm_recurrent(q, k, v, log_f, log_i, scale=None, initial_state=None, cu_seqlens=None, eps=0.0):
    """The definition: a loop over time. Returns (h (B, T, H, V), (C, n, m)). With ``cu_seqlens``
    the state is reset to sequence n's initial state (row n, or zeros) at its first token and the
    final state has N rows."""
    cu = _check(q, k, v, log_f, log_i, initial_state, cu_seqlens)
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    carry = token_carry(cu, *_init(q, v, initial_state, acc), q.shape[0], q.shape[1])
    state, hs = None, []
    for t in range(q.shape[1]):
        h, state = _step(q[:, t].to(acc) * scale, k[:, t].to(acc), v[:, t].to(acc), log_f[:, t].to(acc),
                         log_i[:, t].to(acc), carry.enter(t, state), eps)
        carry.leave(t, state)
        hs.append(h)
    return torch.stack(hs, dim=1).to(q.dtype), carry.final()


def _step(q, k, v, log_f, log_i, state, eps=0.0):
    C, n, m = state
    m_new = torch.maximum(log_f + m, log_i)  # (B, H)
    f = torch.exp(log_f + m - m_new)
    i = torch.exp(log_i - m_new)
    C = f[..., None, None] * C + i[..., None, None] * k[..., :, None] * v[..., None, :]  # (B, H, K, V)
    n = f[..., None] * n + i[..., None] * k  # (B, H, K)
    num = torch.einsum("bhkv,bhk->bhv", C, q)
    den = torch.maximum((n * q).sum(-1).abs(), torch.exp(-m_new))  # (B, H)
    return num / (den[..., None] + eps), (C, n, m_new)


def mlstm_step(q, k, v, log_f, log_i, scale=None, state=None, eps=0.0):
    """One token: q, k (B, H, K), v (B, H, V), log_f, log_i (B, H). Returns (h (B, H, V), state)."""
    h, st = mlstm_recurrent(q[:, None], k[:, None], v[:, None], log_f[:, None], log_i[:, None], scale, state,
                            eps=eps)
    return h[:, 0], st


def _block(q, k, v, log_f, log_i, state, eps=0.0):
    """A block of L tokens at once (head-first inputs (B, H, L, ·), q already scaled)."""
    C0, n0, m0 = state
    L = q.shape[2]
    Fc = log_f.cumsum(dim=-1)  # (B, H, L) cumulative log forget gates
    m = Fc + torch.maximum(m0[..., None], torch.cummax(log_i - Fc, dim=-1).values)  # (B, H, L)
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    logw = Fc[..., :, None] - Fc[..., None, :] + log_i[..., None, :] - m[..., :, None]  # (B, H, L, L)
    W = torch.exp(logw.masked_fill(~causal, float("-inf")))  # <= 1 on and below the diagonal
    S = torch.where(causal, W * (q @ k.transpose(-1, -2)), 0.0)  # (B, H, L, L); by selection, not 0 * NaN
    carry = torch.exp(Fc + m0[..., None] - m)  # (B, H, L) weight of the incoming state
    num = causal_product(S, v) + carry[..., None] * (q @ C0)  # (B, H, L, V)
    den = S.sum(-1) + carry * (q @ n0[..., None])[..., 0]  # (B, H, L)
    h = num / (torch.maximum(den.abs(), torch.exp(-m))[..., None] + eps)
    w_end = W[..., -1, :]  # (B, H, L) weights of each token in the last state
    C = carry[..., -1, None, None] * C0 + (k * w_end[..., None]).transpose(-1, -2) @ v  # (B, H, K, V)
    n = carry[..., -1, None] * n0 + (k * w_end[..., None]).sum(-2)  # (B, H, K)
    return h, (C, n, m[..., -1])


def _head_first(x, acc):
    return x.to(acc).transpose(1, 2)  # (B, T, H, ...) -> (B, H, T, ...)


def mlstm_chunked(q, k, v, log_f, log_i, scale=None, initial_state=None, chunk_size=None, cu_seqlens=None,
                  eps=0.0):
    """Chunkwise form: :func:`mlstm_parallel` on chunks of ``chunk_size`` (None: the tuning
    table's ``mlstm.chunk_size``), the state passed along (with ``cu_seqlens``: each sequence
    padded to whole chunks, its first chunk starting from its own initial state)."""
    return _chunked(q, k, v, log_f, log_i, scale, initial_state, chunk_size, _block, cu_seqlens, eps)


def mlstm_chunked_compiled(q, k, v, log_f, log_i, scale=None, initial_state=None, chunk_size=None,
                           cu_seqlens=None, eps=0.0):
    """:func:`mlstm_chunked` with the loop-free work of one chunk compiled by ``torch.compile``
    (the "compile" backend). Same arguments and results."""
    return _chunked(q, k, v, log_f, log_i, scale, initial_state, chunk_size, compiled(_block), cu_seqlens, eps)


def _chunked(q, k, v, log_f, log_i, scale, initial_state, chunk_size, block, cu_seqlens, eps):
    cu = _check(q, k, v, log_f, log_i, initial_state, cu_seqlens)
    acc = torch.promote_types(q.dtype, torch.float32)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    chunk_size = chunk_size or tuning.get("mlstm.chunk_size", q.device)
    B, T = q.shape[:2]
    layout = None if cu is None else ChunkLayout(cu, chunk_size, q.device)
    pad = (lambda x, fill=0.0: x) if layout is None else layout.pad  # padding tokens: f = 1, i = 0
    qh, kh, vh, fh = (_head_first(pad(x.to(acc)), acc) for x in (q * scale, k, v, log_f))
    ih = _head_first(pad(log_i.to(acc), float("-inf")), acc)
    init, zeros = _init(q, v, initial_state, acc)
    carry = token_carry(None, init, zeros, B, -(-T // chunk_size)) if layout is None else layout.carry(init, zeros)
    state, outs = None, []
    for i, t0 in enumerate(range(0, qh.shape[2], chunk_size)):
        sl = slice(t0, t0 + chunk_size)
        h, state = block(qh[:, :, sl], kh[:, :, sl], vh[:, :, sl], fh[:, :, sl], ih[:, :, sl], carry.enter(i, state),
                         eps)
        carry.leave(i, state)
        outs.append(h)
    h = torch.cat(outs, dim=2).transpose(1, 2)  # (B, T or padded, H, V)
    return (h if layout is None else layout.unpad(h)).to(q.dtype), carry.final()


def mlstm_parallel(q, k, v, log_f, log_i, scale=None, initial_state=None, cu_seqlens=None, eps=0.0):
    """Quadratic form: all T tokens at once by masked (T x T) products; for short sequences
    (with ``cu_seqlens``: each sequence at once, as a chunk of the longest one's length)."""
    cu = _check(q, k, v, log_f, log_i, initial_state, cu_seqlens)
    longest = q.shape[1] if cu is None else max(b - a for a, b in zip(cu, cu[1:]))
    return mlstm_chunked(q, k, v, log_f, log_i, scale, initial_state, max(1, longest), cu_seqlens, eps)


def one_token(q, k, v, log_f, log_i, scale=None, initial_state=None, eps=0.0):
    """The step form on a sequence of one token (q, k (B, 1, H, K), ...). Returns (h (B, 1, H, V), state)."""
    h, st = mlstm_step(q[:, 0], k[:, 0], v[:, 0], log_f[:, 0], log_i[:, 0], scale, initial_state, eps)
    return h[:, None], st


def mlstm(q, k, v, log_f, log_i, scale=None, initial_state=None, chunk_size=None, cu_seqlens=None, eps=0.0):
    """The mLSTM (see module docstring); the form and backend come from
    :func:`rnnlab.ops.registry.select` (one token: the step; otherwise chunks) — layers call this.
    ``cu_seqlens``: None, or int64 (N + 1,) for N sequences packed in one row (B = 1), with an
    initial state of N rows (or None) and a final state of N rows. ``eps`` >= 0 is added to the
    stabilised denominator (0: the paper's mLSTM)."""
    _check(q, k, v, log_f, log_i, initial_state, cu_seqlens)
    form, backend = select("mlstm", q=q, k=k, v=v, log_f=log_f, log_i=log_i, initial_state=initial_state,
                           cu_seqlens=cu_seqlens)
    if form == "step":
        return one_token(q, k, v, log_f, log_i, scale, initial_state, eps)
    return implementation("mlstm", form, backend)(q, k, v, log_f, log_i, scale, initial_state, chunk_size,
                                                  cu_seqlens=cu_seqlens, eps=eps)
