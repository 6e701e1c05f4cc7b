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
:meth:`State.cat`), and packed rows (``cu_seqlens``) hold sequences of any lengths: each sequence
continues its own state row (RoPE positions restart at the position of that row), ends in its own
row and attends over views of the packed row: its own cache row and its own tokens, one SDPA call per
sequence (block-diagonal causal attention without padding: sum_n l_n (s_n + l_n) scores for
sequences of l_n tokens after s_n cached ones, where padding to the longest computes
N l (s + l) and a block-diagonal mask over the row T (s + T)). A non-finite key or value never
reaches a query that may not see it (:func:`rnnlab.ops.attention.causal_attention`).

Keys are cached *rotated*: a window key by its absolute position (so query-key angles depend only on
the distance, as StreamingLLM's cache positions do), a sink key by its sink index. A call writes its
new keys and attends; nothing cached is rotated again. Full attention keeps its keys in a buffer
whose capacity doubles when full, and a state continued for the first time (the latest state of its
buffer) without gradients writes into that buffer in place, so a decode step costs the attention
itself plus O(1) bookkeeping; any other state (continued a second time, loaded, or carrying
gradients) is first copied. Window keys are shifted (O(w) per call, bounded like the attention).
A state keeps the least and largest position of its rows as Python ints beside ``seen``
(:func:`seen_range`), so a decoding step reads nothing back from the device.

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

from ..ops.attention import causal_attention, merge_attention, softmax_attention
from .base import Mixer, MixerConfig, at_least, positive
from .common import apply_rope, normal_linears_, split_heads
from .state import State

__all__ = ["AttentionConfig", "SWAConfig", "AttentionState", "Attention", "seen_range"]


@dataclass
class AttentionConfig(MixerConfig):
    num_heads: int = 4  # query heads H
    num_kv_heads: int | None = at_least(1, None)  # key/value heads G (grouped-query attention); None = H
    head_dim: int | None = None  # K; None = d_model // num_heads
    window: int | None = None  # sliding window w (tokens a query sees, itself included); None = full
    sinks: int = 0  # attention sinks s: first tokens kept for ever (needs a window)
    rope_theta: float = positive(10000.0)  # RoPE base
    rope_fraction: float = 1.0  # the fraction of each head's dims RoPE rotates, the first ones (RecurrentGemma: 0.5)
    bias: bool = False  # biases in the q, k, v projections (and o, unless out_bias says otherwise)
    out_bias: bool | None = None  # a bias in the o projection; None = bias (RecurrentGemma: True with bias=False)
    rope_dim: int = field(init=False, repr=False)  # derived: the rotated dims per head, int(head_dim · rope_fraction)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_kv_heads is None:
            self.num_kv_heads = self.num_heads
        self.head_dim = split_heads(self.d_model, self.num_heads, self.head_dim)
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
        seen = seen_range(self)[1]
        per_slot = lambda t: t.shape[0] * t.shape[1] * t.shape[3] * t.element_size()  # noqa: E731
        kept, sinks = min(seen, self.k.shape[2]), min(seen, self.sink_k.shape[2])
        return (kept * (per_slot(self.k) + per_slot(self.v)) + sinks * (per_slot(self.sink_k) + per_slot(self.sink_v))
                + self.seen.numel() * self.seen.element_size())


def seen_range(state: AttentionState) -> tuple[int, int]:
    """The least and the largest ``state.seen`` as Python ints. The call that made ``state`` keeps
    them beside the tensor (so decoding needs no host sync); any other state (selected, joined,
    loaded, replaced) reads them once."""
    known = state.__dict__.get("_range")
    if known is not None and known[0] is state.seen and known[1] == state.seen._version:
        return known[2], known[3]
    lo, hi = state.seen.aminmax() if state.seen.numel() else (torch.zeros(()), torch.zeros(()))
    lo, hi = int(lo), int(hi)
    object.__setattr__(state, "_range", (state.seen, state.seen._version, lo, hi))
    return lo, hi


def _new_state(k, v, sink_k, sink_v, seen, lo: int, hi: int) -> AttentionState:
    """The state after a call, with its range of positions and the versions of its buffers (see
    :func:`seen_range` and :func:`_write`)."""
    new = AttentionState(k=k, v=v, sink_k=sink_k, sink_v=sink_v, seen=seen)
    object.__setattr__(new, "_versions", {n: t._version for n, t in new.tensors().items()})
    object.__setattr__(new, "_range", (seen, seen._version, lo, hi))
    return new


def _write(state: AttentionState, name: str, rows: torch.Tensor, slots: torch.Tensor, new: torch.Tensor,
           size: int) -> torch.Tensor:
    """The buffer ``name`` (B, G, C, K) of ``state`` with ``buf[rows, :, slots] = new`` (rows and
    slots broadcast to an index shape I, new (*I, G, K)), at least ``size`` slots long. In place when
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
    buf[rows, :, slots] = new
    return buf


def _write_sinks(buf: torch.Tensor, new: torch.Tensor, first: torch.Tensor, seen: torch.Tensor,
                 count: torch.Tensor) -> torch.Tensor:
    """Sink buffer ``buf`` (R, G, s, K) with slot i of row r set to the key of its position i,
    ``new[r or 0, :, first[r] + i - seen[r]]`` (new (R or 1, G, T, K); row r's new tokens start at
    index ``first[r]`` and position ``seen[r]``) where ``seen[r] <= i < seen[r] + count[r]``: a
    selection, without host sync."""
    R, G, s, K = buf.shape
    i = torch.arange(s, device=buf.device)
    mine = (i >= seen[:, None]) & (i < (seen + count)[:, None])  # (R, s)
    at = (first[:, None] + i - seen[:, None]).clamp(0, new.shape[2] - 1)  # (R, s) token of each sink slot
    got = new.expand(R, -1, -1, -1).gather(2, at[:, None, :, None].expand(R, G, s, K))  # (R, G, s, K)
    return torch.where(mine[:, None, :, None], got, buf.to(new.dtype))


class Attention(Mixer):
    """Causal softmax attention with RoPE, GQA, optional sliding window and attention sinks."""

    config_cls = AttentionConfig
    state_cls = AttentionState
    step_compiles = False  # KV-cache writes read positions on the host
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
        seen = torch.zeros(batch_size, dtype=torch.int64, device=device)
        return _new_state(zeros(C), zeros(C), zeros(c.sinks), zeros(c.sinks), seen, 0, 0)

    def _rope(self, x: torch.Tensor, pos: torch.Tensor) -> torch.Tensor:
        """RoPE on the first ``rope_dim`` dims of x (B, H, T, K) at positions pos (B, T); the rest pass."""
        c = self.config
        if c.rope_dim == c.head_dim:
            return apply_rope(x, pos, c.rope_theta)
        return torch.cat([apply_rope(x[..., :c.rope_dim], pos, c.rope_theta), x[..., c.rope_dim:]], dim=-1)

    def mix(self, x, state, cu_seqlens=None):
        """x (B, T, D) -> y (B, T, D), new state. With ``cu_seqlens`` (B = 1) sequence n of the row
        continues row n of the state: its tokens sit at positions ``seen[n], seen[n] + 1, ...``."""
        c = self.config
        B, T, _ = x.shape
        rows = B if cu_seqlens is None else cu_seqlens.numel() - 1
        if state is None:
            state = self.init_state(rows, x.device, x.dtype)
        s, w, rep = c.sinks, c.window, c.num_heads // c.num_kv_heads
        lo, hi = seen_range(state)
        ar = torch.arange(T, device=x.device)
        if cu_seqlens is None:
            pos = state.seen[:, None] + ar  # (B, T) positions of the new tokens
            count = torch.full_like(state.seen, T)  # (B,) new tokens per row
            first = torch.zeros_like(state.seen)  # (B,) index of each row's first new token
            lo2, hi2, seqs = lo + T, hi + T, None
        else:  # sequence n: tokens a..b-1 of the row; its cache row n alone, no padding
            cu, at = cu_seqlens.tolist(), state.seen.tolist()
            seqs = [(n, a, b, at[n]) for n, (a, b) in enumerate(zip(cu, cu[1:])) if b > a]
            ends = [at[n] + b - a for n, (a, b) in enumerate(zip(cu, cu[1:]))]
            cu_t = cu_seqlens.to(x.device)
            count = cu_t.diff()  # (N,)
            seq = torch.repeat_interleave(torch.arange(rows, device=x.device), count, output_size=T)  # (T,)
            pos = (state.seen[seq] + ar - cu_t[seq])[None]  # (1, T)
            first = cu_t[:-1]
            lo2, hi2 = min(ends), max(ends)
        # 1. project; heads first as in SDPA; keys rotated once, by their position
        q = rearrange(self.q_proj(x), "b t (h k) -> b h t k", k=c.head_dim)  # (B, H, T, K)
        k = rearrange(self.k_proj(x), "b t (g k) -> b g t k", k=c.head_dim)  # (B, G, T, K)
        v = rearrange(self.v_proj(x), "b t (g k) -> b g t k", k=c.head_dim)  # (B, G, T, K)
        qr, k = self._rope(q, pos), self._rope(k, pos)
        # 2. attend; the new cache
        sink_k, sink_v = state.sink_k, state.sink_v
        if w is None:  # full causal attention over the buffer of slots = positions: SDPA
            if seqs is None:
                where, kt, vt = (torch.arange(B, device=x.device)[:, None], pos), k.transpose(1, 2), v.transpose(1, 2)
            else:
                where, kt, vt = (seq, pos[0]), k[0].transpose(0, 1), v[0].transpose(0, 1)  # (T, G, K)
            new_k = _write(state, "k", *where, kt, hi2)  # (B, G, C, K)
            new_v = _write(state, "v", *where, vt, hi2)
            if seqs is None:  # rows at one position: causal from it; else each row from its own
                o = causal_attention(qr, new_k[:, :, :hi2], new_v[:, :, :hi2], None if lo == hi else pos)
            else:  # each sequence over its own cache row: sum_n l_n (s_n + l_n) scores
                o = torch.cat([causal_attention(qr[:, :, a:b], new_k[n:n + 1, :, :s_n + b - a],
                                                new_v[n:n + 1, :, :s_n + b - a]) for n, a, b, s_n in seqs], dim=2)
        else:  # the cached window, then the new tokens: their positions per row
            if s and lo < s:  # some new tokens are sinks: sink i rotated by i = its position
                sink_k = _write_sinks(state.sink_k, k, first, state.seen, count)
                sink_v = _write_sinks(state.sink_v, v, first, state.seen, count)
            qs = self._rope(q, pos.clamp(max=s + w - 1)) if s else None
            if seqs is None:
                o, new_k, new_v = self._window(qr, qs, state.k, state.v, k, v, pos, state.seen, sink_k, sink_v)
            else:
                o, new_k, new_v = [], list(state.k.split(1)), list(state.v.split(1))
                for n, a, b, s_n in seqs:
                    o_n, new_k[n], new_v[n] = self._window(
                        qr[:, :, a:b], None if qs is None else qs[:, :, a:b], state.k[n:n + 1], state.v[n:n + 1],
                        k[:, :, a:b], v[:, :, a:b], pos[:, a:b], state.seen[n:n + 1], sink_k[n:n + 1], sink_v[n:n + 1])
                    o.append(o_n)
                o, new_k, new_v = torch.cat(o, dim=2), torch.cat(new_k).to(k.dtype), torch.cat(new_v).to(v.dtype)
        y = self.o_proj(rearrange(o, "b h t k -> b t (h k)"))  # (B, T, D)
        return y, _new_state(new_k, new_v, sink_k, sink_v, state.seen + count, lo2, hi2)

    def _window(self, qr, qs, cache_k, cache_v, k, v, pos, seen, sink_k, sink_v):
        """Window (and sink) attention of rows whose T new tokens all follow their cache: queries qr
        (B, H, T, K) (qs: rotated at their sink distances), cache (B, G, W, K), new k, v (B, G, T, K)
        at positions pos (B, T), rows at ``seen`` (B,). Returns o (B, H, T, K) and the new cache."""
        c = self.config
        W, rep = c.window - 1, c.num_heads // c.num_kv_heads
        kb = torch.cat([cache_k.to(k.dtype), k], dim=2)  # (B, G, W+T, K)
        vb = torch.cat([cache_v.to(v.dtype), v], dim=2)
        k_idx = torch.cat([seen[:, None] - W + torch.arange(W, device=k.device), pos], dim=1)  # (B, W+T)
        o, lse = softmax_attention(qr, kb.repeat_interleave(rep, dim=1), vb.repeat_interleave(rep, dim=1),
                                   pos, k_idx, window=c.window, min_key=c.sinks, with_lse=bool(c.sinks))
        if c.sinks:  # sinks at their own cache positions, merged by log-sum-exp
            o_s, lse_s = softmax_attention(qs, sink_k.repeat_interleave(rep, dim=1),
                                           sink_v.repeat_interleave(rep, dim=1), pos,
                                           torch.arange(c.sinks, device=k.device))
            o, _ = merge_attention(o, lse, o_s, lse_s)
        T = k.shape[2]
        return o.to(qr.dtype), kb[:, :, T:].contiguous(), vb[:, :, T:].contiguous()  # the last W slots
