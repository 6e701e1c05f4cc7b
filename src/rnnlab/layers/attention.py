"""Softmax attention: full causal, sliding window (SWA), attention sinks.

Attention (Vaswani et al. 2017) with rotary positions (RoPE, Su et al. 2021) and grouped-query
heads (Ainslie et al. 2023). The state is the KV cache.

* ``window=w``: each token attends to itself and the w-1 tokens before it (sliding window).
* ``sinks=s`` (StreamingLLM, Xiao et al. 2023): the first s tokens stay in the cache for ever.
  Positions are assigned within the cache: sinks sit at 0..s-1 and the window follows them, so a
  query at token t sees a sink i at distance ``min(t, s+w-1) - i`` and a window key j at ``t - j``.
  Attention to the sinks and to the window is computed separately and merged by log-sum-exp, so a
  long prefill equals token-by-token streaming exactly (the chunking law).

Packed rows (``cu_seqlens``): the sequences must have one length l (the KV cache has one length and
one position for all its rows), and then run as the batch (N, l) they form: attention stays
inside each sequence and RoPE positions restart at each (at the position of its initial state);
other lengths raise a ValueError.

Keys are cached *before* rotation and rotated at each call with positions relative to the start of
the cache, so positions stay bounded however long a windowed stream runs.

Init follows Llama (Hugging Face ``LlamaPreTrainedModel._init_weights``): every projection N(0, 0.02),
biases zero (the model, not the layer, would add a depth-dependent scale; rnnlab's layer does not).

Dimension letters: B batch, T new tokens, L cached tokens, H query heads, G key/value heads, K head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

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
    bias: bool = False  # biases in the q, k, v, o projections

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
        if self.head_dim % 2:
            raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
        if self.window is not None and self.window < 1:
            raise ValueError(f"window must be >= 1 or None, got {self.window}")
        if self.sinks < 0 or (self.sinks and self.window is None):
            raise ValueError(f"sinks={self.sinks}: sinks must be >= 0 and need a window (set window=w)")


@dataclass
class SWAConfig(AttentionConfig):
    window: int | None = 512  # sliding window w (tokens a query sees, itself included)


@dataclass(frozen=True)
class AttentionState(State):
    """KV cache: un-rotated keys and values of the window (or of every token), the sinks, a counter."""

    k: torch.Tensor  # (B, G, L, K) cached keys (tokens seen - L .. seen - 1, none of them a sink)
    v: torch.Tensor  # (B, G, L, K) cached values
    sink_k: torch.Tensor  # (B, G, min(seen, s), K) keys of the sink tokens
    sink_v: torch.Tensor  # (B, G, min(seen, s), K)
    seen: int  # tokens seen so far

    variable_dims = {"k": (2,), "v": (2,), "sink_k": (2,), "sink_v": (2,)}


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
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.d_model, bias=c.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """Llama's init: q, k, v, o weights N(0, 0.02), biases zero."""
        normal_linears_(self, 0.02)

    def init_state(self, batch_size, device=None, dtype=None) -> AttentionState:
        c = self.config
        empty = lambda: torch.zeros(batch_size, c.num_kv_heads, 0, c.head_dim, device=device,  # noqa: E731
                                    dtype=dtype or torch.float32)
        return AttentionState(k=empty(), v=empty(), sink_k=empty(), sink_v=empty(), seen=0)

    def mix(self, x, state, cu_seqlens=None):
        if cu_seqlens is not None:  # N packed sequences of one length l: the batch (N, l) they form
            lengths = cu_seqlens.diff()  # (N,)
            if (lengths != lengths[0]).any():
                raise ValueError(f"cu_seqlens: {type(self).__name__} packs sequences of equal length only (its state, "
                                 f"the KV cache, has one length and position for all rows); got lengths "
                                 f"{lengths.tolist()}")
            N, (_, T, D) = lengths.numel(), x.shape
            y, state = self.mix(x.reshape(N, T // N, D), state)  # (N, l, D)
            return y.reshape(1, T, D), state
        c = self.config
        B, T, _ = x.shape
        if state is None:
            state = self.init_state(B, x.device, x.dtype)
        n, s, w = state.seen, c.sinks, c.window
        # 1. project; heads first as in SDPA
        q = rearrange(self.q_proj(x), "b t (h k) -> b h t k", k=c.head_dim)  # (B, H, T, K)
        k = rearrange(self.k_proj(x), "b t (g k) -> b g t k", k=c.head_dim)  # (B, G, T, K)
        v = rearrange(self.v_proj(x), "b t (g k) -> b g t k", k=c.head_dim)  # (B, G, T, K)
        # 2. the key buffer: cached window (absolute positions n-L .. n-1) then the new tokens
        L = state.k.shape[2]
        kb = torch.cat([state.k.to(k.dtype), k], dim=2)  # (B, G, L+T, K)
        vb = torch.cat([state.v.to(v.dtype), v], dim=2)
        idx = torch.arange(n - L, n + T, device=x.device)  # (L+T,) absolute positions
        q_idx = idx[L:]
        rel = idx - (n - L)  # RoPE positions relative to the start of the buffer
        qr = apply_rope(q, rel[L:], c.rope_theta)
        kr = apply_rope(kb, rel, c.rope_theta).repeat_interleave(c.num_heads // c.num_kv_heads, dim=1)
        vr = vb.repeat_interleave(c.num_heads // c.num_kv_heads, dim=1)  # (B, H, L+T, K)
        # 3. attend
        if w is None:  # full causal attention: SDPA (flash-style kernel)
            mask = None if L == 0 else (idx[None, :] <= q_idx[:, None])  # (T, L+T)
            o = F.scaled_dot_product_attention(qr, kr, vr, attn_mask=mask, is_causal=(L == 0 and T > 1))
        else:
            o, lse = softmax_attention(qr, kr, vr, q_idx, idx, window=w, min_key=s)
            if s:  # sinks at their own cache positions, merged by log-sum-exp
                sk = torch.cat([state.sink_k.to(k.dtype), k[:, :, : max(0, s - n)]], dim=2)  # (B, G, m, K)
                sv = torch.cat([state.sink_v.to(v.dtype), v[:, :, : max(0, s - n)]], dim=2)
                s_idx = torch.arange(sk.shape[2], device=x.device)
                q_pos = torch.clamp(q_idx, max=s + w - 1)
                qs = apply_rope(q, q_pos, c.rope_theta)
                ks = apply_rope(sk, s_idx, c.rope_theta).repeat_interleave(c.num_heads // c.num_kv_heads, dim=1)
                o_s, lse_s = softmax_attention(qs, ks, sv.repeat_interleave(c.num_heads // c.num_kv_heads, dim=1),
                                               q_idx, s_idx)
                o, _ = merge_attention(o, lse, o_s, lse_s)
            o = o.to(q.dtype)
        y = self.o_proj(rearrange(o, "b h t k -> b t (h k)"))  # (B, T, D)
        # 4. the new cache
        if w is None:
            new_k, new_v = kb, vb
        else:
            first = max(s, n + T - (w - 1))  # keep the last w-1 non-sink tokens
            start = min(max(first - (n - L), 0), L + T)
            new_k, new_v = kb[:, :, start:], vb[:, :, start:]
        if s and n < s:
            new_sk = torch.cat([state.sink_k.to(k.dtype), k[:, :, : s - n]], dim=2)
            new_sv = torch.cat([state.sink_v.to(v.dtype), v[:, :, : s - n]], dim=2)
        else:
            new_sk, new_sv = state.sink_k, state.sink_v
        return y, AttentionState(k=new_k, v=new_v, sink_k=new_sk, sink_v=new_sv, seen=n + T)
