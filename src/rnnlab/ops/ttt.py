"""The inner learner of TTT layers (Sun et al. 2024, "Learning to (Learn at Test Time): RNNs with
Expressive Hidden States"): TTT-Linear and TTT-MLP.

Per head the state is an inner model f(x; W), linear (z = W x + b) or a 2-layer MLP
(z = W2 gelu(W1 x + b1) + b2, tanh GELU), trained while reading by one gradient step per
mini-batch of b = ``chunk_size`` tokens on the self-supervised loss

    ℓ(W; k, v) = ½ ||LN(f(k; W)) - (v - k)||²    (the residual model k + LN(f(k)) reconstructs v)

with LN a LayerNorm per head (weight ``ln_w``, bias ``ln_b``, epsilon ``eps``). Token t at place i
of a mini-batch that started from the weights W_0 (i = 0 .. b-1) reads

    G_t = Σ_{s ≤ t, s in the mini-batch} eta_s ∇ℓ(W_0; k_s, v_s),   W_t = W_0 - token_eta[i] G_t,
    o_t = q_t + LN(f(q_t; W_t)),

and the weights W_t of a mini-batch's last token start the next mini-batch. ``eta`` (B, T, H) is
each token's learning rate (data-dependent in the layer), ``token_eta`` (b,) a coefficient per
place (the paper's 1/(i+1): W_t takes a step along the average gradient so far; default). All
gradients of a mini-batch are taken at W_0, which is what lets a whole mini-batch be computed with
matmuls (the "dual form", :func:`ttt_chunked`): W_t is never formed. For a layer (W, b) whose
input is x_s when run on k_s (at W_0) and h_t when run on q_t, the gradients are δ_s x_s^T and δ_s
(δ_s = ∂ℓ_s/∂ of the layer's output), so its output at token t is
W_0 h_t + b_0 - token_eta[i] (G_W h_t + G_b + Σ_{s ≤ t} eta_s (h_t · x_s + 1) δ_s), with (G_W, G_b)
the gradient summed before the segment: masked attention-like products over the mini-batch.

The state holds W_0 (``weights``), G (``grads``: the learning-rate-weighted sum of the gradients
of the current mini-batch so far) and the place in the mini-batch (``pos``), as the reference
implementation's decoding cache does: a sequence split anywhere, even inside a mini-batch,
continues exactly as one call. (The same holds for a last partial mini-batch: its tokens read as
if the mini-batch were complete, and the next call completes it.)

What is shared with Titans' memory (:mod:`rnnlab.ops.memory`): the gradients of a mini-batch at
its starting weights, the segments of the chunked form and their :class:`~rnnlab.ops.bounds.Carry`
across sequences. What differs: no momentum and no forgetting; the loss passes through a LayerNorm
and a residual; the inner model has biases (and GELU, not SiLU); a token's weights are W_0 minus a
place-dependent multiple of the accumulated gradient, not a running sum of steps.

Shapes: q, k, v (B, T, H, K) (V = K: the residual); eta (B, T, H); token_eta (b,); ln_w, ln_b
(H, K). Inner weights (B, H, out, in) and biases (B, H, out): linear W (K, K), b (K,); MLP W1
(F, K), b1 (F,), W2 (K, F), b2 (K,). Packed rows (``cu_seqlens``, :mod:`rnnlab.ops.bounds`): each
sequence runs from its own row of the initial state, places included. o is returned in q's dtype,
the state in float32 or wider.
"""
from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch
import torch.nn.functional as F
from einops import rearrange

from .bounds import Carry, causal_product, cat_rows, check_cu_seqlens, rows, state_rows, token_carry
from .memory import check_minibatch_pos, minibatch_segments
from .registry import implementation, select

__all__ = ["TTTState", "ttt", "ttt_chunked", "ttt_recurrent", "minibatch_places", "default_token_eta"]


class TTTState(NamedTuple):
    weights: tuple[torch.Tensor, ...]  # W_0: (W, b) or (W1, b1, W2, b2); weights (B, H, out, in), biases (B, H, out)
    grads: tuple[torch.Tensor, ...]  # G, the same shapes: Σ eta_s ∇ℓ_s over the current mini-batch so far
    pos: torch.Tensor  # (B,) int64: tokens of each row's current mini-batch already seen, 0 <= pos < chunk_size


def default_token_eta(chunk_size: int, dtype=torch.float32, device=None) -> torch.Tensor:
    """The paper's coefficient per place in the mini-batch: 1 / (i + 1), (chunk_size,)."""
    return 1.0 / torch.arange(1, chunk_size + 1, dtype=dtype, device=device)


def minibatch_places(pos: torch.Tensor, T: int, chunk_size: int, cu_seqlens: torch.Tensor | None = None):
    """The place of every token in its mini-batch, (B, T) int64, for rows (or, with ``cu_seqlens``,
    sequences packed in one row) starting at places ``pos`` (rows,)."""
    t = torch.arange(T, device=pos.device)
    if cu_seqlens is None:
        return (pos[:, None] + t) % chunk_size  # (B, T)
    cu = cu_seqlens.to(pos.device)
    seq = torch.bucketize(t, cu[1:], right=True)  # (T,) the sequence of each token
    return ((pos[seq] + t - cu[seq]) % chunk_size)[None]  # (1, T)


def _check(q, k, v, eta, ln_w, ln_b, token_eta, initial_state, chunk_size, cu_seqlens=None):
    """Raise ValueError naming the bad argument; return ``cu_seqlens`` as a list (None without)."""
    if q.dim() != 4:
        raise ValueError(f"q must be (B, T, H, K), got {tuple(q.shape)}")
    Bsz, T, H, K = q.shape
    for name, t in (("k", k), ("v", v)):
        if t.shape != q.shape:
            raise ValueError(f"{name} must have q's shape (B, T, H, K) = {tuple(q.shape)} (V = K: the residual), "
                             f"got {tuple(t.shape)}")
    if eta.shape != (Bsz, T, H):
        raise ValueError(f"eta must be (B, T, H) = ({Bsz}, {T}, {H}), got {tuple(eta.shape)}")
    for name, t in (("ln_w", ln_w), ("ln_b", ln_b)):
        if t.shape != (H, K):
            raise ValueError(f"{name} must be (H, K) = ({H}, {K}), got {tuple(t.shape)}")
    if not isinstance(chunk_size, int) or chunk_size < 1:
        raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
    if token_eta is not None and token_eta.shape != (chunk_size,):
        raise ValueError(f"token_eta must be (chunk_size,) = ({chunk_size},), got {tuple(token_eta.shape)}")
    cu = check_cu_seqlens(cu_seqlens, Bsz, T)
    if initial_state is None:
        return cu
    if not isinstance(initial_state, TTTState):
        raise ValueError(f"initial_state must be a TTTState or None, got {type(initial_state).__name__}")
    n, who = state_rows(Bsz, cu), "B" if cu is None else "N"
    ws = initial_state.weights
    if len(ws) not in (2, 4) or len(initial_state.grads) != len(ws):
        raise ValueError("initial_state must hold 2 (linear: W, b) or 4 (MLP: W1, b1, W2, b2) tensors in weights "
                         f"and grads alike, got {len(ws)} and {len(initial_state.grads)}")
    Fh = ws[0].shape[-2] if len(ws) == 4 else K
    shapes = [(n, H, K, K), (n, H, K)] if len(ws) == 2 else [(n, H, Fh, K), (n, H, Fh), (n, H, K, Fh), (n, H, K)]
    names = ["W", "b"] if len(ws) == 2 else ["W1", "b1", "W2", "b2"]
    for part in ("weights", "grads"):
        for i, (w, sh) in enumerate(zip(getattr(initial_state, part), shapes)):
            if tuple(w.shape) != sh:
                raise ValueError(f"initial_state.{part}[{i}] ({names[i]}) must be ({who}, H, ...) = {sh}, "
                                 f"got {tuple(w.shape)}")
    check_minibatch_pos(initial_state.pos, n, who, chunk_size)
    return cu


def _zero_state(n, q, acc):
    """A linear inner model at zero for ``n`` rows, place 0 (q (B, T, H, K))."""
    H, K = q.shape[2:]
    W, b = q.new_zeros(n, H, K, K, dtype=acc), q.new_zeros(n, H, K, dtype=acc)
    return TTTState((W, b), (W, b), torch.zeros(n, dtype=torch.long, device=q.device))


def _to(st, acc):
    return TTTState(tuple(w.to(acc) for w in st.weights), tuple(g.to(acc) for g in st.grads), st.pos)


# -- pieces of the loss --------------------------------------------------------------------------------
def _ln(z, w, b, eps):
    """LayerNorm over the last dim with weight w and bias b (H, K) for z (..., H, L or none, K)."""
    mu = z.mean(-1, keepdim=True)
    zh = (z - mu) / torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    return w * zh + b


def _ln_l2_grad(z, target, w, b, eps):
    """∂/∂z of ½ ||LN(z) - target||² (LayerNorm with weight w, bias b over the last dim)."""
    sd = torch.sqrt(z.var(-1, unbiased=False, keepdim=True) + eps)
    zh = (z - z.mean(-1, keepdim=True)) / sd
    g = (w * zh + b - target) * w  # ∂ℓ/∂ẑ
    return (g - g.mean(-1, keepdim=True) - zh * (g * zh).mean(-1, keepdim=True)) / sd


_C = math.sqrt(2 / math.pi)


def _gelu(z):
    return F.gelu(z, approximate="tanh")


def _dgelu(z):
    """d/dz of the tanh GELU 0.5 z (1 + tanh(c (z + 0.044715 z³)))."""
    th = torch.tanh(_C * (z + 0.044715 * z ** 3))
    return 0.5 * (1 + th) + 0.5 * z * (1 - th * th) * _C * (1 + 3 * 0.044715 * z * z)


def _layers(weights):
    """[(W, b), ...] of the inner model's layers."""
    return list(zip(weights[0::2], weights[1::2]))


def _deltas(weights, k, v, ln_w, ln_b, eps):
    """The inner model run on k (..., K) (rows of weights (B, H, ·, ·) broadcast over ``...``):
    per layer its input x and the loss gradient δ = ∂ℓ/∂z of its output, [(x, δ), ...]. The
    gradient of the layer's weight is δ x^T, of its bias δ."""
    xs, zs, h = [], [], k
    layers = _layers(weights)
    for i, (W, b) in enumerate(layers):
        xs.append(h)
        z = h @ W.transpose(-1, -2) + b.unsqueeze(-2)  # (..., out)
        zs.append(z)
        h = _gelu(z) if i + 1 < len(layers) else z
    d = _ln_l2_grad(zs[-1], v - k, ln_w, ln_b, eps)
    ds = [d]
    for i in range(len(layers) - 1, 0, -1):
        d = (d @ layers[i][0]) * _dgelu(zs[i - 1])  # back through W_i and the GELU
        ds.insert(0, d)
    return list(zip(xs, ds))


def _bc(c, w):
    """c (B,) or (B, H) shaped to multiply w (B, H, ...)."""
    return c.reshape(c.shape + (1,) * (w.dim() - c.dim()))


# -- the definition ---------------------------------------------------------------------------------
def ttt_recurrent(q, k, v, eta, ln_w, ln_b, token_eta=None, initial_state=None, chunk_size=16, eps=1e-6,
                  cu_seqlens=None):
    """The definition: a loop over tokens. Returns (o (B, T, H, K), TTTState of B rows, or N with
    ``cu_seqlens``); initial_state None: a linear inner model at zero."""
    cu = _check(q, k, v, eta, ln_w, ln_b, token_eta, initial_state, chunk_size, cu_seqlens)
    acc, dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    q, k, v, eta, ln_w, ln_b = (t.to(acc) for t in (q, k, v, eta, ln_w, ln_b))
    token_eta = default_token_eta(chunk_size, acc, q.device) if token_eta is None else token_eta.to(acc)
    B, T = q.shape[:2]
    init = None if initial_state is None else _to(initial_state, acc)
    carry = token_carry(cu, init, lambda n: _zero_state(n, q, acc), B, T)
    ln_w, ln_b = ln_w[:, None], ln_b[:, None]  # (H, 1, K): one token per head below
    os, st = [], None
    for t in range(T):
        W0, G, pos = carry.enter(t, st)
        kt, vt, qt = k[:, t, :, None], v[:, t, :, None], q[:, t, :, None]  # (B, H, 1, K)
        grad = [g for x, d in _deltas(W0, kt, vt, ln_w, ln_b, eps) for g in (d.transpose(-1, -2) @ x, d[..., 0, :])]
        G = tuple(g + _bc(eta[:, t], g) * dg for g, dg in zip(G, grad))  # G += eta_t ∇ℓ(W_0; k_t, v_t)
        c = token_eta[pos]  # (B,) the coefficient of each row's place
        Wt = tuple(w - _bc(c, w) * g for w, g in zip(W0, G))  # W_t = W_0 - token_eta[i] G_t
        h = qt
        for i, (W, b) in enumerate(_layers(Wt)):
            h = h @ W.transpose(-1, -2) + b.unsqueeze(-2)
            h = _gelu(h) if 2 * i + 2 < len(Wt) else h
        os.append((qt + _ln(h, ln_w, ln_b, eps))[:, :, 0])  # o_t = q_t + LN(f(q_t; W_t)), (B, H, K)
        pos = pos + 1
        end = pos == chunk_size  # (B,) the mini-batch is complete: W_t starts the next one
        W0 = tuple(torch.where(_bc(end, w), wt, w) for w, wt in zip(W0, Wt))
        G = tuple(torch.where(_bc(end, g), torch.zeros_like(g), g) for g in G)
        st = TTTState(W0, G, torch.where(end, torch.zeros_like(pos), pos))
        carry.leave(t, st)
    return torch.stack(os, dim=1).to(dtype), carry.final()


# -- the dual form (mini-batch by mini-batch) ---------------------------------------------------------
def _segment(q, k, v, eta, c, W0, G0, ln_w, ln_b, eps):
    """L tokens of one mini-batch (B, H, L, ·), c (L,) the token_eta of their places:
    -> o (B, H, L, K), G at the last token."""
    L = q.shape[2]
    causal = torch.ones(L, L, dtype=torch.bool, device=q.device).tril()
    A = (c[:, None] * eta[..., None, :]).masked_fill(~causal, 0.0)  # (B, H, L, L): token_eta[i] eta_s, s <= t
    pieces = _deltas(W0, k, v, ln_w, ln_b, eps)
    h, G_end = q, []
    for i, ((W, b), (GW, Gb), (x, d)) in enumerate(zip(_layers(W0), _layers(G0), pieces)):
        # f(h_t; W_t) = W_0 h_t + b_0 - c_t (G_0 h_t + G_b) - c_t Σ_{s ≤ t} eta_s (h_t · x_s + 1) δ_s
        z = (h @ W.transpose(-1, -2) + b.unsqueeze(-2)
             - c[:, None] * (h @ GW.transpose(-1, -2) + Gb.unsqueeze(-2))
             - causal_product((A * (h @ x.transpose(-1, -2) + 1)).masked_fill(~causal, 0.0), d))  # (B, H, L, out)
        h = _gelu(z) if i + 1 < len(pieces) else z
        ed = eta[..., None] * d  # (B, H, L, out)
        G_end += [GW + ed.transpose(-1, -2) @ x, Gb + ed.sum(-2)]
    return q + _ln(h, ln_w, ln_b, eps), tuple(G_end)


def ttt_chunked(q, k, v, eta, ln_w, ln_b, token_eta=None, initial_state=None, chunk_size=16, eps=1e-6,
                cu_seqlens=None):
    """The dual form, mini-batch by mini-batch with matmuls; same arguments and results as
    :func:`ttt_recurrent`."""
    cu = _check(q, k, v, eta, ln_w, ln_b, token_eta, initial_state, chunk_size, cu_seqlens)
    B, T = q.shape[:2]
    pos = [0] * state_rows(B, cu) if initial_state is None else initial_state.pos.tolist()
    if cu is None and len(set(pos)) > 1:  # rows at different places in their mini-batches: one at a time
        runs = [ttt_chunked(*(t[r:r + 1] for t in (q, k, v, eta)), ln_w, ln_b, token_eta,
                            rows(initial_state, r, r + 1), chunk_size, eps) for r in range(B)]
        return torch.cat([o for o, _ in runs]), cat_rows([st for _, st in runs])
    acc, dtype = torch.promote_types(q.dtype, torch.float32), q.dtype
    token_eta = default_token_eta(chunk_size, acc, q.device) if token_eta is None else token_eta.to(acc)
    init = None if initial_state is None else _to(initial_state, acc)
    zeros = functools.partial(_zero_state, q=q, acc=acc)  # q as given: (B, T, H, K)
    q, k, v = (rearrange(t.to(acc), "b t h d -> b h t d") for t in (q, k, v))  # (B, H, T, K)
    eta = rearrange(eta.to(acc), "b t h -> b h t")  # (B, H, T)
    ln_w, ln_b = ln_w.to(acc)[:, None], ln_b.to(acc)[:, None]  # (H, 1, K)
    segs, (starts, ends) = minibatch_segments(cu, pos, T, chunk_size)
    carry = Carry(init, zeros, state_rows(B, cu), len(segs), starts, ends)
    os, st = [], None
    for i, (t0, t1, p) in enumerate(segs):
        W0, G0, places = carry.enter(i, st)
        sl = slice(t0, t1)
        c = token_eta[p:p + t1 - t0]  # (L,)
        o, G = _segment(q[:, :, sl], k[:, :, sl], v[:, :, sl], eta[..., sl], c, W0, G0, ln_w, ln_b, eps)
        os.append(o)  # (B, H, L, K)
        if p + t1 - t0 == chunk_size:  # the mini-batch is complete: one gradient step
            W0 = tuple(w - c[-1] * g for w, g in zip(W0, G))
            G = tuple(torch.zeros_like(g) for g in G)
        st = TTTState(W0, G, (places + (t1 - t0)) % chunk_size)
        carry.leave(i, st)
    o = rearrange(torch.cat(os, dim=2), "b h t d -> b t h d")  # (B, T, H, K)
    return o.to(dtype), carry.final()


def ttt(q, k, v, eta, ln_w, ln_b, token_eta=None, initial_state=None, chunk_size=16, eps=1e-6, cu_seqlens=None):
    """TTT's inner learner — the form layers call; same arguments and results as
    :func:`ttt_recurrent`. The form comes from :func:`rnnlab.ops.registry.select`: one token
    (decoding) takes the loop, longer inputs (and packed rows) :func:`ttt_chunked`. ``chunk_size``
    is the mini-batch b of the inner gradient descent (a model choice that changes the result, not
    a tuning entry)."""
    _check(q, k, v, eta, ln_w, ln_b, token_eta, initial_state, chunk_size, cu_seqlens)
    form, backend = select("ttt", q=q, k=k, v=v, eta=eta, initial_state=initial_state, cu_seqlens=cu_seqlens)
    fn = ttt_recurrent if form == "reference" else implementation("ttt", form, backend)
    return fn(q, k, v, eta, ln_w, ln_b, token_eta, initial_state, chunk_size, eps, cu_seqlens)
