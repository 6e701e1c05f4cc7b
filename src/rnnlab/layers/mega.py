"""Mega: a damped multi-dimensional EMA followed by single-head gated attention, chunked (Mega-chunk).

Ma et al. 2023, "Mega: Moving Average Equipped Gated Attention". Per channel d of D, with N
expansion dimensions, the damped EMA (a diagonal, real LTI state space: ``rnnlab.ops.lti``):

    h_t = α ⊙ β x_t + (1 - α ⊙ δ) ⊙ h_{t-1},   x'_t = silu(Σ_n η h_t / sqrt(N) + ω ⊙ x_t)

(α, δ in (0, 1) through sigmoids; h (D, N)). Then one attention head whose queries and keys share
Z = silu(W_z x' + b) through per-dimension scales and offsets (q = Z ⊙ γ_q + β_q, k = Z ⊙ γ_k + β_k),
values v = silu(W_v x + b), a reset gate r = silu(W_r x' + b) and an update gate u = σ(W_u x' + b):

    o_t = Σ_j softmax_j(q_t · k_j / sqrt(Z) + b_rel(t, j)) v_j,   y_t = u_t ⊙ silu(W_hx x'_t + W_h (r_t ⊙ o_t))

with attention only inside fixed chunks of c tokens (Mega-chunk): a query sees the keys of its own
chunk up to itself, so the cost is linear in T and the state bounded. Chunks are aligned to absolute
positions (a position counter per row in the state), so any split of a sequence gives the same
chunks: the state is the EMA state h, the keys and values of the current chunk's tokens so far
(c - 1 slots) and the position. The relative position bias is Mega's rotary one,
b_rel(t, j) = rot(a, t mod c) · rot(b, j mod c) with learned a, b (Z,), folded into the scores by
appending those vectors to the queries and keys (``rnnlab.ops.attention.softmax_attention``).

Defaults follow the reference's language-model setting (facebookresearch/mega,
``moving_average_gated_attention.py``, ``exponential_moving_average.py``, ``mega_lm.py`` and the
wikitext-103 recipe): N = 16, Z = 128, chunk 1024, softmax attention with the rotary bias, SiLU. Init
as there: the projections and γ N(0, 0.02), β 0, the rotary a, b N(0, 0.02); EMA α and δ logits
N(0, 0.2), β = (1, -1, 1, ...) + N(0, 0.02), η and ω N(0, 1). rnnlab differs in: the value width
defaults to 2·D (the reference's hidden_dim: 2048 at D = 1024 in mega_lm_big, 1664 at D = 512);
the layer's pre-norm and the gated residual ``x + u ⊙ (h - x)`` belong to the block here, so the
layer returns ``u ⊙ h`` and the block adds x; the EMA runs its exact recurrence (no kernel
truncation); the attention is always chunked (no unchunked mode, no "simple" position bias, no
laplace/relu² activation); no dropout. The reference decays every parameter; here the EMA's α, δ
and ω and the query/key offsets skip weight decay, as rnnlab's other state-space layers do.

Dimension letters: B batch, T tokens, D model width, N EMA dimensions per channel, Z shared q/k
width, V value width, c chunk size.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.attention import softmax_attention
from ..ops.lti import lti
from .base import Mixer, MixerConfig, state_batch
from .common import apply_rope, normal_linears_
from .state import State

__all__ = ["MegaConfig", "MegaState", "Mega"]


@dataclass
class MegaConfig(MixerConfig):
    ndim: int = 16  # N, EMA expansion dimensions per channel
    z_dim: int = 128  # Z, width of the shared query/key projection (even: rotary bias)
    v_dim: int | None = None  # V, value width (the reference's hidden_dim); None = 2 · d_model
    chunk_size: int = 1024  # c, attention chunk (the reference's wikitext-103 setting)

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.ndim, int) or self.ndim < 1:
            raise ValueError(f"ndim must be a positive int, got {self.ndim!r}")
        if not isinstance(self.z_dim, int) or self.z_dim < 2 or self.z_dim % 2:
            raise ValueError(f"z_dim must be an even int >= 2 (the rotary position bias), got {self.z_dim!r}")
        if self.v_dim is None:
            self.v_dim = 2 * self.d_model
        if not isinstance(self.v_dim, int) or self.v_dim < 1:
            raise ValueError(f"v_dim must be a positive int (or None for 2 · d_model), got {self.v_dim!r}")
        if not isinstance(self.chunk_size, int) or self.chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {self.chunk_size!r}")


@dataclass(frozen=True)
class MegaState(State):
    """The EMA state and the current chunk: slot i of ``k``/``v`` holds the token at position
    ``seen - seen % c + i`` for i < seen % c, zeros elsewhere."""

    h: torch.Tensor  # (B, D, N) the EMA state
    k: torch.Tensor  # (B, c-1, Z) keys of the current chunk's tokens so far
    v: torch.Tensor  # (B, c-1, V) their values
    seen: torch.Tensor  # (B,) int64 tokens seen by each row: the position of its next token


def _gather(buf: torch.Tensor, idx: torch.Tensor) -> torch.Tensor:
    """buf (B, L, F) at positions idx (B, M) along dim 1 -> (B, M, F)."""
    return buf.gather(1, idx[..., None].expand(-1, -1, buf.shape[-1]))


class Mega(Mixer):
    """Mega layer with chunked attention (see the module docstring)."""

    config_cls = MegaConfig
    state_cls = MegaState
    step_compiles = False  # the chunk layout is read on the host
    no_decay_params = ("ema_alpha", "ema_delta", "ema_omega", "qk_offset")

    def __init__(self, config: MegaConfig):
        super().__init__(config)
        c = config
        D, N, Z, V = c.d_model, c.ndim, c.z_dim, c.v_dim
        self.ema_alpha = nn.Parameter(torch.empty(D, N))  # α = sigmoid(ema_alpha)
        self.ema_delta = nn.Parameter(torch.empty(D, N))  # δ = sigmoid(ema_delta)
        self.ema_beta = nn.Parameter(torch.empty(D, N))  # β, the input expansion
        self.ema_eta = nn.Parameter(torch.empty(D, N))  # η, the output projection
        self.ema_omega = nn.Parameter(torch.empty(D))  # ω, the EMA's skip gain
        self.v_proj = nn.Linear(D, V)
        self.mx_proj = nn.Linear(D, D + Z + V + D)  # update gate u, shared Z, reset gate r, W_hx x'
        self.h_proj = nn.Linear(V, D)
        self.qk_scale = nn.Parameter(torch.empty(2, Z))  # γ_q, γ_k
        self.qk_offset = nn.Parameter(torch.empty(2, Z))  # β_q, β_k
        self.rel_pos_a = nn.Parameter(torch.empty(Z))  # rotary position bias: rot(a, t) · rot(b, j)
        self.rel_pos_b = nn.Parameter(torch.empty(Z))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init (see the module docstring)."""
        N = self.config.ndim
        with torch.no_grad():
            nn.init.normal_(self.ema_alpha, 0.0, 0.2)
            nn.init.normal_(self.ema_delta, 0.0, 0.2)
            sign = torch.where(torch.arange(N) % 2 == 0, 1.0, -1.0)  # (N,) 1, -1, 1, ...
            self.ema_beta.normal_(0.0, 0.02).add_(sign)
            nn.init.normal_(self.ema_eta, 0.0, 1.0)
            nn.init.normal_(self.ema_omega, 0.0, 1.0)
            nn.init.normal_(self.qk_scale, 0.0, 0.02)
            nn.init.zeros_(self.qk_offset)
            nn.init.normal_(self.rel_pos_a, 0.0, 0.02)
            nn.init.normal_(self.rel_pos_b, 0.0, 0.02)
        normal_linears_(self, 0.02)

    def init_state(self, batch_size, device=None, dtype=None) -> MegaState:
        c = self.config
        z = lambda *s: torch.zeros(batch_size, *s, device=device, dtype=dtype or torch.float32)  # noqa: E731
        return MegaState(h=z(c.d_model, c.ndim), k=z(c.chunk_size - 1, c.z_dim), v=z(c.chunk_size - 1, c.v_dim),
                         seen=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def ema_coefficients(self, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """The EMA as an LTI state space per channel: (dA = 1 - α δ, dB = α β, C = η / sqrt(N)), each (D, N)."""
        alpha, delta = torch.sigmoid(self.ema_alpha.to(acc)), torch.sigmoid(self.ema_delta.to(acc))
        return 1 - alpha * delta, alpha * self.ema_beta.to(acc), self.ema_eta.to(acc) * self.config.ndim ** -0.5

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        xf = x.to(acc)
        # 1. the damped EMA (a real diagonal LTI), its skip and SiLU
        ema, h_last = lti(xf, *self.ema_coefficients(acc), st.h.to(acc), cu_seqlens=cu_seqlens)  # (B, T, D)
        mx = F.silu(ema + self.ema_omega.to(acc) * xf)  # (B, T, D)
        # 2. gates, the shared Z and its query/key offsets, the values
        u, z, r, hx = self.mx_proj(mx.to(x.dtype)).to(acc).split([c.d_model, c.z_dim, c.v_dim, c.d_model], dim=-1)
        z, r = F.silu(z), F.silu(r)
        q, k = (z[..., None, :] * self.qk_scale.to(acc) + self.qk_offset.to(acc)).unbind(-2)  # (B, T, Z) each
        v = F.silu(self.v_proj(x).to(acc))  # (B, T, V)
        # 3. attention inside the chunks, continuing each row's current chunk
        if cu_seqlens is None:
            o, (k_new, v_new, seen) = self._attend(q, k, v, st, None)  # (B, T, V)
        else:  # the packed sequences as a ragged batch (N, l), l the longest, zero-padded
            cu = cu_seqlens.to(x.device)
            lengths = cu.diff()  # (N,)
            t = torch.arange(int(lengths.max()), device=x.device)  # (l,)
            real = t < lengths[:, None]  # (N, l)
            idx = (cu[:-1, None] + t).clamp_max(x.shape[1] - 1)  # (N, l)
            rows = [torch.where(real[..., None], a[0, idx], 0.0) for a in (q, k, v)]  # (N, l, ·)
            o, (k_new, v_new, seen) = self._attend(*rows, st, lengths)
            o = o[real][None]  # (1, T, V)
        # 4. output: y = u ⊙ silu(W_hx x' + W_h (r ⊙ o)); the block adds the residual
        hid = F.silu(hx + self.h_proj((r * o).to(x.dtype)).to(acc))  # (B, T, D)
        y = (torch.sigmoid(u) * hid).to(x.dtype)
        return y, MegaState(h=h_last, k=k_new, v=v_new, seen=seen)

    def _rotary(self, vec: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """rot(vec, pos): vec (Z,) rotated by each position pos (...,) -> (..., Z)."""
        table = apply_rope(vec.expand(self.config.chunk_size, -1)[None, None],
                           torch.arange(self.config.chunk_size, device=vec.device))[0, 0]  # (c, Z)
        return table[pos]

    def _attend(self, q, k, v, st: MegaState, lengths):
        """q, k (B, T, Z), v (B, T, V) of new tokens, row b holding ``lengths[b]`` real ones (None: T),
        continuing ``st``'s chunks -> o (B, T, V) and the new (k, v, seen) of the state."""
        c = self.config.chunk_size
        B, T, Z = q.shape
        acc, dev = q.dtype, q.device
        n = torch.full((B,), T, device=dev) if lengths is None else lengths  # (B,) real tokens per row
        off = st.seen % c  # (B,) where each row stands in its chunk
        scale = Z ** -0.5
        a, b = self.rel_pos_a.to(acc), self.rel_pos_b.to(acc)
        # the chunk-start-aligned buffer per row: its cached slots, then the new tokens, then zeros
        one_chunk = int((off + T).max()) <= c  # every row stays in its current chunk (decoding)
        L = c if one_chunk else -(-(int(off.max()) + T) // c) * c
        j = torch.arange(L, device=dev)  # (L,) buffer slots = positions from the row's chunk start
        src = torch.where(j < off[:, None], j, (c - 1) + (j - off[:, None]).clamp(0, T))  # (B, L) into [cache, new, 0]
        pad = lambda cache, new: torch.cat([cache.to(acc), new, new.new_zeros(B, 1, new.shape[-1])], 1)  # noqa: E731
        kb, vb = _gather(pad(st.k, k), src), _gather(pad(st.v, v), src)  # (B, L, Z), (B, L, V)
        kb = torch.cat([kb, self._rotary(b, j % c).expand(B, -1, -1)], -1)  # (B, L, 2Z): [k, rot(b, j)]
        if one_chunk:  # queries: the new tokens only, at slots off + t of the one chunk
            pos = off[:, None] + torch.arange(T, device=dev)  # (B, T)
            qa = torch.cat([q * scale, self._rotary(a, pos)], -1)[:, None]  # (B, 1, T, 2Z)
            o, _ = softmax_attention(qa, kb[:, None], vb[:, None], pos, j, scale=1.0)  # (B, 1, T, V)
            o = o[:, 0]
        else:  # every slot of the buffer queries its own chunk (causal attention per chunk)
            qb = _gather(pad(torch.zeros_like(st.k, dtype=acc), q), src)  # (B, L, Z)
            qa = torch.cat([qb * scale, self._rotary(a, j % c).expand(B, -1, -1)], -1)  # (B, L, 2Z)
            split = lambda t: rearrange(t, "b (n c) f -> b n c f", c=c)  # noqa: E731
            ar = torch.arange(c, device=dev)
            o, _ = softmax_attention(split(qa), split(kb), split(vb), ar, ar, scale=1.0)  # (B, L/c, c, V)
            o = _gather(rearrange(o, "b n c f -> b (n c) f"), (off[:, None] + torch.arange(T, device=dev)))  # (B, T, V)
        # the new state: the tokens of each row's last, unfinished chunk
        end = off + n  # (B,) one past each row's last real token in the buffer
        left = end % c  # (B,) tokens of that chunk
        i = torch.arange(c - 1, device=dev)
        keep = (i < left[:, None])[..., None]  # (B, c-1, 1)
        at = ((end - left)[:, None] + i).clamp_max(L - 1)  # (B, c-1) their slots in the buffer
        same = (n == 0)[:, None, None]  # (B, 1, 1) rows without tokens (empty packed sequences) keep their state
        k_new = torch.where(same, st.k.to(acc), torch.where(keep, _gather(kb[..., :Z], at), 0.0))  # (B, c-1, Z)
        v_new = torch.where(same, st.v.to(acc), torch.where(keep, _gather(vb, at), 0.0))  # (B, c-1, V)
        return o.to(acc), (k_new, v_new, st.seen + n)
