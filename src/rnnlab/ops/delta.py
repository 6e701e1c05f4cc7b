"""Kernel family B: the gated delta rule and its special cases (gated linear attention).

Per head, with a matrix state S (K x V):

    S_t = (I - b_t k_t k_t^T) Diag(g_t) S_{t-1} + b_t k_t v_t^T,      o_t = scale * S_t^T q_t

``log_g`` is log(g): None (g = 1), (B, T, H) a scalar per head, or (B, T, H, K) a vector over K.
``beta`` is b: None (no delta term: ``S_t = Diag(g_t) S_{t-1} + k_t v_t^T``) or (B, T, H); b in
(0, 2) gives the transition ``I - b k k^T`` a negative eigenvalue for unit-norm k.

Layout: q, k (B, T, H, K); v (B, T, H, V); state (B, H, K, V). All forms accumulate in float32
(float64 stays float64) and return o in q's dtype and the final state in the accumulation dtype.

Sequence boundaries: every form but the step takes ``cu_seqlens`` (int64 (N + 1,) cumulative
lengths of N sequences packed in one row, B = 1; :mod:`rnnlab.ops.bounds`): initial_state is then
(N, H, K, V) or None and the final state (N, H, K, V); nothing crosses a boundary, not even a NaN.

Forms: :func:`gated_delta_rule_recurrent` (the definition), :func:`gated_delta_rule_chunked`
(chunkwise parallel, UT transform), :func:`gated_delta_rule_step` (one token) and the dispatch
:func:`gated_delta_rule` that layers call. :func:`gated_delta_rule_normalised` is the recurrence
with state normalisation (a bound on the state's norm, an inference-time mitigation of state
collapse): a loop over time, as the rescaling depends on the state. In :mod:`rnnlab.ops.registry` this op is three families,
one per fast kernel of other libraries: "delta" (with the delta term), "gla" (vector decay),
"ssd" (scalar decay or none: Mamba-2, RetNet, linear attention).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from einops import rearrange

from . import tuning
from .backends import compiled
from .bounds import (ChunkLayout, causal_product, check_cu_seqlens, chunk_middle, decay_factors_fit, known_finite,
                     state_rows, token_carry)
from .registry import implementation, select

__all__ = ["gated_delta_rule", "gated_delta_rule_recurrent", "gated_delta_rule_chunked",
           "gated_delta_rule_chunked_compiled", "gated_delta_rule_step", "gated_delta_rule_normalised",
           "check_delta_args"]


def check_delta_args(q, k, v, log_g, beta, initial_state, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the argument whose shape does not fit q (B, T, H, K); with
    ``cu_seqlens`` (see :mod:`rnnlab.ops.bounds`) B must be 1 and initial_state has N rows.
    Returns ``cu_seqlens`` as a list of ints (None without)."""
    if q.dim() != 4 or k.shape != q.shape:
        raise ValueError(f"q and k must both be (B, T, H, K); got q {tuple(q.shape)}, k {tuple(k.shape)}")
    B, T, H, K = q.shape
    if log_g is not None and log_g.shape not in ((B, T, H), (B, T, H, K)):
        raise ValueError(f"log_g must be None, (B, T, H) or (B, T, H, K) = ({B}, {T}, {H}, {K}); got {tuple(log_g.shape)}")
    if beta is not None and beta.shape != (B, T, H):
        raise ValueError(f"beta must be None or (B, T, H) = ({B}, {T}, {H}), got {tuple(beta.shape)}")
    return check_values_and_state(q, v, initial_state, cu_seqlens)


def check_values_and_state(q, v, initial_state, cu_seqlens=None) -> list[int] | None:
    """The checks every (H, K, V) matrix-state op shares, for q (B, T, H, K): v is (B, T, H, V),
    initial_state (B | N, H, K, V) or None. Returns ``cu_seqlens`` as a list (None without)."""
    B, T, H, K = q.shape
    if v.dim() != 4 or v.shape[:3] != (B, T, H):
        raise ValueError(f"v must be (B, T, H, V) = ({B}, {T}, {H}, V), got {tuple(v.shape)}")
    cu = check_cu_seqlens(cu_seqlens, B, T)
    R = state_rows(B, cu)
    if initial_state is not None and initial_state.shape != (R, H, K, v.shape[-1]):
        rows = "B" if cu is None else "N"
        raise ValueError(f"initial_state must be ({rows}, H, K, V) = ({R}, {H}, {K}, {v.shape[-1]}), "
                         f"got {tuple(initial_state.shape)}")
    return cu


def _acc(q: torch.Tensor) -> torch.dtype:
    return torch.promote_types(q.dtype, torch.float32)


def gated_delta_rule_recurrent(q, k, v, log_g=None, beta=None, scale=None, initial_state=None, cu_seqlens=None):
    """The definition: a loop over time. Returns (o (B, T, H, V), final_state (B, H, K, V)).

    With ``cu_seqlens`` (int64 (N + 1,), B = 1; :mod:`rnnlab.ops.bounds`) the state is reset to
    sequence n's initial state (row n of ``initial_state`` (N, H, K, V), or zeros) at its first
    token, and the final state is (N, H, K, V): row n after sequence n's last token."""
    cu = check_delta_args(q, k, v, log_g, beta, initial_state, cu_seqlens)
    return _loop(q, k, v, log_g, beta, scale, initial_state, cu, None)


def _loop(q, k, v, log_g, beta, scale, initial_state, cu, max_norm):
    """The loop over time of the definition on checked arguments; ``max_norm`` (None: none) bounds
    the Frobenius norm of each sequence's state, all heads together, after every update."""
    B, T, H, K = q.shape
    acc = _acc(q)
    scale = K ** -0.5 if scale is None else scale
    carry = token_carry(cu, None if initial_state is None else initial_state.to(acc),
                        lambda rows: q.new_zeros(rows, H, K, v.shape[-1], dtype=acc), B, T)
    S, outs = None, []
    for t in range(T):
        S = carry.enter(t, S)
        S = _update(k[:, t].to(acc), v[:, t].to(acc), None if log_g is None else log_g[:, t].to(acc),
                    None if beta is None else beta[:, t].to(acc), S)
        if max_norm is not None:
            norm = torch.linalg.vector_norm(S, dim=(1, 2, 3))  # (B,)
            S = S * (max_norm / norm.clamp_min(max_norm))[:, None, None, None]
        carry.leave(t, S)
        outs.append(scale * torch.einsum("bhk,bhkv->bhv", q[:, t].to(acc), S))  # 3. read
    o = torch.stack(outs, dim=1) if outs else q.new_zeros(B, 0, H, v.shape[-1], dtype=acc)
    return o.to(q.dtype), carry.final()  # (B, T, H, V), (B|N, H, K, V)


def _update(k, v, log_g, beta, S):
    """One token's decay and write: k (B, H, K), v (B, H, V), log_g (B, H) | (B, H, K), beta (B, H),
    S (B, H, K, V) -> the new S."""
    if log_g is not None:  # 1. decay
        S = S * (log_g.exp()[..., None, None] if log_g.dim() == 2 else log_g.exp()[..., None])
    if beta is None:  # 2. write
        return S + k[..., :, None] * v[..., None, :]
    err = v - torch.einsum("bhk,bhkv->bhv", k, S)  # delta rule: replace the value stored under k by v, (B, H, V)
    return S + beta[..., None, None] * k[..., :, None] * err[..., None, :]


def _step(q, k, v, log_g, beta, scale, S):
    """One token: q, k (B, H, K), v (B, H, V), log_g (B, H) | (B, H, K), beta (B, H), S (B, H, K, V)."""
    S = _update(k, v, log_g, beta, S)
    return S, scale * torch.einsum("bhk,bhkv->bhv", q, S)  # 3. read


def gated_delta_rule_normalised(q, k, v, log_g=None, beta=None, scale=None, max_norm=1.0, initial_state=None,
                                cu_seqlens=None):
    """The gated delta rule with state normalisation (Chen et al. 2024, "Stuffed Mamba"): after
    each token's update the state of each sequence, all heads together, is scaled back to the
    Frobenius norm ``max_norm`` when the update took it past, and the output reads that state::

        S'_t = update(S_{t-1}),   S_t = S'_t · min(1, max_norm / ||S'_t||_F),   o_t = scale · S_t^T q_t

    Below the bound it is :func:`gated_delta_rule_recurrent`. A loop over time (the scaling depends
    on the state, so there is no chunked form); it obeys the chunking law. Arguments as there, with
    ``max_norm`` a float > 0. Returns (o (B, T, H, V), final_state (B|N, H, K, V))."""
    cu = check_delta_args(q, k, v, log_g, beta, initial_state, cu_seqlens)
    if isinstance(max_norm, bool) or not isinstance(max_norm, (int, float)) or not 0 < max_norm < float("inf"):
        raise ValueError(f"max_norm must be a finite number > 0, got {max_norm!r}")
    return _loop(q, k, v, log_g, beta, scale, initial_state, cu, float(max_norm))


def gated_delta_rule_step(q, k, v, log_g=None, beta=None, scale=None, state=None):
    """One token for decoding: q, k (B, H, K), v (B, H, V), log_g (B, H) | (B, H, K), beta (B, H),
    state (B, H, K, V) or None. Returns (o (B, H, V), new_state)."""
    acc = _acc(q)
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    S = q.new_zeros(*q.shape, v.shape[-1], dtype=acc) if state is None else state.to(acc)
    S, o = _step(q.to(acc), k.to(acc), v.to(acc), None if log_g is None else log_g.to(acc),
                 None if beta is None else beta.to(acc), scale, S)
    return o.to(q.dtype), S


def _vector_scores(qc, kc, cum, sub: int):
    """``A_xk[t, s] = sum_i x_t,i k_s,i exp(c_t,i - c_s,i)`` for s <= t (0 above), x = q and x = k,
    with a decay vector over K. Chunks are cut into sub-chunks of ``sub``: inside a sub-chunk the
    masked (sub, sub, K) decay tensor is formed; between sub-chunks I > J the decay factors through
    the cumulative decay r_J at J's last token, ``exp(c_t - r_J) exp(r_J - c_s)``, both exponents
    <= 0, so those blocks are plain matmuls. Memory per chunk: O(C·sub·K + C²·K/sub), not O(C²·K)."""
    B, H, N, C, K = qc.shape
    c = sub if C % sub == 0 else C
    m = C // c
    split = lambda x: x.reshape(B, H, N, m, c, K)  # noqa: E731
    qs, ks, cs = split(qc), split(kc), split(cum)
    tri = torch.ones(c, c, dtype=torch.bool, device=qc.device).tril()
    # 1. diagonal blocks: the masked decay tensor of one sub-chunk
    decay = torch.exp((cs[..., :, None, :] - cs[..., None, :, :]).masked_fill(~tri[..., None], float("-inf")))
    # 2. blocks I > J: x_t exp(c_t - r_J) against k_s exp(r_J - c_s)
    ref = cs[..., -1, :]  # (B, H, N, m, K): r_J
    below = torch.ones(m, m, dtype=torch.bool, device=qc.device).tril(-1)  # J < I
    to_ref = (cs[..., :, None, :, :] - ref[..., None, :, None, :])  # (B, H, N, I, J, c, K)
    to_ref = torch.exp(to_ref.masked_fill(~below[:, :, None, None], float("-inf")))
    k_from_ref = ks * torch.exp(ref[..., None, :] - cs)  # (B, H, N, J, c, K)
    eye = torch.eye(m, dtype=torch.bool, device=qc.device)[:, :, None, None]
    out = []
    for xs in (qs, ks):
        diag = torch.einsum("bhnitk,bhnisk,bhnitsk->bhnits", xs, ks, decay)  # (B, H, N, m, c, c)
        diag = torch.where(tri, diag, 0.0)  # by selection: 0 * NaN of a later token stays out
        off = torch.einsum("bhnijtk,bhnjsk->bhnijts", xs[..., :, None, :, :] * to_ref, k_from_ref)
        off = torch.where(below[:, :, None, None], off, 0.0)
        blocks = torch.where(eye, diag[..., :, None, :, :], off)  # (B, H, N, I, J, c, c); 0 for J > I
        out.append(rearrange(blocks, "b h n i j t s -> b h n (i t) (j s)"))
    return out[0], out[1]


def gated_delta_rule_chunked(q, k, v, log_g=None, beta=None, scale=None, initial_state=None, chunk_size=None,
                             cu_seqlens=None):
    """Chunkwise-parallel form (same arguments and results as the reference).

    Within a chunk of C tokens, with cumulative log-decays ``c_t`` from the chunk start and the
    state ``S_0`` before it, the state in decay-normalised coordinates grows by rank-one terms
    ``k_s^- u_s^T`` where the pseudo-values U solve the unit lower-triangular system
    ``(I + diag(b) A_kk) U = diag(b) (V - K^+ S_0)`` (the UT transform; ``U = V`` without the delta
    term). It is linear in ``S_0``, so ``U = U_v - W S_0`` is precomputed for all chunks in parallel
    and only the state's two small products per chunk remain sequential (on finite CPU inputs the
    outputs and the backward's other products are batched over all chunks). Every decay factor is an
    ``exp`` of a non-positive difference of cumulative log-decays, masked before ``exp``, except on
    finite CPU inputs whose decays fit (:func:`rnnlab.ops.bounds.decay_factors_fit`): there the
    scores are two matmuls of inputs scaled by ``e^(±(c - r))``, r the chunk middle's decay.
    ``chunk_size`` None: the tuning table's ``delta.chunk_size`` (``gla.chunk_size`` for a vector
    decay, cut into sub-chunks of ``gla.sub_chunk``).

    With ``cu_seqlens`` every sequence is padded to whole chunks (:class:`rnnlab.ops.bounds.ChunkLayout`,
    zero padding is neutral: g = 1, no write) and the state is replaced by the sequence's initial
    state at its first chunk. Masks are selections (``torch.where``), not products, so a
    non-finite input never reaches an earlier position or another sequence.
    """
    return _chunked(q, k, v, log_g, beta, scale, initial_state, chunk_size, _intra, cu_seqlens)


def gated_delta_rule_chunked_compiled(q, k, v, log_g=None, beta=None, scale=None, initial_state=None,
                                      chunk_size=None, cu_seqlens=None):
    """:func:`gated_delta_rule_chunked` with its loop-free intra-chunk part (decays, scores, UT
    solve: everything but the pass across chunks) compiled by ``torch.compile`` (the "compile"
    backend). Same arguments and results."""
    return _chunked(q, k, v, log_g, beta, scale, initial_state, chunk_size, compiled(_intra_strided), cu_seqlens)


def _in_chunks(x: torch.Tensor | None, C: int, contiguous: bool = True) -> torch.Tensor | None:
    """(B, T, H, ...) -> (B, H, N, C, ...), zero-padded to whole chunks (there g = 1 and nothing is
    written); ``contiguous`` copies the strided view once, as every later product would copy it
    again (and so would its gradient)."""
    if x is None:
        return None
    pad = -x.shape[1] % C
    if pad:
        x = F.pad(x, [0, 0] * (x.dim() - 3) + [0, 0, 0, pad])
    x = rearrange(x, "b (n c) h ... -> b h n c ...", c=C)
    return x.contiguous() if contiguous else x


def _intra(q, k, v, log_g, beta, chunk_size: int, sub_chunk: int, finite: bool):
    """:func:`_intra_chunk` on the (B, T, H, ...) inputs, cut into contiguous chunks."""
    return _intra_chunk(*(_in_chunks(x, chunk_size) for x in (q, k, v, log_g, beta)), sub_chunk, finite)


def _intra_strided(q, k, v, log_g, beta, chunk_size: int, sub_chunk: int, finite: bool):
    """:func:`_intra` on strided chunks, for ``torch.compile``: given contiguous ones, the code
    inductor (torch 2.13, CPU) made from ``q * e^c`` and ``k * e^(c_end - c)`` returned a wrong
    gradient for the cumulative decays c (the registry's op test catches it)."""
    return _intra_chunk(*(_in_chunks(x, chunk_size, False) for x in (q, k, v, log_g, beta)), sub_chunk, finite)


def _scalar_scores(qc, kc, cum, tri_incl, with_kk: bool):
    """A scalar decay's scores from the masked (C, C) decay matrix: A_qk (B, H, N, C, C) on and below
    the diagonal, and A_kk (zero above it; None without ``with_kk``: only the delta term needs it)."""
    diff = cum[..., :, None, 0] - cum[..., None, :, 0]  # (B, H, N, C, C)
    decay = torch.exp(diff.masked_fill(~tri_incl, float("-inf")))
    A_qk = torch.where(tri_incl, (qc @ kc.transpose(-1, -2)) * decay, 0.0)
    return A_qk, (kc @ kc.transpose(-1, -2)) * decay if with_kk else None


def _intra_chunk(qc, kc, vc, log_g, beta, sub_chunk: int, finite: bool = False):
    """Everything the chunks can do in parallel (no loop over chunks, so it compiles well). On
    finite inputs whose decays factor, steps 2-3 are :class:`_FactoredIntra`.

    qc, kc (B, H, N, C, K), vc (B, H, N, C, V), log_g None | (B, H, N, C) | (B, H, N, C, K), beta
    None | (B, H, N, C): the inputs in chunks (:func:`_in_chunks`), in the accumulation dtype.
    Returns, per chunk n of C tokens (B, H, N, ...): U_v (C, V) and W (C, K) or None with
    U = U_v - W S_0; q_plus (C, K) the queries decayed from the chunk start; A_qk (C, C) the masked
    decayed scores; g_end (K|1) the decay over the whole chunk; k_end (K, C) the keys decayed to
    the chunk end. ``finite``: the inputs are known to be finite
    (:func:`rnnlab.ops.bounds.known_finite`), so the UT transform may use the inverse of its
    triangular matrix, whose products would let a later non-finite token reach earlier rows.
    """
    C = qc.shape[3]
    vector = log_g is not None and log_g.dim() == 5
    # 1. cumulative log-decays within each chunk
    if log_g is None:
        cum = qc.new_zeros(*qc.shape[:4], 1)
    else:
        cum = (log_g if vector else log_g[..., None]).cumsum(dim=3)  # (B, H, N, C, K|1)
    # 2. decayed inner products A[t, s] = sum_i x_t,i k_s,i exp(c_t,i - c_s,i)
    # (every form masks by selection, not by multiplication: a non-finite later token must not give 0 * NaN)
    rel = cum - chunk_middle(cum) if finite else None  # counted from the chunk's middle
    if rel is not None and decay_factors_fit(rel):  # (x_t e^rel_t) . (k_s e^-rel_s): two matmuls, no (C, C) decays
        U_v, W, q_plus, A_qk, g_end, k_end = _FactoredIntra.apply(qc, kc, vc, cum, beta)
        return vc if beta is None else U_v, W, q_plus, A_qk, g_end, k_end
    tri_incl, tri_strict = _masks(C, qc.device)  # s <= t, s < t
    if vector:
        A_qk, A_kk = _vector_scores(qc, kc, cum, sub_chunk)  # masked within
    else:
        A_qk, A_kk = _scalar_scores(qc, kc, cum, tri_incl, beta is not None)
    q_plus = qc * cum.exp()  # (B, H, N, C, K): q_t decayed from the chunk start
    k_plus = kc * cum.exp()
    k_end = (kc * (cum[..., -1:, :] - cum).exp()).transpose(-1, -2)  # (B, H, N, K, C): k_s decayed to the end
    g_end = cum[..., -1, :].exp()  # (B, H, N, K|1): decay over the whole chunk
    # 3. UT transform: U = U_v - W S_0
    if beta is None:
        return vc, None, q_plus, A_qk, g_end, k_end
    b = beta[..., None]  # (B, H, N, C, 1)
    eye = torch.eye(C, dtype=qc.dtype, device=qc.device)
    L = eye + torch.where(tri_strict, b * A_kk, 0.0)  # (B, H, N, C, C)
    if finite:  # U_v, W = L^-1 diag(b) (V, K^+) as two matmuls with the inverse
        Tb = torch.linalg.solve_triangular(L, eye, upper=False, unitriangular=True) * b.transpose(-1, -2)
        return Tb @ vc, Tb @ k_plus, q_plus, A_qk, g_end, k_end  # (B, H, N, C, V), (B, H, N, C, K)
    UW = torch.linalg.solve_triangular(L, b * torch.cat([vc, k_plus], dim=-1), upper=False,
                                       unitriangular=True)  # (B, H, N, C, V+K): one solve for both
    V = vc.shape[-1]
    return UW[..., :V], UW[..., V:], q_plus, A_qk, g_end, k_end


def _masks(C: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """(C, C) masks of s <= t and s < t."""
    tri_incl = torch.ones(C, C, dtype=torch.bool, device=device).tril()
    return tri_incl, tri_incl.tril(-1)


class _FactoredIntra(torch.autograd.Function):
    """Steps 2-3 of :func:`_intra_chunk` on finite inputs whose decays factor, with the backward
    written out: it keeps q, k, v, the cumulative decays, b, the UT inverse T and A_kk, and forms
    again the cheap (C, K) products, where autograd would keep every intermediate and run the
    backward of each elementwise step on its own. ``cum`` (B, H, N, C, K|1) from step 1. Returns
    :func:`_intra_chunk`'s results, but None for U_v without a delta term (it is V).

    With r the cumulative decay at the chunk's middle and ``E^+ = e^(c - r)``, ``E^- = e^(r - c)``:
    ``A_qk = M<= (q E^+)(k E^-)^T``, ``A_kk = M< (k E^+)(k E^-)^T``, ``L = I + diag(b) A_kk``,
    ``T = L^-1``, ``U_v = T diag(b) V``, ``W = T diag(b) (k e^c)``, ``q_plus = q e^c``,
    ``k_end = (k e^(c_end - c))^T``, ``g_end = e^c_end``."""

    @staticmethod
    def forward(ctx, qc, kc, vc, cum, beta):
        tri_incl, tri_strict = _masks(qc.shape[-2], qc.device)
        rel = cum - chunk_middle(cum)
        e_pos, k_neg = rel.exp(), (kc * torch.exp(-rel)).transpose(-1, -2)  # (.., C, K|1), (.., K, C)
        # masked at once: above the diagonal the products may overflow
        A_qk = torch.where(tri_incl, (qc * e_pos) @ k_neg, 0.0)  # (B, H, N, C, C)
        e_cum = cum.exp()
        q_plus = qc * e_cum  # (B, H, N, C, K)
        k_end = (kc * (cum[..., -1:, :] - cum).exp()).transpose(-1, -2)  # (B, H, N, K, C)
        g_end = e_cum[..., -1, :]  # (B, H, N, K|1)
        ctx.has_beta = beta is not None
        if beta is None:
            ctx.save_for_backward(qc, kc, cum)
            return None, None, q_plus, A_qk, g_end, k_end  # U_v = V itself
        A_kk = torch.where(tri_strict, (kc * e_pos) @ k_neg, 0.0)  # (B, H, N, C, C)
        b = beta[..., None]  # (B, H, N, C, 1)
        eye = torch.eye(qc.shape[-2], dtype=qc.dtype, device=qc.device)
        T = torch.linalg.solve_triangular(eye + b * A_kk, eye, upper=False, unitriangular=True)
        Tb = T * b.transpose(-1, -2)  # T diag(b)
        ctx.save_for_backward(qc, kc, vc, cum, beta, T, A_kk)
        return Tb @ vc, Tb @ (kc * e_cum), q_plus, A_qk, g_end, k_end

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_Uv, d_W, d_q_plus, d_A_qk, d_g_end, d_k_end):
        if ctx.has_beta:
            qc, kc, vc, cum, beta, T, A_kk = ctx.saved_tensors
        else:
            qc, kc, cum = ctx.saved_tensors
        tri_incl, tri_strict = _masks(qc.shape[-2], qc.device)
        red = (lambda x: x) if cum.shape[-1] > 1 else (lambda x: x.sum(-1, keepdim=True))  # onto cum's shape
        rel = cum - chunk_middle(cum)
        e_pos, e_neg, e_cum = rel.exp(), torch.exp(-rel), cum.exp()
        e_end = (cum[..., -1:, :] - cum).exp()
        k_neg = kc * e_neg  # (B, H, N, C, K)
        # A_qk = M<= (q E+)(k E-)^T
        d_P = d_A_qk.masked_fill(~tri_incl, 0.0)
        d_qa = d_P @ k_neg  # gradient of q E+
        d_kneg = d_P.transpose(-1, -2) @ (qc * e_pos)  # gradient of k E-
        d_kend = d_k_end.transpose(-1, -2)  # gradient of k e^(c_end - c), (.., C, K)
        d_q = d_qa * e_pos + d_q_plus * e_cum
        d_k = d_kend * e_end
        d_epos, d_ecum, d_eend = red(d_qa * qc), red(d_q_plus * qc), red(d_kend * kc)
        d_v = d_beta = None
        if ctx.has_beta:
            b = beta[..., None]  # (B, H, N, C, 1)
            Tb = T * b.transpose(-1, -2)
            k_plus = kc * e_cum
            d_Tb = d_Uv @ vc.transpose(-1, -2) + d_W @ k_plus.transpose(-1, -2)  # (B, H, N, C, C)
            d_v = Tb.transpose(-1, -2) @ d_Uv
            d_kplus = Tb.transpose(-1, -2) @ d_W
            d_beta = (d_Tb * T).sum(-2)  # from T diag(b): (B, H, N, C)
            d_T = d_Tb * b.transpose(-1, -2)
            d_L = -(T.transpose(-1, -2) @ d_T @ T.transpose(-1, -2))  # T = L^-1
            d_beta = d_beta + (d_L * A_kk).sum(-1)  # L = I + diag(b) A_kk
            d_P = (d_L * b).masked_fill(~tri_strict, 0.0)  # A_kk = M< (k E+)(k E-)^T
            d_ka = d_P @ k_neg
            d_kneg = d_kneg + d_P.transpose(-1, -2) @ (kc * e_pos)
            d_k = d_k + d_ka * e_pos + d_kplus * e_cum
            d_epos = d_epos + red(d_ka * kc)
            d_ecum = d_ecum + red(d_kplus * kc)
        d_k = d_k + d_kneg * e_neg
        d_rel = d_epos * e_pos - red(d_kneg * kc) * e_neg  # e^rel, e^-rel
        d_eend = d_eend * e_end
        d_cum = d_rel + d_ecum * e_cum - d_eend
        mid = cum.shape[-2] // 2
        d_cum[..., mid, :] -= d_rel.sum(-2)  # r = c at the middle
        d_cum[..., -1, :] += d_eend.sum(-2) + d_g_end * e_cum[..., -1, :]  # c_end: in e^(c_end - c) and g_end
        return d_q, d_k, d_v, d_cum, d_beta


def _chunk_size(q, vector: bool) -> int:
    """The tuning table's chunk size for these inputs: ``gla.chunk_size`` for a vector decay; else
    ``delta.chunk_size``, but no longer than the key size K (at least ``delta.chunk_min``): with
    small heads the (C, C) work per token would outweigh the (K, V) work."""
    if vector:
        return tuning.get("gla.chunk_size", q.device)
    return min(tuning.get("delta.chunk_size", q.device), max(tuning.get("delta.chunk_min", q.device), q.shape[-1]))


def _chunked(q, k, v, log_g, beta, scale, initial_state, chunk_size, intra, cu_seqlens):
    cu = check_delta_args(q, k, v, log_g, beta, initial_state, cu_seqlens)
    block = tuning.get("delta.block_tokens", q.device)
    if cu is None and block is not None and q.shape[1] > block:  # long rows: blocks one after another
        return _in_blocks(q, k, v, log_g, beta, scale, initial_state, chunk_size, intra, block)
    B, T, H, K = q.shape
    V, acc = v.shape[-1], _acc(q)
    scale = K ** -0.5 if scale is None else scale
    vector = log_g is not None and log_g.dim() == 4
    if chunk_size is None:
        chunk_size = _chunk_size(q, vector)
    layout = None if cu is None else ChunkLayout(cu, chunk_size, q.device)
    cast = lambda x: None if x is None else (x.to(acc) if layout is None else layout.pad(x.to(acc)))  # noqa: E731
    finite = known_finite(q, k, v, log_g, beta, initial_state)  # then no guards against 0 * NaN
    U_v, W, q_plus, A_qk, g_end, k_end = intra(cast(q), cast(k), cast(v), cast(log_g), cast(beta), chunk_size,
                                               tuning.get("gla.sub_chunk", q.device), finite)
    # 4. pass the state across chunks
    N = U_v.shape[2]
    zeros = lambda rows: q.new_zeros(rows, H, K, V, dtype=acc)  # noqa: E731
    init = None if initial_state is None else initial_state.to(acc)
    carry = layout.carry(init, zeros) if layout is not None else token_carry(None, init, zeros, B, N)
    if N == 0:
        return q.new_zeros(B, 0, H, V), carry.final()
    if finite:
        o, S = _ChunkStates.apply(U_v, W, q_plus, A_qk, g_end, k_end, init, carry)  # (B, H, N, C, V)
    else:
        o, S = _chunk_loop(U_v, W, q_plus, A_qk, g_end, k_end, carry)
    o = rearrange(o, "b h n c v -> b (n c) h v")  # (B, N*C, H, V)
    o = o if scale == 1 else scale * o  # (Mamba-2 reads with scale 1: no pass over o for it)
    o = o[:, :T] if layout is None else layout.unpad(o)
    return o.to(q.dtype), S


def _chunk_loop(U_v, W, q_plus, A_qk, g_end, k_end, carry):
    """Step 4 by autograd, guarded: per chunk n (all (B, H, N, ...) as :func:`_intra_chunk` gives
    them), ``U = U_v - W S``, ``o = q_plus S + A_qk U`` and ``S <- g_end S + k_end U``, with the
    product ``A_qk U`` keeping a non-finite U out of earlier rows. Returns (o (B, H, N, C, V), final
    state)."""
    S, outs = None, []
    N = U_v.shape[2]
    per_chunk = zip(U_v.unbind(2), (W.unbind(2) if W is not None else [None] * N), q_plus.unbind(2),
                    A_qk.unbind(2), g_end.unbind(2), k_end.unbind(2))  # unbind: cheap backward
    for i, (U, W_n, qp, A, g, ke) in enumerate(per_chunk):
        S = carry.enter(i, S)  # a sequence's first chunk: its initial state
        if W_n is not None:
            U = U - W_n @ S  # (B, H, C, V)
        outs.append(qp @ S + causal_product(A, U))  # (B, H, C, V)
        S = g[..., None] * S + ke @ U  # (B, H, K, V)
        carry.leave(i, S)
    return torch.stack(outs, dim=2), carry.final()


class _ChunkStates(torch.autograd.Function):
    """Step 4 on finite inputs, its backward written out: the loop over chunks only carries the
    state (two products per chunk, written into preallocated tensors), and every product that does
    not depend on the chunk before is one batched matmul over all chunks, forward and backward.
    The same recurrence as :func:`_chunk_loop` (``carry`` gives the sequences' starts and ends);
    ``init`` is the initial state the carry was built with (None: zeros), passed again so that it
    gets a gradient."""

    @staticmethod
    def forward(ctx, U_v, W, q_plus, A_qk, g_end, k_end, init, carry):
        B, H, N, _, V = U_v.shape
        S_in = U_v.new_empty(B, H, N, k_end.shape[-2], V)  # the state entering each chunk
        U = U_v if W is None else torch.empty_like(U_v)  # (B, H, N, C, V)
        S = None
        for i in range(N):
            if i in carry.segments.starts:
                S = S_in[:, :, i].copy_(carry.enter(i, S))
            if W is not None:
                torch.sub(U_v[:, :, i], W[:, :, i] @ S, out=U[:, :, i])  # (B, H, C, V)
            into = S_in[:, :, i + 1] if i + 1 < N and i + 1 not in carry.segments.starts else None
            S = torch.addcmul(k_end[:, :, i] @ U[:, :, i], g_end[:, :, i, :, None], S, out=into)  # (B, H, K, V)
            carry.leave(i, S)
        ctx.save_for_backward(W, q_plus, A_qk, g_end, k_end, S_in, U)
        ctx.segments, ctx.init_shape = carry.segments, None if init is None else init.shape
        o = q_plus @ S_in  # (B, H, N, C, V)
        return o.add_(A_qk @ U), carry.final()

    @staticmethod
    @torch.autograd.function.once_differentiable
    def backward(ctx, d_o, d_final):
        W, q_plus, A_qk, g_end, k_end, S_in, U = ctx.saved_tensors
        seg, N = ctx.segments, U.shape[2]
        d_o = d_o.contiguous()  # the strided gradient of the output's rearrange; four products read it
        # each chunk's own output's share of the gradients, batched; the loop adds the carried state's
        d_U = A_qk.transpose(-1, -2) @ d_o  # (B, H, N, C, V)
        d_S_out = q_plus.transpose(-1, -2) @ d_o  # (B, H, N, K, V)
        d_leave = torch.zeros_like(S_in)  # gradient of the state leaving each chunk
        d_init = None if ctx.init_shape is None else d_o.new_zeros(ctx.init_shape)
        for i in reversed(range(N)):
            n = seg.ends.get(i)
            if n is not None and d_final is not None:  # a sequence's last chunk leaves its final state
                d_leave[:, :, i].copy_(seg.rows_of(d_final, n))
            d_Ui = d_U[:, :, i].add_(k_end[:, :, i].transpose(-1, -2) @ d_leave[:, :, i])  # (B, H, C, V)
            n = seg.starts.get(i)  # a sequence's first chunk enters its initial state
            into = d_leave[:, :, i - 1] if n is None else None
            d_enter = torch.addcmul(d_S_out[:, :, i], g_end[:, :, i, :, None], d_leave[:, :, i], out=into)
            if W is not None:
                d_enter.sub_(W[:, :, i].transpose(-1, -2) @ d_Ui)
            if n is not None and d_init is not None:
                seg.rows_of(d_init, n).add_(d_enter)
        if d_init is not None and d_final is not None:  # empty sequences keep their initial state
            for n in seg.empty():
                seg.rows_of(d_init, n).add_(seg.rows_of(d_final, n))
        d_g = (d_leave * S_in).sum(-1)  # (B, H, N, K)
        d_g = d_g if g_end.shape[-1] > 1 else d_g.sum(-1, keepdim=True)  # (B, H, N, K|1)
        d_W = None if W is None else -(d_U @ S_in.transpose(-1, -2))  # (B, H, N, C, K)
        return (d_U, d_W, d_o @ S_in.transpose(-1, -2), d_o @ U.transpose(-1, -2), d_g,
                (U @ d_leave.transpose(-1, -2)).transpose(-1, -2), d_init, None)


def _in_blocks(q, k, v, log_g, beta, scale, initial_state, chunk_size, intra, block):
    """:func:`_chunked` over consecutive blocks of ``block`` tokens, the state passed from one to
    the next (a multiple of the chunk size, so the chunks are those of one call). Inputs are split,
    not sliced: a slice's backward would fill a zero tensor of the whole input per block."""
    vector = log_g is not None and log_g.dim() == 4
    C = chunk_size or _chunk_size(q, vector)
    block = max(C, block // C * C)
    parts = [x.split(block, dim=1) if x is not None else [None] * -(-q.shape[1] // block)
             for x in (q, k, v, log_g, beta)]
    S, outs = initial_state, []
    for qb, kb, vb, gb, bb in zip(*parts):
        o, S = _chunked(qb, kb, vb, gb, bb, scale, S, C, intra, None)
        outs.append(o)
    return torch.cat(outs, dim=1), S


def one_token(q, k, v, log_g=None, beta=None, scale=None, initial_state=None):
    """The step form on a sequence of one token (q, k (B, 1, H, K), ...): what the dispatch runs
    when decoding. Returns (o (B, 1, H, V), final_state (B, H, K, V))."""
    sel = lambda x: None if x is None else x[:, 0]  # noqa: E731
    o, S = gated_delta_rule_step(q[:, 0], k[:, 0], v[:, 0], sel(log_g), sel(beta), scale, initial_state)
    return o[:, None], S


def _family(log_g, beta) -> str:
    """The registry family of a call: "delta" with a delta term, else "gla" for a vector decay and
    "ssd" for a scalar decay or none."""
    if beta is not None:
        return "delta"
    return "gla" if log_g is not None and log_g.dim() == 4 else "ssd"


def gated_delta_rule(q, k, v, log_g=None, beta=None, scale=None, initial_state=None, chunk_size=None,
                     cu_seqlens=None):
    """The gated delta rule; the form and backend come from :func:`rnnlab.ops.registry.select`
    (one token: the step; otherwise the chunked form). Layers call this. See module docstring.

    ``chunk_size`` None: the tuning table's. ``cu_seqlens`` None, or int64 (N + 1,) cumulative
    lengths of N sequences packed in one row (B = 1; :mod:`rnnlab.ops.bounds`): initial_state is
    then (N, H, K, V) or None and the final state (N, H, K, V). Returns (o (B, T, H, V) in q's
    dtype, final_state (B|N, H, K, V) in float32/float64).
    """
    check_delta_args(q, k, v, log_g, beta, initial_state, cu_seqlens)
    family = _family(log_g, beta)
    form, backend = select(family, q=q, k=k, v=v, log_g=log_g, beta=beta, initial_state=initial_state,
                           cu_seqlens=cu_seqlens)
    if form == "step":
        return one_token(q, k, v, log_g, beta, scale, initial_state)
    return implementation(family, form, backend)(q, k, v, log_g, beta, scale, initial_state, chunk_size,
                                                 cu_seqlens=cu_seqlens)
