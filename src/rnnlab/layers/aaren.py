"""Aaren: attention of a learned query over the prefix, computed as an RNN.

Feng, Tung, Hajimirsadeghi, Ahmed, Bengio, Mori 2024, "Attention as an RNN". Each head attends
with one learned query q (no query projection) over the keys and values of all tokens so far:

    o_t = sum_{i<=t} exp(s_i) v_i / sum_{i<=t} exp(s_i),     s_i = q . k_i / sqrt(K)

which is a prefix scan over the state (m, u, w) = (running max, denominator, numerator):
``m_t = max(m_{t-1}, s_t)``, ``u_t = exp(m_{t-1} - m_t) u_{t-1} + exp(s_t - m_t)``,
``w_t = exp(m_{t-1} - m_t) w_{t-1} + exp(s_t - m_t) v_t``, ``o_t = w_t / u_t``.
Given the running max (``torch.cummax``), (u, w) follow a linear recurrence whose coefficients
are all <= 1: it runs through ``rnnlab.ops.linear_scan`` (family A), which makes the parallel
form and token-by-token decoding one computation, exact under any split of the sequence. Layers
are stacked as in the paper by the LM's layout (each Aaren block's outputs are the next one's
inputs; residual, norm and MLP come from the LM block).

rnnlab differs from the paper in: several heads, each with its own learned query, followed by an
output projection (as in the multi-head attention it replaces); the paper's prefix scan is the
Hillis-Steele scan over the (m, u, w) triples, here the running max is taken first and the scan is
linear. The start state is m = -inf, u = 0, w = 0 (no token seen).

Init (no reference code was found): the learned queries N(0, 1), projections N(0, 0.02), biases
zero; the queries are weight-decayed like the projections.

Dimension letters: B batch, T tokens, D model width, H heads, K head dim.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..ops.scan import linear_scan, running_max
from .base import Mixer, MixerConfig, state_batch
from .common import normal_linears_, split_heads
from .state import State

__all__ = ["AarenConfig", "AarenState", "Aaren"]


@dataclass
class AarenConfig(MixerConfig):
    num_heads: int = 4  # heads H, each with its own learned query
    head_dim: int | None = None  # K; None = d_model // num_heads
    bias: bool = False  # biases in the k, v and output projections

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_heads, int) or self.num_heads < 1:
            raise ValueError(f"num_heads must be a positive int, got {self.num_heads!r}")
        self.head_dim = split_heads(self.d_model, self.num_heads, self.head_dim)


@dataclass(frozen=True)
class AarenState(State):
    m: torch.Tensor  # (B, H) running max of the scores (-inf before the first token)
    u: torch.Tensor  # (B, H) denominator sum_i exp(s_i - m)
    w: torch.Tensor  # (B, H, K) numerator sum_i exp(s_i - m) v_i


class Aaren(Mixer):
    """Multi-head Aaren layer (see module docstring)."""

    config_cls = AarenConfig
    state_cls = AarenState
    recurrent = True

    def __init__(self, config: AarenConfig):
        super().__init__(config)
        c = config
        self.query = nn.Parameter(torch.empty(c.num_heads, c.head_dim))  # (H, K) learned queries
        self.k_proj = nn.Linear(c.d_model, c.num_heads * c.head_dim, bias=c.bias)
        self.v_proj = nn.Linear(c.d_model, c.num_heads * c.head_dim, bias=c.bias)
        self.o_proj = nn.Linear(c.num_heads * c.head_dim, c.d_model, bias=c.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """rnnlab's init: queries N(0, 1), projections N(0, 0.02), biases zero."""
        nn.init.normal_(self.query, 0.0, 1.0)
        normal_linears_(self, 0.02)

    def init_state(self, batch_size, device=None, dtype=None):
        c, dt = self.config, dtype or torch.float32
        return AarenState(m=torch.full((batch_size, c.num_heads), -math.inf, device=device, dtype=dt),
                          u=torch.zeros(batch_size, c.num_heads, device=device, dtype=dt),
                          w=torch.zeros(batch_size, c.num_heads, c.head_dim, device=device, dtype=dt))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        if state is None:
            state = self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        k = rearrange(self.k_proj(x), "b t (h k) -> b t h k", k=c.head_dim).to(acc)  # (B, T, H, K)
        v = rearrange(self.v_proj(x), "b t (h k) -> b t h k", k=c.head_dim).to(acc)  # (B, T, H, K)
        # 1. scores of the learned queries
        s = torch.einsum("bthk,hk->bth", k, self.query.to(acc)) / math.sqrt(c.head_dim)  # (B, T, H)
        # 2. running max, continuing the state's (the output does not depend on it: no gradient)
        m, m_prev, m_last = running_max(s.detach(), state.m.to(acc), cu_seqlens)  # (B, T, H) x2, (B, H)
        # 3. rescale the old sums to the new max, add the new term: a linear scan over (w, u)
        a = torch.exp(m_prev - m)  # (B, T, H), 0 at the very first token (m_prev = -inf)
        p = torch.exp(s - m)  # (B, T, H), <= 1
        b = torch.cat([p[..., None] * v, p[..., None]], dim=-1)  # (B, T, H, K+1)
        wu0 = torch.cat([state.w.to(acc), state.u.to(acc)[..., None]], dim=-1)  # (B, H, K+1)
        wu, wu_last = linear_scan(a[..., None].expand_as(b), b, initial_state=wu0,
                                  cu_seqlens=cu_seqlens)  # (B, T, H, K+1), (B, H, K+1)
        # 4. read out the attention and project
        o = wu[..., :-1] / wu[..., -1:]  # (B, T, H, K)
        y = self.o_proj(rearrange(o, "b t h k -> b t (h k)").to(x.dtype))  # (B, T, D)
        return y, AarenState(m=m_last, u=wu_last[..., -1], w=wu_last[..., :-1])
