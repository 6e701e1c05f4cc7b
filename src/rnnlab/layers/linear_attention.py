"""Linear attention and RetNet: matrix-state recurrences without a delta term.

* Linear attention — Katharopoulos et al. 2020, "Transformers are RNNs":
  ``S_t = S_{t-1} + φ(k_t) v_t^T``, ``z_t = z_{t-1} + φ(k_t)``,
  ``o_t = S_t^T φ(q_t) / (z_t^T φ(q_t) + eps)`` (or without the normaliser: ``S_t^T φ(q_t) / sqrt(K)``).
  φ is elu+1 (the paper's), relu or identity. The normaliser z rides along as an extra column of
  ones appended to v, so the state is K x (V+1).
* RetNet — Sun et al. 2023, "Retentive Network": ``S_t = γ_h S_{t-1} + k_t v_t^T`` with fixed decays
  ``γ_h = 1 - 2^(-5-h)`` over heads h, ``o_t = S_t^T q_t``, per-head group norm, swish output gate,
  value dim 2x the key dim (value_factor 2).

Both run on ``rnnlab.ops.gated_delta_rule`` (beta=None). rnnlab differs from the papers in: RetNet
uses no xPos rotation (positions would have to live in the state; the decay already encodes
recency), and its group norm is an RMSNorm per head.

Init: linear attention keeps PyTorch's nn.Linear default (kaiming-uniform), as the paper's code
(idiap/fast-transformers ``AttentionLayer``) does; RetNet follows torchscale's
``MultiScaleRetention.reset_parameters``: xavier-uniform with gain 2^-2.5 on q, k, v, g and 2^-1 on
the output projection. RetNet's decays are fixed (not parameters) and computed in the
accumulation dtype (float64 in a float64 model), so a float64 run is exact.

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.delta import gated_delta_rule
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import RMSNorm, default_init_, normalised, split_heads, with_normaliser
from .state import State

__all__ = ["LinearAttentionConfig", "RetNetConfig", "MatrixState", "LinearAttention", "RetNet"]

_FEATURE_MAPS = {"elu": lambda x: F.elu(x) + 1, "relu": F.relu, "identity": lambda x: x}


@dataclass
class LinearAttentionConfig(MixerConfig):
    num_heads: int = 4  # H
    head_dim: int | None = None  # K = V; None = d_model // num_heads
    feature_map: str = "elu"  # φ: "elu" (elu + 1), "relu" or "identity"
    normalize: bool = True  # divide by φ(q)·z (the paper's normaliser)
    eps: float = 1e-6  # added to the normaliser

    def __post_init__(self) -> None:
        super().__post_init__()
        self.head_dim = split_heads(self.d_model, self.num_heads, self.head_dim)
        if self.feature_map not in _FEATURE_MAPS:
            raise ValueError(f"feature_map must be one of {sorted(_FEATURE_MAPS)}, got {self.feature_map!r}")


@dataclass
class RetNetConfig(MixerConfig):
    num_heads: int = at_least(1, 4)  # H
    head_dim: int | None = None  # K; None = d_model // num_heads
    value_factor: int = at_least(1, 2)  # V = value_factor · K
    norm_eps: float = positive(1e-6)  # epsilon of the per-head norm

    def __post_init__(self) -> None:
        super().__post_init__()
        self.head_dim = split_heads(self.d_model, self.num_heads, self.head_dim)


@dataclass(frozen=True)
class MatrixState(State):
    S: torch.Tensor  # (B, H, K, V) (V+1 columns with linear attention's normaliser)


class LinearAttention(Mixer):
    """Linear attention (see module docstring)."""

    config_cls = LinearAttentionConfig
    state_cls = MatrixState

    def __init__(self, config: LinearAttentionConfig):
        super().__init__(config)
        c = config
        HK = c.num_heads * c.head_dim
        self.q_proj = nn.Linear(c.d_model, HK, bias=False)
        self.k_proj = nn.Linear(c.d_model, HK, bias=False)
        self.v_proj = nn.Linear(c.d_model, HK, bias=False)
        self.o_proj = nn.Linear(HK, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fast-transformers' init: PyTorch's nn.Linear default on every projection."""
        default_init_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> MatrixState:
        c = self.config
        V = c.head_dim + (1 if c.normalize else 0)
        return MatrixState(S=torch.zeros(batch_size, c.num_heads, c.head_dim, V, device=device,
                                         dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        phi = _FEATURE_MAPS[c.feature_map]
        q = phi(rearrange(self.q_proj(x), "b t (h k) -> b t h k", h=c.num_heads).to(acc))  # (B, T, H, K)
        k = phi(rearrange(self.k_proj(x), "b t (h k) -> b t h k", h=c.num_heads).to(acc))
        v = rearrange(self.v_proj(x), "b t (h v) -> b t h v", h=c.num_heads).to(acc)  # (B, T, H, V)
        if c.normalize:  # 1. a column of ones accumulates z = sum φ(k)
            v = with_normaliser(v)  # (B, T, H, V+1)
            o, S = gated_delta_rule(q, k, v, scale=1.0, initial_state=st.S, cu_seqlens=cu_seqlens)
            o = normalised(o, c.eps)  # 2. divide by φ(q)·z
        else:
            o, S = gated_delta_rule(q, k, v, initial_state=st.S, cu_seqlens=cu_seqlens)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)").to(x.dtype)), MatrixState(S=S)


class RetNet(Mixer):
    """Multi-scale retention (see module docstring)."""

    config_cls = RetNetConfig
    state_cls = MatrixState

    def __init__(self, config: RetNetConfig):
        super().__init__(config)
        c = config
        HK, HV = c.num_heads * c.head_dim, c.num_heads * c.head_dim * c.value_factor
        self.q_proj = nn.Linear(c.d_model, HK, bias=False)
        self.k_proj = nn.Linear(c.d_model, HK, bias=False)
        self.v_proj = nn.Linear(c.d_model, HV, bias=False)
        self.g_proj = nn.Linear(c.d_model, HV, bias=False)
        self.g_norm = RMSNorm(c.head_dim * c.value_factor, c.norm_eps)
        self.o_proj = nn.Linear(HV, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """torchscale's init: xavier-uniform, gain 2^-2.5 on q, k, v, g and 2^-1 on o; norm weight 1."""
        for proj in (self.q_proj, self.k_proj, self.v_proj, self.g_proj):
            nn.init.xavier_uniform_(proj.weight, gain=2 ** -2.5)
        nn.init.xavier_uniform_(self.o_proj.weight, gain=2 ** -1)
        self.g_norm.reset_parameters()

    def log_decay(self, dtype: torch.dtype = torch.float32, device=None) -> torch.Tensor:
        """The fixed per-head log decays ``log γ_h = log(1 - 2^(-5-h))``, (H,), computed in ``dtype``
        (cached per dtype and device: decoding calls this once per token)."""
        cache = self.__dict__.setdefault("_log_decay", {})
        key = (dtype, torch.device(device) if device is not None else torch.device("cpu"))
        if key not in cache:
            h = torch.arange(self.config.num_heads, dtype=dtype, device=device)
            cache[key] = torch.log1p(-torch.exp2(-5.0 - h))
        return cache[key]

    def init_state(self, batch_size, device=None, dtype=None) -> MatrixState:
        c = self.config
        return MatrixState(S=torch.zeros(batch_size, c.num_heads, c.head_dim, c.head_dim * c.value_factor,
                                         device=device, dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        q = rearrange(self.q_proj(x), "b t (h k) -> b t h k", h=c.num_heads).to(acc)  # (B, T, H, K)
        k = rearrange(self.k_proj(x), "b t (h k) -> b t h k", h=c.num_heads).to(acc)
        v = rearrange(self.v_proj(x), "b t (h v) -> b t h v", h=c.num_heads).to(acc)  # (B, T, H, V)
        log_g = self.log_decay(acc, x.device).expand(*x.shape[:2], c.num_heads)  # (B, T, H)
        o, S = gated_delta_rule(q, k, v, log_g=log_g, initial_state=st.S,
                                cu_seqlens=cu_seqlens)  # k scaled by K^-1/2 via scale
        g = rearrange(self.g_proj(x), "b t (h v) -> b t h v", h=c.num_heads)
        o = self.g_norm(o) * F.silu(g.to(acc))  # group norm per head, swish gate
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)").to(x.dtype)), MatrixState(S=S)
