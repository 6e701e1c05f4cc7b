"""The generalised delta rule: a diagonal-plus-low-rank (DPLR) transition (RWKV-7's recurrence).

Per head, with a matrix state S (K x V), a decay vector g_t = exp(log_g_t) over K and two vectors
a_t, b_t (K):

    S_t = (Diag(g_t) + b_t a_t^T) S_{t-1} + k_t v_t^T,      o_t = scale * S_t^T q_t

The rank-one term reads the state *before* the decay. The delta rule is the case g = 1,
a = -beta k, b = k (then ``I - beta k k^T``); RWKV-7 (Peng et al. 2025, "RWKV-7 Goose") takes
a = -kappa, b = kappa * alpha with a unit key kappa and an in-context learning rate alpha in (0, 1),
so that ``S_t = (Diag(w_t) - (alpha_t kappa_t) kappa_t^T) S_{t-1} + k_t v_t^T`` — the paper's
``S_{t-1} (diag(w_t) - kappa^T (a * kappa)) + v^T k`` in its (V x K) convention, transposed.

Layout: q, k, a, b, log_g (B, T, H, K); v (B, T, H, V); state (B, H, K, V). All forms accumulate
in float32 (float64 stays float64) and return o in q's dtype, the final state in the accumulation
dtype. ``cu_seqlens`` (int64 (N + 1,), B = 1; :mod:`rnnlab.ops.bounds`): N sequences packed in
one row, initial and final states (N, H, K, V); nothing crosses a boundary, not even a NaN.

Forms: :func:`dplr_recurrent` (the definition), :func:`dplr_chunked` (chunkwise parallel, WY/UT
representation of the low-rank reads) and the dispatch :func:`dplr` (family "dplr" in
:mod:`rnnlab.ops.registry`).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import tuning
from .bounds import ChunkLayout, causal_product, chunk_middle, decay_factors_fit, known_finite, token_carry
from .delta import check_values_and_state
from .registry import implementation, select

__all__ = ["dplr", "dplr_recurrent", "dplr_chunked", "check_dplr_args"]


def check_dplr_args(q, k, v, log_g, a, b, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the argument whose shape does not fit q (B, T, H, K); returns
    ``cu_seqlens`` as a list of ints (None without)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got {tuple(q.shape)}")
    for name, x in (("k", k), ("log_g", log_g), ("a", a), ("b", b)):
        if x.shape != q.shape:
            raise ValueError(f"{name} must be (B, T, H, K) = {tuple(q.shape)} like q, got {tuple(x.shape)}")
    return check_values_and_state(q, v, initial_state, cu_seqlens)


def _acc(q):
    return torch.promote_types(q.dtype, torch.float32)


def dplr_recurrent(q, k, v, log_g, a, b, scale=None, initial_state=None, cu_seqlens=None):
    """The definition, a loop over time. Returns (o (B, T, H, V), final_state (B|N, H, K, V));
    ``scale`` None: K^-0.5 (RWKV-7 layers pass 1)."""
    cu = check_dplr_args(q, k, v, log_g, a, b, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    acc = _acc(q)
    scale = K ** -0.5 if scale is None else scale
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc),
                        lambda rows: q.new_zeros(rows, H, K, v.shape[-1], dtype=acc), B, T)
    S, outs = None, []
    for t in range(T):
        S = carry.enter(t, S)
        qt, kt, vt, gt, at, bt = (x[:, t].to(acc) for x in (q, k, v, log_g, a, b))  # (B, H, K|V)
        sa = torch.einsum("bhk,bhkv->bhv", at, S)  # (B, H, V): a_t^T S_{t-1}
        S = gt.exp()[..., None] * S + bt[..., :, None] * sa[..., None, :] + kt[..., :, None] * vt[..., None, :]
        carry.leave(t, S)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", qt, S))
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1], dtype=acc)
    return o.to(q.dtype), carry.final()


def _factored_scores(x, cx, ys, cy, strict: bool) -> list[torch.Tensor]:
    """:func:`_scores` as ``(x_t e^cx_t) . (y_s e^-cy_s)``: one matmul per y, for finite inputs
    whose cumulative log-decays (taken from a common reference) pass
    :func:`rnnlab.ops.bounds.decay_factors_fit`."""
    C = x.shape[-2]
    keep = torch.ones(C, C, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    xe, inv = x * cx.exp(), torch.exp(-cy)  # (B, H, N, C, K)
    return [torch.where(keep, xe @ (y * inv).transpose(-1, -2), 0.0) for y in ys]  # (B, H, N, C, C)


def _scores(x, cx, ys, cy, strict: bool, sub: int) -> list[torch.Tensor]:
    """``A[t, s] = sum_i x_t,i y_s,i exp(cx_t,i - cy_s,i)`` for s <= t (s < t if ``strict``; 0
    elsewhere) for each y of ``ys``, per chunk: x, cx, y, cy (B, H, N, C, K) -> (B, H, N, C, C).

    The caller guarantees ``cx_t <= cy_s`` elementwise wherever the entry is kept, so every
    exponent is <= 0. Chunks are cut into sub-chunks of ``sub``: inside one, the masked (sub, sub, K)
    decay tensor; between sub-chunks I > J the decay factors through ``r_J``, cy at J's last
    token, as ``exp(cx_t - r_J) exp(r_J - cy_s)`` (both exponents <= 0), so those blocks are matmuls."""
    B, H, N, C, K = x.shape
    c = sub if C % sub == 0 else C
    m = C // c
    split = lambda z: z.reshape(B, H, N, m, c, K)  # noqa: E731
    xs, cxs, cys = split(x), split(cx), split(cy)
    keep = torch.ones(c, c, dtype=torch.bool, device=x.device).tril(-1 if strict else 0)
    decay = torch.exp((cxs[..., :, None, :] - cys[..., None, :, :]).masked_fill(~keep[..., None], float("-inf")))
    ref = cys[..., -1, :]  # (B, H, N, m, K): r_J
    below = torch.ones(m, m, dtype=torch.bool, device=x.device).tril(-1)  # J < I
    to_ref = (cxs[..., :, None, :, :] - ref[..., None, :, None, :])  # (B, H, N, I, J, c, K)
    x_to_ref = xs[..., :, None, :, :] * torch.exp(to_ref.masked_fill(~below[:, :, None, None], float("-inf")))
    eye = torch.eye(m, dtype=torch.bool, device=x.device)[:, :, None, None]
    out = []
    for y in ys:
        ys_ = split(y)
        diag = torch.einsum("bhnitk,bhnisk,bhnitsk->bhnits", xs, ys_, decay)  # (B, H, N, m, c, c)
        diag = torch.where(keep, diag, 0.0)  # by selection: 0 * NaN of a later token stays out
        y_from_ref = ys_ * torch.exp(ref[..., None, :] - cys)  # (B, H, N, J, c, K)
        off = torch.einsum("bhnijtk,bhnjsk->bhnijts", x_to_ref, y_from_ref)
        off = torch.where(below[:, :, None, None], off, 0.0)
        blocks = torch.where(eye, diag[..., :, None, :, :], off)  # (B, H, N, I, J, c, c)
        out.append(rearrange(blocks, "b h n i j t s -> b h n (i t) (j s)"))
    return out


def _intra_chunk(q, k, v, log_g, a, b, C: int, sub: int, finite: bool = False):
    """Everything the chunks can do in parallel. Inputs (B, T, H, K|V) in the accumulation dtype.

    Within a chunk with cumulative log-decays ``c_t`` (from the chunk start, inclusive) and the
    state S_0 before it, the low-rank reads ``u_t = S_{t-1}^T a_t`` solve the unit lower-triangular
    system ``(I - A_ab) U = A_ak V + (a * exp(c_{t-1})) S_0`` (the WY/UT representation), linear
    in S_0: ``U = U_v + W S_0``. Returns per chunk (B, H, N, ...): U_v (C, V), W (C, K), q_plus
    (C, K) the queries decayed from the chunk start, A_qk V and A_qb (C, C) for the output, g_end
    (K) the decay over the chunk, k_end and b_end (K, C) the keys and b decayed to the chunk end."""
    T, V = q.shape[1], v.shape[-1]
    N = -(-T // C)
    pad = N * C - T

    def chunks(x):  # (B, T, H, D) -> (B, H, N, C, D), zero-padded (g = 1, no write, no read there)
        return rearrange(F.pad(x, (0, 0, 0, 0, 0, pad)) if pad else x, "b (n c) h d -> b h n c d", c=C)

    qc, kc, vc, ac, bc = (chunks(x) for x in (q, k, v, a, b))
    cum = chunks(log_g).cumsum(dim=3)  # (B, H, N, C, K): c_t
    cum_before = F.pad(cum[..., :-1, :], (0, 0, 1, 0))  # c_{t-1} (0 at the chunk start)
    ref = chunk_middle(cum)  # (B, H, N, 1, K): decays counted from the chunk's middle
    if finite and decay_factors_fit(torch.cat([cum, cum_before], dim=-2) - ref):  # e^c and e^-c: matmuls
        A_qk, A_qb = _factored_scores(qc, cum - ref, [kc, bc], cum - ref, False)
        A_ak, A_ab = _factored_scores(ac, cum_before - ref, [kc, bc], cum - ref, True)
    else:
        A_qk, A_qb = _scores(qc, cum, [kc, bc], cum, False, sub)  # s <= t: decay exp(c_t - c_s)
        A_ak, A_ab = _scores(ac, cum_before, [kc, bc], cum, True, sub)  # s < t: decay exp(c_{t-1} - c_s)
    eye = torch.eye(C, dtype=q.dtype, device=q.device)
    rhs = torch.cat([causal_product(A_ak, vc), ac * cum_before.exp()], dim=-1)  # (B, H, N, C, V+K)
    UW = torch.linalg.solve_triangular(eye - A_ab, rhs, upper=False, unitriangular=True)  # one solve for both
    to_end = (cum[..., -1:, :] - cum).exp()  # (B, H, N, C, K)
    return (UW[..., :V], UW[..., V:], qc * cum.exp(), causal_product(A_qk, vc), A_qb, cum[..., -1, :].exp(),
            (kc * to_end).transpose(-1, -2), (bc * to_end).transpose(-1, -2), vc)


def dplr_chunked(q, k, v, log_g, a, b, scale=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    """Chunkwise-parallel form (same arguments and results as the reference).

    Inside each chunk: decayed score matrices, one triangular solve (:func:`_intra_chunk`); across
    chunks only ``U = U_v + W S`` and ``S <- g_end S + k_end V + b_end U`` run in sequence; the
    outputs ``q_plus S + A_qk V + A_qb U`` follow for all chunks at once. ``chunk_size`` None: the
    tuning table's ``dplr.chunk_size`` (cut into sub-chunks of ``dplr.sub_chunk``). Every decay
    factor is an ``exp`` of a non-positive difference of cumulative log-decays, masked before
    ``exp``. With ``cu_seqlens`` every sequence is padded to whole chunks
    (:class:`rnnlab.ops.bounds.ChunkLayout`; zero padding is neutral) and the state is replaced by
    the sequence's initial state at its first chunk; masks are selections, so a non-finite input
    reaches neither earlier tokens nor other sequences.
    """
    cu = check_dplr_args(q, k, v, log_g, a, b, initial_state, cu_seqlens)
    B, T, H, K = q.shape
    V, acc = v.shape[-1], _acc(q)
    scale = K ** -0.5 if scale is None else scale
    C = chunk_size or tuning.get("dplr.chunk_size", q.device)
    layout = None if cu is None else ChunkLayout(cu, C, q.device)
    cast = lambda x: x.to(acc) if layout is None else layout.pad(x.to(acc))  # noqa: E731
    U_v, W, q_plus, AV, A_qb, g_end, k_end, b_end, vc = _intra_chunk(
        *(cast(x) for x in (q, k, v, log_g, a, b)), C, tuning.get("dplr.sub_chunk", q.device),
        known_finite(q, k, v, log_g, a, b, initial_state))
    N = U_v.shape[2]
    zeros = lambda rows: q.new_zeros(rows, H, K, V, dtype=acc)  # noqa: E731
    init = None if initial_state is None else initial_state.to(acc)
    carry = layout.carry(init, zeros) if layout is not None else token_carry(None, init, zeros, B, N)
    S, starts, reads = None, [], []
    per_chunk = zip(U_v.unbind(2), W.unbind(2), g_end.unbind(2), k_end.unbind(2), b_end.unbind(2), vc.unbind(2))
    for i, (Uv, Wn, g, ke, be, vn) in enumerate(per_chunk):  # the only sequential part
        S = carry.enter(i, S)  # a sequence's first chunk: its initial state
        U = Uv + Wn @ S  # (B, H, C, V): the low-rank reads a_t^T S_{t-1}
        starts.append(S)
        reads.append(U)
        S = g[..., None] * S + ke @ vn + be @ U  # (B, H, K, V)
        carry.leave(i, S)
    if not starts:  # T = 0
        return q.new_zeros(B, 0, H, V), carry.final()
    S_all, U_all = torch.stack(starts, dim=2), torch.stack(reads, dim=2)  # (B, H, N, K, V), (B, H, N, C, V)
    o = scale * (q_plus @ S_all + AV + causal_product(A_qb, U_all))  # (B, H, N, C, V)
    o = rearrange(o, "b h n c v -> b (n c) h v")
    o = o[:, :T] if layout is None else layout.unpad(o)
    return o.to(q.dtype), carry.final()


def dplr(q, k, v, log_g, a, b, scale=None, initial_state=None, chunk_size=None, cu_seqlens=None):
    """The DPLR recurrence (see module docstring); the form comes from
    :func:`rnnlab.ops.registry.select` (one token: the reference loop; otherwise the chunked form).
    Returns (o (B, T, H, V) in q's dtype, final_state (B|N, H, K, V) in float32/float64)."""
    check_dplr_args(q, k, v, log_g, a, b, initial_state, cu_seqlens)
    form, backend = select("dplr", q=q, k=k, v=v, log_g=log_g, a=a, b=b, initial_state=initial_state,
                           cu_seqlens=cu_seqlens)
    fn = implementation("dplr", form, backend)
    if form == "reference":
        return fn(q, k, v, log_g, a, b, scale, initial_state, cu_seqlens=cu_seqlens)
    return fn(q, k, v, log_g, a, b, scale, initial_state, chunk_size, cu_seqlens=cu_seqlens)
