"""Softmax attention: full causal, sliding window (SWA), attention sinks.

Attention (Vaswani et al. 2017) with rotary positions (RoPE, Su et al. 2021) and grouped-query
heads (Ainslie et al. 2023). The state is the KV cache.

* ``window=w``: each token attends to itself and the w-1 tokens before it (sliding window).
* ``sinks=s`` (StreamingLLM, Xiao et al. 2023): the first s tokens stay in the cache for ever.
  Positions are assigned within the cache: sinks sit at 0..s-1 and the window follows them, so a
  query at token t sees a sink i at distance ``min(t, s+w-1) - i`` and a window key j at ``t - j``.
  Attention to the sinks and to the window is computed separately and merged by log-sum-exp, so a
  long prefill equals token-by-token streaming exactly (the chunking law).

Every row of the state has its own position (``seen``), so rows of a batch may sit at different
positions (a ragged batch: states after prompts of different lengths, concatenated with
:meth:`State.cat`), and packed rows (``cu_seqlens``) hold sequences of any lengths: they run as the
ragged batch (N, longest) they form, each sequence continuing its own state row (RoPE positions
restart at the position of that row) and ending in its own row.

Keys are cached *rotated*: a window key by its absolute position (so query-key angles depend only on
the distance, as StreamingLLM's cache positions do), a sink key by its sink index. A call writes its
new keys and attends; nothing cached is rotated again. Full attention keeps its keys in a buffer
whose capacity doubles when full, and a state continued for the first time (the latest state of its
buffer) without gradients writes into that buffer in place, so a decode step costs the attention
itself plus O(1) bookkeeping; any other state (continued a second time, loaded, or carrying
gradients) is first copied. Window keys are shifted (O(w) per call, bounded like the attention).

Init follows Llama (Hugging Face ``LlamaPreTrainedModel._init_weights``): every projection N(0, 0.02),
biases zero (the model, not the layer, would add a depth-dependent scale; rnnlab's layer does not).

Dimension letters: B batch, T new tokens, L cached tokens, H query heads, G key/value heads, K head dim.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.attention import merge_attention, softmax_attention
from .base import Mixer, MixerConfig
from .common import apply_rope, normal_linears_
from .state import State

__all__ = ["AttentionConfig", "SWAConfig", "AttentionState", "Attention"]


@dataclass
class AttentionConfig(MixerConfig):
    num_heads: int = 4  # query heads H
    num_kv_heads: int | None = None  # key/value heads G (grouped-query attention); None = H
    head_dim: int | None = None  # K; None = d_model // num_heads
    window: int | None = None  # sliding window w (tokens a query sees, itself included); None = full
    sinks: int = 0  # attention sinks s: first tokens kept for ever (needs a window)
    rope_theta: float = 10000.0  # RoPE base
    rope_fraction: float = 1.0  # the fraction of each head's dims RoPE rotates, the first ones (RecurrentGemma: 0.5)
    bias: bool = False  # biases in the q, k, v projections (and o, unless out_bias says otherwise)
    out_bias: bool | None = None  # a bias in the o projection; None = bias (RecurrentGemma: True with bias=False)
    rope_dim: int = field(init=False, repr=False)  # derived: the rotated dims per head, int(head_dim · rope_fraction)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        if self.head_dim is None:
            if self.d_model % self.num_heads:
                raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}; set head_dim")
            self.head_dim = self.d_model // self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"num_heads={self.num_heads} must be a multiple of num_kv_heads={self.num_kv_heads}")
        if not 0 < self.rope_fraction <= 1:
            raise ValueError(f"rope_fraction must be in (0, 1], got {self.rope_fraction!r}")
        self.rope_dim = int(self.head_dim * self.rope_fraction)
        if self.rope_dim < 2 or self.rope_dim % 2:
            raise ValueError(f"head_dim · rope_fraction = {self.head_dim} · {self.rope_fraction} must give an even "
                             f"number >= 2 of rotated dims, got {self.rope_dim}")
        if self.out_bias is None:
            self.out_bias = self.bias
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")
        if self.sinks < 0 or (self.sinks and self.window is None):
            raise ValueError(f"sinks={self.sinks}: sinks must be >= 0 and need a window (set window=w)")


@dataclass
class SWAConfig(AttentionConfig):
    window: int | None = 512  # sliding window w (tokens a query sees, itself included)


@dataclass(frozen=True)
class AttentionState(State):
    """KV cache of rotated keys with a position per row.

    Full attention: ``k[b, :, j]`` is the key of position j rotated by j, valid for j < seen[b];
    the capacity C >= max(seen) doubles when full. Slots past a row's ``seen`` are zeros, or keys a
    later state of the same buffer wrote in place; they are never attended to (see ``_write``).
    Window w: ``k[b, :, i]`` (i < w-1) is the key of position ``seen[b] - (w-1) + i`` rotated by that
    position (the last w-1 tokens, right-aligned), unused where that position is a sink or < 0.
    Sinks: ``sink_k[b, :, i]`` is the key of token i rotated by i, valid for i < seen[b].
    """

    k: torch.Tensor  # (B, G, C, K) rotated keys: C the capacity (full) or w-1 (window)
    v: torch.Tensor  # (B, G, C, K) values beside them
    sink_k: torch.Tensor  # (B, G, s, K) rotated keys of the sink tokens
    sink_v: torch.Tensor  # (B, G, s, K)
    seen: torch.Tensor  # (B,) int64 tokens seen by each row: the position of its next token

    variable_dims = {"k": (2,), "v": (2,)}

    @property
    def nbytes(self) -> int:
        """Bytes of what the cache holds: the keys and values of the tokens kept (at most the
        longest row's, at most the window) and of the sinks seen, and the positions — not the spare
        capacity of a full-attention buffer, which can add up to as much again."""
        seen = int(self.seen.max()) if self.seen.numel() else 0
        per_slot = lambda t: t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()  # noqa: E731
        kept, sinks = min(seen, self.k.shape[2]), min(seen, self.sink_k.shape[2])
        return (kept * (per_slot(self.k) + per_slot(self.v)) + sinks * (per_slot(self.sink_k) + per_slot(self.sink_v))
                + self.seen.numel() * self.seen.element_size())


def _write(state: AttentionState, name: str, new: torch.Tensor, slot: torch.Tensor, write: torch.Tensor,
           size: int) -> torch.Tensor:
    """The buffer ``name`` (B, G, C, K) of ``state`` with ``new`` (B, G, T, K) written at slots
    ``slot`` (B, T) where ``write`` (B, T) is True, at least ``size`` slots long. In place when
    ``state`` is the latest state of that buffer, it is long enough and no gradient flows through it;
    else into a copy (capacity doubled as needed, zeros past each row's ``seen``)."""
    buf = getattr(state, name)
    latest = state.__dict__.get("_versions", {}).get(name) == buf._version
    if not (latest and size <= buf.shape[2] and buf.dtype == new.dtype and not (buf.requires_grad or new.requires_grad)):
        C = buf.shape[2] if size <= buf.shape[2] else 1 << (size - 1).bit_length()
        if not buf.requires_grad:  # only such buffers are written in place: past seen, another continuation's keys
            mine = torch.arange(buf.shape[2], device=buf.device) < state.seen[:, None]  # (B, C_old) valid slots
            buf = buf.masked_fill(~mine[:, None, :, None], 0.0)
        buf = F.pad(buf.to(new.dtype), (0, 0, 0, C - buf.shape[2]))  # a copy (B, G, C, K)
    b, t = write.nonzero(as_tuple=True)  # (M,) rows and tokens to write
    buf[b, :, slot[b, t]] = new[b, :, t]  # (M, G, K)
    return buf


def _slots(buf: torch.Tensor, first: torch.Tensor, n: int) -> torch.Tensor:
    """Slots ``first[b] .. first[b] + n - 1`` of each row b of ``buf`` (B, G, L, K) -> (B, G, n, K),
    copied as whole K-vectors (one index_select; a gather over K is several times slower)."""
    B, G, L, K = buf.shape
    slot = first[:, None] + torch.arange(n, device=buf.device)  # (B, n)
    rows = torch.arange(B * G, device=buf.device).view(B, G, 1) * L + slot[:, None, :]  # (B, G, n) rows of (B·G·L, K)
    return buf.reshape(B * G * L, K).index_select(0, rows.reshape(-1)).view(B, G, n, K)


class Attention(Mixer):
    """Causal softmax attention with RoPE, GQA, optional sliding window and attention sinks."""

    config_cls = AttentionConfig
    state_cls = AttentionState
    recurrent = False

    def __init__(self, config: AttentionConfig):
        super().__init__(config)
        c = config
        self.q_proj = nn.Linear(c.d_model, c.num_heads * c.head_dim, bias=c.bias)
        self.k_proj = nn.Linear(c.d_model, c.num_kv_heads * c.head_dim, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, c.num_kv_heads * c.head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.d_model, bias=c.out_bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Llama's init: q, k, v, o weights N(0, 0.02), biases zero."""
        normal_linears_(self, 0.02)

    def init_state(self, batch_size, device=None, dtype=None) -> AttentionState:
        c = self.config
        zeros = lambda L: torch.zeros(batch_size, c.num_kv_heads, L, c.head_dim, device=device,  # noqa: E731
                                      dtype=dtype or torch.float32)
        C = 0 if c.window is None else c.window - 1
        return AttentionState(k=zeros(C), v=zeros(C), sink_k=zeros(c.sinks), sink_v=zeros(c.sinks),
                              seen=torch.zeros(batch_size, dtype=torch.int64, device=device))

    def mix(self, x, state, cu_seqlens=None):
        if cu_seqlens is None:
            return self._attend(x, state, None)
        # N packed sequences: the ragged batch (N, l) they form, l the longest, zero-padded
        cu = cu_seqlens.to(x.device)
        lengths = cu.diff()  # (N,)
        t = torch.arange(int(lengths.max()), device=x.device)  # (l,)
        real = t < lengths[:, None]  # (N, l)
        rows = torch.where(real[..., None], x[0, (cu[:-1, None] + t).clamp_max(x.shape[1] - 1)], 0.0)  # (N, l, D)
        y, state = self._attend(rows, state, lengths)
        return y[real][None], state  # (1, T, D)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """RoPE on the first ``rope_dim`` dims of x (B, H, T, K) at positions pos (B, T); the rest pass."""
        c = self.config
        if c.rope_dim == c.head_dim:
            return apply_rope(x, pos, c.rope_theta)
        return torch.cat([apply_rope(x[..., :c.rope_dim], pos, c.rope_theta), x[..., c.rope_dim:]], dim=-1)

    def _attend(self, x, state, lengths):
        """x (B, T, D) -> y (B, T, D), new state; row b holds ``lengths[b]`` real tokens (None: T),
        the rest padding that is neither attended to nor cached."""
        c = self.config
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        s, w, rep = c.sinks, c.window, c.num_heads // c.num_kv_heads
        ar = torch.arange(T, device=x.device)
        pos = state.seen[:, None] + ar  # (B, T) positions of the new tokens
        real = (ar < (T if lengths is None else lengths[:, None])).expand(B, T)  # (B, T) real tokens
        # 1. project; heads first as in SDPA; keys rotated once, by their position
        q = rearrange(self.q_proj(x), "b t (h k) -> b h t k", k=c.head_dim)  # (B, H, T, K)
        k = rearrange(self.k_proj(x), "b t (g k) -> b g t k", k=c.head_dim)  # (B, G, T, K)
        v = rearrange(self.v_proj(x), "b t (g k) -> b g t k", k=c.head_dim)  # (B, G, T, K)
        qr, k = self._rope(q, pos), self._rope(k, pos)
        count = real.sum(dim=1)  # (B,) real tokens per row
        seen = state.seen + count  # (B,)
        # 2. attend; the new cache
        if w is None:  # full causal attention over the buffer of slots = positions: SDPA
            L = int(seen.max())
            new_k = _write(state, "k", k, pos, real, L)  # (B, G, C, K)
            new_v = _write(state, "v", v, pos, real, L)
            fresh = int(state.seen.max()) == 0  # no cached token: the mask is the causal one
            mask = None if fresh else (torch.arange(L, device=x.device) <= pos[..., None])[:, None]  # (B, 1, T, L)
            o = F.scaled_dot_product_attention(qr, new_k[:, :, :L], new_v[:, :, :L], attn_mask=mask,
                                               is_causal=fresh and T > 1, enable_gqa=True)
            sink_k, sink_v = state.sink_k, state.sink_v
        else:  # the cached window, then the new tokens: their positions per row
            W = w - 1
            kb = torch.cat([state.k.to(k.dtype), k], dim=2)  # (B, G, W+T, K)
            vb = torch.cat([state.v.to(v.dtype), v], dim=2)
            k_idx = torch.cat([state.seen[:, None] - W + torch.arange(W, device=x.device), pos], dim=1)  # (B, W+T)
            o, lse = softmax_attention(qr, kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1),
                                       pos, k_idx, window=w, min_key=s)
            sink_k, sink_v = state.sink_k, state.sink_v
            if s:  # sinks at their own cache positions, merged by log-sum-exp
                sink = real & (pos < s)  # (B, T) new tokens that are sinks
                sink_k = _write(state, "sink_k", k, pos, sink, s)  # sink i rotated by i = its position
                sink_v = _write(state, "sink_v", v, pos, sink, s)
                qs = self._rope(q, pos.clamp(max=s + w - 1))
                o_s, lse_s = softmax_attention(qs, sink_k.repeat_interleave(rep, dim=1),
                                               sink_v.repeat_interleave(rep, dim=1), pos,
                                               torch.arange(s, device=x.device))
                o, _ = merge_attention(o, lse, o_s, lse_s)
            o = o.to(q.dtype)
            new_k, new_v = _slots(kb, count, W), _slots(vb, count, W)  # the last W slots of each row
        y = self.o_proj(rearrange(o, "b h t k -> b t (h k)"))  # (B, T, D)
        new = AttentionState(k=new_k, v=new_v, sink_k=sink_k, sink_v=sink_v, seen=seen)
        object.__setattr__(new, "_versions", {n: t._version for n, t in new.tensors().items()})  # see _write
        return y, new
