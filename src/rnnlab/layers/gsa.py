"""Gated Slot Attention (Zhang et al. 2024, "Gated Slot Attention for Efficient Linear-Time Sequence
Modeling").

Per head, M bounded memory slots are written with a forget gate α_t and read through a softmax
(the recurrence in ``rnnlab.ops.gsa``):
    K̃_t = Diag(α_t) K̃_{t-1} + (1 - α_t) k_t^T,   Ṽ_t = Diag(α_t) Ṽ_{t-1} + (1 - α_t) v_t^T,
    o_t = Ṽ_t^T softmax(K̃_t q_t),   α_t = sigmoid(W_α x_t)^(1/τ)  (τ = 8, the gate logit normaliser)
i.e. a two-pass gated linear attention (GLA read of the slots, softmax, GLA read of their values)
with the state bounded by M slots instead of K·V.

As in the reference implementation (flash-linear-attention's GatedSlotAttention): q and k pass
through the swish feature map, v through SiLU; H·K = H·V = d_model; the softmax is unscaled; the
output is ``W_o RMSNorm(silu(o))`` with one RMSNorm over the full width. rnnlab differs in: no short
convolution (the reference's default is off too), 64 slots per head by default (the paper's).

Init follows flash-linear-attention's layer init (``GatedSlotAttention._initialize_weights``):
xavier-uniform with gain 2^-2.5 on every projection, norm weight 1. (fla dropped this layer init
in March 2025 for its models' N(0, 0.02).)

Dimension letters: B batch, T tokens, D model width, H heads, K = V = D/H head dim, M slots.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.gsa import gsa
from .base import Mixer, MixerConfig, positive
from .common import RMSNorm, reset_norms_, xavier_linears_
from .state import State

__all__ = ["GSAConfig", "GSAState", "GSA"]


@dataclass
class GSAConfig(MixerConfig):
    num_heads: int = 4  # H
    num_slots: int = 64  # M memory slots per head
    gate_logit_normalizer: float = positive(8.0)  # τ: log α = logsigmoid(W_α x) / τ
    norm_eps: float = positive(1e-5)  # epsilon of the output RMSNorm
    head_dim: int = 0  # derived: K = V = d_model / H

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads} must be >= 1 and divide d_model={self.d_model}")
        if self.num_slots < 1:
            raise ValueError(f"num_slots must be >= 1, got {self.num_slots}")
        if self.gate_logit_normalizer <= 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {self.gate_logit_normalizer}")
        self.head_dim = self.d_model // self.num_heads


@dataclass(frozen=True)
class GSAState(State):
    keys: torch.Tensor  # (B, H, M, K) slot keys K̃
    values: torch.Tensor  # (B, H, M, V) slot values Ṽ


class GSA(Mixer):
    """Gated slot attention mixer (see module docstring)."""

    config_cls = GSAConfig
    state_cls = GSAState

    def __init__(self, config: GSAConfig):
        super().__init__(config)
        c = config
        D, H, M = c.d_model, c.num_heads, c.num_slots
        self.q_proj = nn.Linear(D, D, bias=False)
        self.k_proj = nn.Linear(D, D, bias=False)
        self.v_proj = nn.Linear(D, D, bias=False)
        self.f_proj = nn.Linear(D, H * M, bias=False)
        self.g_norm = RMSNorm(D, eps=c.norm_eps)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla's init: xavier-uniform (gain 2^-2.5) projections, norm weight 1."""
        xavier_linears_(self, 2 ** -2.5)
        reset_norms_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> GSAState:
        c, dt = self.config, dtype or torch.float32
        shape = (batch_size, c.num_heads, c.num_slots, c.head_dim)
        return GSAState(keys=torch.zeros(shape, device=device, dtype=dt),
                        values=torch.zeros(shape, device=device, dtype=dt))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        heads = lambda t, d: rearrange(t, "b t (h d) -> b t h d", d=d)  # noqa: E731
        # 1. projections: swish feature map on q, k; SiLU on v
        q = F.silu(heads(self.q_proj(x), c.head_dim))  # (B, T, H, K)
        k = F.silu(heads(self.k_proj(x), c.head_dim))  # (B, T, H, K)
        v = F.silu(heads(self.v_proj(x), c.head_dim))  # (B, T, H, V)
        # 2. forget gate α = sigmoid(·)^(1/τ) in log space; slots are written with 1 - α
        log_g = F.logsigmoid(heads(self.f_proj(x), c.num_slots).to(acc)) / c.gate_logit_normalizer  # (B, T, H, M)
        s = -torch.expm1(log_g)  # 1 - α, exact for α near 1
        # 3. two gated passes with a softmax over slots
        init = None if state is None else (state.keys, state.values)
        o, (keys, values) = gsa(q, k, v, s, log_g, init, cu_seqlens=cu_seqlens)  # (B, T, H, V)
        # 4. RMSNorm(silu(o)) over the full width, output projection
        o = self.g_norm(F.silu(rearrange(o, "b t h d -> b t (h d)")).to(x.dtype))  # (B, T, D)
        return self.o_proj(o), GSAState(keys=keys, values=values)
