"""Titans' neural memory (Behrouz et al. 2024): a memory whose weights are the state, learned at test
time by gradient descent with momentum and forgetting on the loss ||M(k) - v||².

Per head, with the memory M (a linear map W, or a 2-layer MLP W2 silu(W1 ·)), the momentum S (same
shapes), the decay g_t = 1 - α_t (forgetting), the momentum decay η_t and the step size θ_t:

    S_t = η_t S_{t-1} - θ_t ∇ℓ(M_{t'}; k_t, v_t),      M_t = g_t M_{t-1} + S_t,      o_t = M_t(q_t)

where t' is the start of t's mini-batch of ``chunk_size`` tokens: every gradient of a mini-batch
is taken at the weights its mini-batch started from (the paper's eq. 16), which is what lets a whole
mini-batch be computed with matmuls. With ``base`` weights given, forgetting pulls toward them
instead of toward zero: M_t = base + g_t (M_{t-1} - base) + S_t (for an MLP memory, zero is a
point where every gradient vanishes). That anchor is part of the state, together with the position
inside the mini-batch, so feeding a sequence in pieces gives exactly the result of one call.

Chunked form (one mini-batch segment of L tokens at a time): every gradient is a sum of outer
products u_s = a_s b_s^T (linear: (2e_s) k_s^T; MLP: δ_s k_s^T for W1 and (2e_s) h_s^T for W2),
and unrolling the two recurrences gives M_t = G_t M_0 + c_t S_0 + Σ_s W[t, s] u_s with an L×L
matrix W = R (E ∘ -θ) of decay products, so reading M_t(q_t) is masked attention-like matmuls and
the per-token weights are never formed.

Shapes: q, k (B, T, H, K); v (B, T, H, V); log_g, log_eta, theta (B, T, H). Memory weights are
(B, H, out, in): linear W (V, K); MLP W1 (F, K), W2 (V, F); the position in the mini-batch is per
row, (B,) int64. o is returned in q's dtype, the state in float32 or wider.

Packed rows (``cu_seqlens``, :mod:`rnnlab.ops.bounds`): N sequences in one row (B = 1), each from
its own row of ``initial_state`` (its weights, momentum, anchor and position) to its own row of
the final state; a sequence's mini-batches follow its own position, and the chunked form runs
segments that never cross a boundary (a :class:`~rnnlab.ops.bounds.Carry` across segments).
Rows of an unpacked batch at different positions run one row at a time.
"""
from __future__ import annotations

import functools
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .bounds import Carry, causal_product, check_cu_seqlens, state_rows, token_carry
from .registry import implementation, select

__all__ = ["MemoryState", "neural_memory", "neural_memory_chunked", "neural_memory_recurrent"]


class MemoryState(NamedTuple):
    memory: tuple[torch.Tensor, ...]  # the memory's weights: (W,) or (W1, W2), each (B, H, out, in)
    momentum: tuple[torch.Tensor, ...]  # S, the same shapes
    anchor: tuple[torch.Tensor, ...]  # the weights at the start of the current mini-batch (= memory when pos = 0)
    pos: torch.Tensor  # (B,) int64: tokens of each row's current mini-batch already seen, 0 <= pos < chunk_size


def _dsilu(h):
    s = torch.sigmoid(h)
    return s * (1 + h * (1 - s))


def _check_base(base, initial_state, H):
    if base is None:
        return
    shapes = [tuple(w.shape[-2:]) for w in initial_state.memory] if initial_state is not None else None
    if initial_state is None or len(base) != len(shapes) or any(
            b.shape[-2:] != sh or b.dim() not in (3, 4) or b.shape[-3] != H for b, sh in zip(base, shapes)):
        raise ValueError(f"base must hold one (H, out, in) or (B, H, out, in) tensor per memory weight, matching "
                         f"initial_state.memory {shapes}; got {[tuple(b.shape) for b in base]}")


def _check(q, k, v, log_g, log_eta, theta, initial_state, chunk_size, cu_seqlens=None) -> list[int] | None:
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    Bsz, T, H, K = q.shape
    if k.shape != q.shape:
        raise ValueError(f"k must have q's shape (B, T, H, K) = {tuple(q.shape)}, got {tuple(k.shape)}")
    if v.dim() != 4 or v.shape[:3] != (Bsz, T, H):
        raise ValueError(f"v must be (B, T, H, V) with (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(v.shape)}")
    for name, g in (("log_g", log_g), ("log_eta", log_eta), ("theta", theta)):
        if g.shape != (Bsz, T, H):
            raise ValueError(f"{name} must be (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(g.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    cu = check_cu_seqlens(cu_seqlens, Bsz, T)
    if initial_state is None:
        return cu
    if not isinstance(initial_state, MemoryState):
        raise ValueError(f"initial_state must be a MemoryState or None, got {type(initial_state).__name__}")
    rows, who = state_rows(Bsz, cu), "B" if cu is None else "N"
    mem = initial_state.memory
    if len(mem) not in (1, 2) or len(initial_state.momentum) != len(mem) or len(initial_state.anchor) != len(mem):
        raise ValueError("initial_state must hold 1 (linear) or 2 (MLP) weights in memory, momentum and anchor alike")
    ins = [K] + [w.shape[-2] for w in mem[:-1]]
    outs = [w.shape[-2] for w in mem[:-1]] + [v.shape[3]]
    for part in ("memory", "momentum", "anchor"):
        for i, w in enumerate(getattr(initial_state, part)):
            if w.shape != (rows, H, outs[i], ins[i]):
                raise ValueError(f"initial_state.{part}[{i}] must be ({who}, H, out, in) = "
                                 f"({rows}, {H}, {outs[i]}, {ins[i]}), got {tuple(w.shape)}")
    check_minibatch_pos(initial_state.pos, rows, who, chunk_size)
    return cu


def check_minibatch_pos(pos, rows: int, who: str, chunk_size: int) -> None:
    """initial_state.pos of an op updated per mini-batch: an int64 (rows,) tensor of each row's
    place in its mini-batch, in [0, chunk_size); ``who`` names the rows ("B" or "N")."""
    if not isinstance(pos, torch.Tensor) or pos.dtype != torch.int64 or pos.shape != (rows,):
        raise ValueError(f"initial_state.pos must be an int64 tensor of shape ({who},) = ({rows},), got "
                         f"{tuple(pos.shape) if isinstance(pos, torch.Tensor) else type(pos).__name__}")
    if rows and not (0 <= int(pos.min()) and int(pos.max()) < chunk_size):
        raise ValueError(f"initial_state.pos must lie in [0, chunk_size={chunk_size}), got {pos.tolist()}")


def _zero_state(rows, q, v, acc):
    """A linear memory at zero for ``rows`` rows, position 0 (q (B, T, H, K), v (B, T, H, V))."""
    W = q.new_zeros(rows, q.shape[2], v.shape[3], q.shape[3], dtype=acc)  # (rows, H, V, K)
    return MemoryState((W,), (W,), (W,), torch.zeros(rows, dtype=torch.long, device=q.device))


def _to(st, acc):
    return MemoryState(*(tuple(w.to(acc) for w in p) for p in st[:3]), st.pos)


def _settled(st):
    """The state with anchor = memory in the rows at position 0 (where a mini-batch starts)."""
    fresh = (st.pos == 0)[:, None, None, None]  # (B, 1, 1, 1)
    return st._replace(anchor=tuple(torch.where(fresh, M, A) for M, A in zip(st.memory, st.anchor)))


# -- the definition ---------------------------------------------------------------------------------
def _read(params, x):
    """M(x) for x (B, H, K)."""
    h = (params[0] @ x[..., None]).squeeze(-1)
    for W in params[1:]:
        h = (W @ F.silu(h)[..., None]).squeeze(-1)
    return h


def _loss_grad(params, k, v):
    """∇_M ||M(k) - v||², one tensor per weight, for k (B, H, K), v (B, H, V)."""
    if len(params) == 1:
        e = 2 * (_read(params, k) - v)  # (B, H, V)
        return (e[..., :, None] * k[..., None, :],)
    W1, W2 = params
    h = (W1 @ k[..., None]).squeeze(-1)  # (B, H, F)
    a = F.silu(h)
    e = 2 * ((W2 @ a[..., None]).squeeze(-1) - v)  # (B, H, V)
    delta = (W2.transpose(-1, -2) @ e[..., None]).squeeze(-1) * _dsilu(h)  # (B, H, F)
    return delta[..., :, None] * k[..., None, :], e[..., :, None] * a[..., None, :]


def neural_memory_recurrent(q, k, v, log_g, log_eta, theta, initial_state=None, chunk_size=16, base=None,
                            cu_seqlens=None):
    """The definition: a loop over tokens. Returns (o (B, T, H, V), MemoryState of B rows, or N with
    ``cu_seqlens``)."""
    cu = _check(q, k, v, log_g, log_eta, theta, initial_state, chunk_size, cu_seqlens)
    _check_base(base, initial_state, q.shape[2])
    acc, dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    q, k, v, log_g, log_eta, theta = (t.to(acc) for t in (q, k, v, log_g, log_eta, theta))
    B, T = q.shape[:2]
    init = None if initial_state is None else _to(initial_state, acc)
    carry = token_carry(cu, init, lambda rows: _zero_state(rows, q, v, acc), B, T)
    base = None if base is None else tuple(b.to(acc) for b in base)
    os, st = [], None
    for t in range(T):
        st = _settled(carry.enter(t, st))  # a mini-batch starting at t: its gradients at these weights
        memory, momentum, anchor, pos = st
        u = _loss_grad(anchor, k[:, t], v[:, t])
        eta, g = log_eta[:, t, :, None, None].exp(), log_g[:, t, :, None, None].exp()
        th = theta[:, t, :, None, None]
        momentum = tuple(eta * S - th * du for S, du in zip(momentum, u))
        memory = tuple(g * M + S if b is None else b + g * (M - b) + S
                       for M, S, b in zip(memory, momentum, base or (None,) * len(memory)))
        os.append(_read(memory, q[:, t]))
        st = _settled(MemoryState(memory, momentum, anchor, (pos + 1) % chunk_size))
        carry.leave(t, st)
    return torch.stack(os, dim=1).to(dtype), carry.final()


# -- the chunked form -------------------------------------------------------------------------------
def _factors(anchor, k, v):
    """Each weight's gradient at every token as outer products a_s b_s^T: [(a (B,H,L,out), b (B,H,L,in))]."""
    if len(anchor) == 1:
        e = 2 * (k @ anchor[0].transpose(-1, -2) - v)  # (B, H, L, V)
        return [(e, k)]
    W1, W2 = anchor
    h = k @ W1.transpose(-1, -2)  # (B, H, L, F)
    a = F.silu(h)
    e = 2 * (a @ W2.transpose(-1, -2) - v)  # (B, H, L, V)
    delta = (e @ W2) * _dsilu(h)  # (B, H, L, F)
    return [(delta, k), (e, a)]


def _segment(q, k, v, log_g, log_eta, theta, memory, momentum, anchor, base):
    """L tokens of one mini-batch: (B, H, L, ·) inputs -> o (B, H, L, V), memory, momentum."""
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    lg, le = log_g.cumsum(-1), log_eta.cumsum(-1)  # (B, H, L)
    R = (lg[..., :, None] - lg[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # (B, H, L, L): Π g over (r, t]
    E = (le[..., :, None] - le[..., None, :]).masked_fill(~causal, float("-inf")).exp()  # Π η over (s, r]
    # products of triangular matrices by causal_product: a non-finite value at token s stays out of t < s
    Em = (E * -theta[..., None, :]).masked_fill(~causal, 0.0)  # S_r = e^{le_r} S_0 + Σ_s Em[r, s] u_s
    Wm = causal_product(R, Em)  # (B, H, L, L): M_t = e^{lg_t} M_0 + c_t S_0 + Σ_s Wm[t, s] u_s
    c = causal_product(R, le.exp()[..., None]).squeeze(-1)  # (B, H, L)
    G = lg.exp()
    x = q
    new_memory, new_momentum = [], []
    for i, (a, b) in enumerate(_factors(anchor, k, v)):
        M0, S0, W0 = memory[i], momentum[i], None if base is None else base[i]
        M0 = M0 if W0 is None else M0 - W0  # what decays: the distance from base
        # 1. read layer i at every t with M_t, never forming M_t
        y = (G[..., None] * (x @ M0.transpose(-1, -2)) + c[..., None] * (x @ S0.transpose(-1, -2))
             + causal_product((Wm * (x @ b.transpose(-1, -2))).masked_fill(~causal, 0.0), a))  # (B, H, L, out)
        if W0 is not None:
            y = y + x @ W0.transpose(-1, -2)
        x = F.silu(y) if i + 1 < len(memory) else y
        # 2. weights and momentum after the segment's last token
        M_end = (G[..., -1, None, None] * M0 + c[..., -1, None, None] * S0
                 + (a * Wm[..., -1, :, None]).transpose(-1, -2) @ b)
        new_memory.append(M_end if W0 is None else M_end + W0)
        new_momentum.append(le[..., -1, None, None].exp() * S0 + (a * Em[..., -1, :, None]).transpose(-1, -2) @ b)
    return x, tuple(new_memory), tuple(new_momentum)


def minibatch_segments(cu, pos, T, chunk_size):
    """The segments of a chunked mini-batch form (this memory's and TTT's, :mod:`rnnlab.ops.ttt`):
    (t0, t1, position at t0) within one mini-batch and one sequence each, and the Carry's maps of
    first and last segments of each non-empty sequence (None without ``cu``; then ``pos`` is the
    one position of all rows)."""
    spans = [(0, T, pos[0])] if cu is None else [(a, b, p) for a, b, p in zip(cu, cu[1:], pos)]
    segs, starts, ends = [], {}, {}
    for n, (a, b, p) in enumerate(spans):
        if b > a:
            starts[len(segs)] = n
        t0 = a
        while t0 < b:
            L = min(chunk_size - p, b - t0)
            segs.append((t0, t0 + L, p))
            t0, p = t0 + L, (p + L) % chunk_size
        if b > a:
            ends[len(segs) - 1] = n
    return segs, (None, None) if cu is None else (starts, ends)


def neural_memory_chunked(q, k, v, log_g, log_eta, theta, initial_state=None, chunk_size=16, base=None,
                          cu_seqlens=None):
    """Mini-batch by mini-batch with matmuls; same arguments and results as
    :func:`neural_memory_recurrent` (initial_state None: a linear memory at zero)."""
    cu = _check(q, k, v, log_g, log_eta, theta, initial_state, chunk_size, cu_seqlens)
    _check_base(base, initial_state, q.shape[2])
    B, T = q.shape[:2]
    pos = [0] * state_rows(B, cu) if initial_state is None else initial_state.pos.tolist()
    if cu is None and len(set(pos)) > 1:  # rows at different positions in their mini-batches: one at a time
        runs = [neural_memory_chunked(*(t[r:r + 1] for t in (q, k, v, log_g, log_eta, theta)),
                                      MemoryState(*(tuple(w[r:r + 1] for w in p) for p in initial_state[:3]),
                                                  initial_state.pos[r:r + 1]), chunk_size,
                                      None if base is None or base[0].dim() == 3 else tuple(b[r:r + 1] for b in base))
                for r in range(B)]
        return torch.cat([o for o, _ in runs]), _cat_states([st for _, st in runs])
    acc, dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    zeros = functools.partial(_zero_state, q=q, v=v, acc=acc)
    init = None if initial_state is None else _to(initial_state, acc)
    q, k, v = (rearrange(t.to(acc), "b t h d -> b h t d") for t in (q, k, v))  # (B, H, T, d)
    log_g, log_eta, theta = (rearrange(t.to(acc), "b t h -> b h t") for t in (log_g, log_eta, theta))  # (B, H, T)
    base = None if base is None else tuple(b.to(acc) for b in base)
    segs, (starts, ends) = minibatch_segments(cu, pos, T, chunk_size)
    carry = Carry(init, zeros, state_rows(B, cu), len(segs), starts, ends)
    os, st = [], None
    for i, (t0, t1, p) in enumerate(segs):
        st = carry.enter(i, st)
        memory, momentum, anchor = st.memory, st.momentum, st.memory if p == 0 else st.anchor
        sl = slice(t0, t1)
        o, memory, momentum = _segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], log_g[..., sl], log_eta[..., sl],
                                       theta[..., sl], memory, momentum, anchor, base)  # (B, H, L, V)
        os.append(o)
        st = _settled(MemoryState(memory, momentum, anchor, (st.pos + (t1 - t0)) % chunk_size))
        carry.leave(i, st)
    o = rearrange(torch.cat(os, dim=2), "b h t d -> b t h d")  # (B, T, H, V)
    return o.to(dtype), carry.final()


def _cat_states(states):
    """MemoryStates concatenated along their rows."""
    return MemoryState(*(tuple(torch.cat(ws) for ws in zip(*(getattr(s, f) for s in states)))
                         for f in ("memory", "momentum", "anchor")), torch.cat([s.pos for s in states]))


def neural_memory(q, k, v, log_g, log_eta, theta, initial_state=None, chunk_size=16, base=None, cu_seqlens=None):
    """Titans' neural memory — the form layers call; same arguments and results as
    :func:`neural_memory_recurrent`. The form comes from :func:`rnnlab.ops.registry.select`: one
    token (decoding) takes the recurrence, which is the same arithmetic with fewer operations;
    longer inputs (and packed rows) :func:`neural_memory_chunked`. ``chunk_size`` is the
    mini-batch of the inner gradient descent (a model choice that changes the result, not a
    tuning entry). ``cu_seqlens``: None, or int64 (N + 1,) for N sequences packed in one row
    (B = 1), with an initial state of N rows (or None)."""
    _check(q, k, v, log_g, log_eta, theta, initial_state, chunk_size, cu_seqlens)
    form, backend = select("memory", q=q, k=k, v=v, log_g=log_g, log_eta=log_eta, theta=theta,
                           initial_state=initial_state, cu_seqlens=cu_seqlens)
    if form == "reference":
        return neural_memory_recurrent(q, k, v, log_g, log_eta, theta, initial_state, chunk_size, base, cu_seqlens)
    return implementation("memory", form, backend)(q, k, v, log_g, log_eta, theta, initial_state, chunk_size, base,
                                                   cu_seqlens)
