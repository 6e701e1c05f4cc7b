"""DeltaNet and Gated DeltaNet: linear attention whose state is edited by the delta rule.

* DeltaNet — Schlag et al. 2021, "Linear Transformers Are Secretly Fast Weight Programmers";
  parallel form of Yang et al. 2024, "Parallelizing Linear Transformers with the Delta Rule over
  Sequence Length":  ``S_t = (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T``, ``o_t = S_t^T q_t``.
* Gated DeltaNet — Yang et al. 2024, "Gated Delta Networks: Improving Mamba2 with Delta Rule":
  ``S_t = a_t (I - b_t k_t k_t^T) S_{t-1} + b_t k_t v_t^T`` with a Mamba-2 style scalar decay
  ``a_t = exp(-exp(A_log) * softplus(W_a x_t + dt_bias))`` per head.

Both follow flash-linear-attention's reference layers: q, k, v projections, each through a short
causal depthwise convolution (width 4; ``conv_size = 0``: none, as the reference's
``use_short_conv=False``) with SiLU; q and k L2-normalised per head; ``b = sigmoid(W_b x)``;
per-head RMSNorm on the output, gated by ``silu(W_g x)`` in Gated DeltaNet.
``allow_neg_eigval=True`` uses ``b = 2 sigmoid(W_b x)`` in (0, 2), so the transition ``I - b k k^T``
can have the eigenvalue ``1 - b < 0`` along k (Grazzi et al. 2024, "Unlocking State-Tracking in
Linear RNNs Through Negative Eigenvalues"): needed to solve parity and other state-tracking tasks.

rnnlab differs from the reference in: no fused kernels (the op is ``rnnlab.ops.gated_delta_rule``),
and the conv states are kept per stream in the state object.

Init follows flash-linear-attention's layer init (``_initialize_weights`` of its DeltaNet and
GatedDeltaNet layers): xavier-uniform with gain 2^-2.5 on every projection, the short convolutions
at PyTorch's Conv1d default, norm weights 1; Gated DeltaNet's ``A_log`` (A ~ U(A_init_range)) and
``dt_bias`` (softplus(dt_bias) log-uniform in [dt_min, dt_max]) as there, and like there they skip
weight decay. (fla dropped the layer init in March 2025 for its models' N(0, 0.02).)

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.delta import gated_delta_rule
from .base import Mixer, MixerConfig, check_init_range, positive, state_batch
from .common import (GatedRMSNorm, RMSNorm, ShortConv, default_init_, inverse_softplus, l2_normalize, log_uniform_dt,
                     split_heads, xavier_linears_)
from .state import State

__all__ = ["DeltaNetConfig", "GatedDeltaNetConfig", "DeltaNetState", "DeltaNet", "GatedDeltaNet", "init_decay_"]


@dataclass
class DeltaNetConfig(MixerConfig):
    num_heads: int = 4  # heads H
    head_dim: int | None = None  # K; None = d_model // num_heads
    expand_v: float = 1.0  # V = expand_v * K
    conv_size: int = 4  # width W of the short causal convolutions on q, k, v (0 = none: SiLU on the projections)
    allow_neg_eigval: bool = False  # b in (0, 2) instead of (0, 1): negative eigenvalues
    norm_eps: float = positive(1e-5)  # epsilon of the output RMSNorm
    head_v_dim: int = 0  # derived: V

    def __post_init__(self) -> None:
        super().__post_init__()
        self.head_dim = split_heads(self.d_model, self.num_heads, self.head_dim)
        self.head_v_dim = int(self.head_dim * self.expand_v)
        if self.head_v_dim < 1:
            raise ValueError(f"expand_v={self.expand_v} must give V = int(expand_v · head_dim) >= 1")


@dataclass
class GatedDeltaNetConfig(DeltaNetConfig):
    expand_v: float = 2.0  # V = expand_v * K (the reference's value expansion)
    A_init_range: tuple[float, float] = (1.0, 16.0)  # A ~ U(range); the decay rate is exp(A_log) = A
    dt_min: float = positive(0.001)  # softplus(dt_bias) is initialised log-uniformly in [dt_min, dt_max]
    dt_max: float = positive(0.1)  # upper end of that initial range
    dt_init_floor: float = 1e-4  # lower clamp of that initial dt

    def __post_init__(self) -> None:
        super().__post_init__()
        check_init_range("A_init_range", self.A_init_range)


@dataclass(frozen=True)
class DeltaNetState(State):
    S: torch.Tensor  # (B, H, K, V) the fast-weight matrix
    conv_q: torch.Tensor  # (B, W-1, H*K) last inputs of the q convolution
    conv_k: torch.Tensor  # (B, W-1, H*K)
    conv_v: torch.Tensor  # (B, W-1, H*V)


def init_decay_(A_log: nn.Parameter, dt_bias: nn.Parameter, c: GatedDeltaNetConfig) -> None:
    """Mamba-2's decay init, in place: A = exp(A_log) ~ U(c.A_init_range) and softplus(dt_bias)
    log-uniform in [c.dt_min, c.dt_max], floored at c.dt_init_floor (any shapes of A_log, dt_bias)."""
    with torch.no_grad():
        A_log.copy_(torch.log(torch.empty(A_log.shape).uniform_(*c.A_init_range)))
        dt_bias.copy_(inverse_softplus(log_uniform_dt(dt_bias.shape, c.dt_min, c.dt_max, c.dt_init_floor)))


class DeltaNet(Mixer):
    """DeltaNet layer (see module docstring)."""

    config_cls = DeltaNetConfig
    state_cls = DeltaNetState

    def __init__(self, config: DeltaNetConfig):
        super().__init__(config)
        self._build(config)
        self.reset_parameters()

    def _build(self, c: DeltaNetConfig) -> None:
        """Create the modules and parameters (subclasses add theirs, then ``__init__`` initialises all)."""
        HK, HV = c.num_heads * c.head_dim, c.num_heads * c.head_v_dim
        self.q_proj = nn.Linear(c.d_model, HK, bias=False)
        self.k_proj = nn.Linear(c.d_model, HK, bias=False)
        self.v_proj = nn.Linear(c.d_model, HV, bias=False)
        self.b_proj = nn.Linear(c.d_model, c.num_heads, bias=False)
        self.q_conv = ShortConv(HK, c.conv_size)
        self.k_conv = ShortConv(HK, c.conv_size)
        self.v_conv = ShortConv(HV, c.conv_size)
        self.o_norm = RMSNorm(c.head_v_dim, c.norm_eps)
        self.o_proj = nn.Linear(HV, c.d_model, bias=False)

    def reset_parameters(self) -> None:
        """fla's init: xavier-uniform (gain 2^-2.5) projections, default convs, norm weight 1."""
        default_init_(self)  # convolutions and norms
        xavier_linears_(self, 2 ** -2.5)

    def init_state(self, batch_size, device=None, dtype=None) -> DeltaNetState:
        c, dt = self.config, dtype or torch.float32
        return DeltaNetState(
            S=torch.zeros(batch_size, c.num_heads, c.head_dim, c.head_v_dim, device=device, dtype=dt),
            conv_q=self.q_conv.init_state(batch_size, device, dt), conv_k=self.k_conv.init_state(batch_size, device, dt),
            conv_v=self.v_conv.init_state(batch_size, device, dt))

    def decay(self, x: torch.Tensor) -> torch.Tensor | None:
        """log a_t (B, T, H), or None for no decay (DeltaNet)."""
        return None

    def output(self, o: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """Per-head output norm: o (B, T, H, V) -> (B, T, H, V)."""
        return self.o_norm(o)

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, torch.promote_types(x.dtype, torch.float32))
        # 1. projections through the short convolutions (SiLU)
        q, cq = self.q_conv(self.q_proj(x), st.conv_q, cu_seqlens)  # (B, T, H*K)
        k, ck = self.k_conv(self.k_proj(x), st.conv_k, cu_seqlens)
        v, cv = self.v_conv(self.v_proj(x), st.conv_v, cu_seqlens)  # (B, T, H*V)
        acc = torch.promote_types(x.dtype, torch.float32)
        q = l2_normalize(rearrange(q, "b t (h k) -> b t h k", h=c.num_heads).to(acc))  # (B, T, H, K)
        k = l2_normalize(rearrange(k, "b t (h k) -> b t h k", h=c.num_heads).to(acc))
        v = rearrange(v, "b t (h v) -> b t h v", h=c.num_heads).to(acc)  # (B, T, H, V)
        # 2. writing strength b in (0, 1), or (0, 2) with negative eigenvalues
        beta = torch.sigmoid(self.b_proj(x).to(acc)) * (2.0 if c.allow_neg_eigval else 1.0)  # (B, T, H)
        # 3. the delta rule (decayed in Gated DeltaNet)
        log_g = self.decay(x)
        o, S = gated_delta_rule(q, k, v, log_g=None if log_g is None else log_g.to(acc), beta=beta,
                                initial_state=st.S, cu_seqlens=cu_seqlens)
        # 4. output norm (and gate), projection
        y = self.o_proj(rearrange(self.output(o, x), "b t h v -> b t (h v)").to(x.dtype))  # (B, T, D)
        return y, DeltaNetState(S=S, conv_q=cq, conv_k=ck, conv_v=cv)


class GatedDeltaNet(DeltaNet):
    """Gated DeltaNet layer (see module docstring)."""

    config_cls = GatedDeltaNetConfig

    no_decay_params = ("A_log", "dt_bias")

    def _build(self, c: GatedDeltaNetConfig) -> None:
        super()._build(c)
        self.a_proj = nn.Linear(c.d_model, c.num_heads, bias=False)
        self.g_proj = nn.Linear(c.d_model, c.num_heads * c.head_v_dim, bias=False)
        self.o_norm = GatedRMSNorm(c.head_v_dim, c.norm_eps)
        self.A_log = nn.Parameter(torch.empty(c.num_heads))  # (H,) decay rate A = exp(A_log)
        self.dt_bias = nn.Parameter(torch.empty(c.num_heads))  # (H,) softplus(dt_bias) = initial step

    def reset_parameters(self) -> None:
        """fla's init (see :meth:`DeltaNet.reset_parameters`), then A ~ U(A_init_range) and
        softplus(dt_bias) log-uniform in [dt_min, dt_max] (floored at dt_init_floor)."""
        super().reset_parameters()
        init_decay_(self.A_log, self.dt_bias, self.config)

    def decay(self, x):
        acc = torch.promote_types(x.dtype, torch.float32)
        return -self.A_log.to(acc).exp() * F.softplus(self.a_proj(x).to(acc) + self.dt_bias.to(acc))  # (B, T, H)

    def output(self, o, x):
        gate = rearrange(self.g_proj(x), "b t (h v) -> b t h v", h=self.config.num_heads)  # (B, T, H, V)
        return self.o_norm(o, gate.to(o.dtype))
