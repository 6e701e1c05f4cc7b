"""Gated Linear Attention and HGRN2: data-dependent vector decays over the key dimension.

* GLA — Yang et al. 2023, "Gated Linear Attention Transformers with Hardware-Efficient Training":
  ``S_t = Diag(α_t) S_{t-1} + k_t v_t^T``, ``o_t = S_t^T q_t / sqrt(K)`` with a low-rank gate
  ``log α_t = logsigmoid(W_2 W_1 x_t + b) / τ`` (τ = 16), output ``RMSNorm(o) * swish(W_g x)`` per head;
  key dim = 0.5 · d_model (expand_k), value dim = d_model (expand_v), as in flash-linear-attention.
* HGRN2 — Qin et al. 2024, "HGRN2: Gated Linear RNNs with State Expansion": the same recurrence with
  the forget gate ``f_t = β + (1 - β) sigmoid(W_f x_t)`` (lower bound β), key ``k_t = 1 - f_t``,
  query ``swish(W_q x_t)``, value ``W_i x_t``; head key dim = expand_ratio (128 by default); an
  RMSNorm over the output.

In a model, the lower bound of the i-th of L blocks is i / L unless the layout sets it: HGRN2's
initial bounds (a cumulative softmax over layers of equal logits, starting at 0). rnnlab differs
from HGRN2 in: the bounds stay fixed (the paper keeps learning them, through a parameter shared by
the whole model); a lone layer (``build_mixer``) has ``lower_bound = 0``; set them per block in the
layout, e.g. ``"hgrn2(lower_bound=0.0),hgrn2(lower_bound=0.5)"``.

Init (both layers) follows flash-linear-attention's layer init (``_initialize_weights`` of its GLA
and HGRN2 layers): xavier-uniform with gain 2^-2.5 on every projection (the gate's low-rank pair
included), biases zero, norm weights 1. (fla dropped this layer init in March 2025 for its models'
N(0, 0.02) and a depth-scaled o_proj; the GLA paper's code used the gain-2^-2.5 init.)

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim, R gate rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.delta import gated_delta_rule
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import RMSNorm, reset_norms_, xavier_linears_
from .linear_attention import MatrixState

__all__ = ["GLAConfig", "HGRN2Config", "GLA", "HGRN2"]


@dataclass
class GLAConfig(MixerConfig):
    num_heads: int = at_least(1, 4)  # H
    expand_k: float = positive(0.5)  # H·K = expand_k · d_model
    expand_v: float = positive(1.0)  # H·V = expand_v · d_model
    gate_low_rank_dim: int = at_least(1, 16)  # R of the decay's low-rank projection
    gate_logit_normalizer: float = positive(16.0)  # τ: log α = logsigmoid(·) / τ
    norm_eps: float = positive(1e-5)  # epsilon of the per-head output norm
    key_dim: int = 0  # derived: H·K
    value_dim: int = 0  # derived: H·V

    def __post_init__(self) -> None:
        super().__post_init__()
        self.key_dim, self.value_dim = int(self.d_model * self.expand_k), int(self.d_model * self.expand_v)
        if self.key_dim % self.num_heads or self.value_dim % self.num_heads:
            raise ValueError(f"expand_k·d_model={self.key_dim} and expand_v·d_model={self.value_dim} must be "
                             f"divisible by num_heads={self.num_heads}")


@dataclass
class HGRN2Config(MixerConfig):
    num_heads: int | None = at_least(1, None)  # H; None = d_model // expand_ratio (at least 1)
    expand_ratio: int = at_least(1, 128)  # K, the state expansion (forget-gate dim per head)
    lower_bound: float = 0.0  # β in [0, 1): the forget gate's lower bound; a model sets block_index / n_layers
    norm_eps: float = positive(1e-5)  # epsilon of the output RMSNorm

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.num_heads is None:
            self.num_heads = max(1, self.d_model // self.expand_ratio)
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")
        if not 0.0 <= self.lower_bound < 1.0:
            raise ValueError(f"lower_bound must be in [0, 1), got {self.lower_bound}")


class GLA(Mixer):
    """Gated linear attention (see module docstring)."""

    config_cls = GLAConfig
    state_cls = MatrixState

    def __init__(self, config: GLAConfig):
        super().__init__(config)
        c = config
        self.q_proj = nn.Linear(c.d_model, c.key_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.key_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.value_dim, bias=False)
        self.g_proj = nn.Linear(c.d_model, c.value_dim, bias=False)
        self.gk_proj = nn.Sequential(nn.Linear(c.d_model, c.gate_low_rank_dim, bias=False),
                                     nn.Linear(c.gate_low_rank_dim, c.key_dim, bias=True))
        self.g_norm = RMSNorm(c.value_dim // c.num_heads, c.norm_eps)
        self.o_proj = nn.Linear(c.value_dim, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla's init: xavier-uniform (gain 2^-2.5) projections, zero gate bias, norm weight 1."""
        xavier_linears_(self, 2 ** -2.5)
        reset_norms_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> MatrixState:
        c = self.config
        return MatrixState(S=torch.zeros(batch_size, c.num_heads, c.key_dim // c.num_heads,
                                         c.value_dim // c.num_heads, device=device, dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, T, H, K|V)
        log_g = F.logsigmoid(heads(self.gk_proj(x))) / c.gate_logit_normalizer  # (B, T, H, K)
        o, S = gated_delta_rule(q, k, v, log_g=log_g, initial_state=st.S, cu_seqlens=cu_seqlens)
        o = self.g_norm(o) * F.silu(heads(self.g_proj(x)))  # (B, T, H, V)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)").to(x.dtype)), MatrixState(S=S)


class HGRN2(Mixer):
    """HGRN2 (see module docstring)."""

    config_cls = HGRN2Config
    state_cls = MatrixState

    def __init__(self, config: HGRN2Config):
        super().__init__(config)
        c = config
        F_dim = c.num_heads * c.expand_ratio
        self.q_proj = nn.Linear(c.d_model, F_dim, bias=False)
        self.f_proj = nn.Linear(c.d_model, F_dim, bias=False)
        self.i_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.g_norm = RMSNorm(c.d_model, c.norm_eps)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla's init: xavier-uniform (gain 2^-2.5) projections, norm weight 1."""
        xavier_linears_(self, 2 ** -2.5)
        reset_norms_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> MatrixState:
        c = self.config
        return MatrixState(S=torch.zeros(batch_size, c.num_heads, c.expand_ratio, c.d_model // c.num_heads,
                                         device=device, dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        q = F.silu(heads(self.q_proj(x)))  # (B, T, H, K)
        f = c.lower_bound + (1 - c.lower_bound) * torch.sigmoid(heads(self.f_proj(x)))  # forget gate in (β, 1)
        k, log_g = 1 - f, torch.log(f)  # key = 1 - forget
        o, S = gated_delta_rule(q, k, heads(self.i_proj(x)), log_g=log_g, initial_state=st.S, cu_seqlens=cu_seqlens)
        o = self.g_norm(rearrange(o, "b t h v -> b t (h v)"))  # (B, T, D)
        return self.o_proj(o.to(x.dtype)), MatrixState(S=S)
