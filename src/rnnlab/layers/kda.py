"""Kimi Delta Attention (KDA): the gated delta rule with a decay per key channel.

Kimi Team 2025, "Kimi Linear: An Expressive, Efficient Attention Architecture" (arXiv:2510.26692).
Per head, with a decay vector ``a_t`` over the K key channels:

    S_t = (I - b_t k_t k_t^T) Diag(a_t) S_{t-1} + b_t k_t v_t^T,     o_t = S_t^T q_t / sqrt(K)
    log a_t = -exp(A_log) * softplus(W_f2 W_f1 x_t + dt_bias)        (A_log per head, dt_bias per channel)

It is Gated DeltaNet (:mod:`rnnlab.layers.deltanet`, whose block this layer reuses: q, k, v
projections through short causal convolutions with SiLU, q and k L2-normalised per head, ``b =
sigmoid(W_b x)``, or ``2 sigmoid(W_b x)`` with ``allow_neg_eigval``) with the scalar decay per head
replaced by a vector one, as in flash-linear-attention's ``KimiDeltaAttention`` layer: the decay's
input comes from a low-rank projection (D -> R -> H·K, R = V by default, no biases), and the output
is ``RMSNorm(o) * sigmoid(W_g2 W_g1 x + b_g)`` per head, the gate also low rank (D -> R -> H·V, a
bias on the second factor). The op is ``rnnlab.ops.gated_delta_rule`` with ``log_g`` (B, T, H, K).

Init follows flash-linear-attention's KDA model init (the layer has none of its own): every
projection and short-convolution weight N(0, 0.02), biases zero, norm weights 1; ``A = exp(A_log)
~ U(1, 16)`` per head and ``softplus(dt_bias)`` log-uniform in [0.001, 0.1] per channel, both
skipping weight decay.

rnnlab differs from the reference in: no fused kernels; head sizes follow rnnlab's DeltaNet family
(K = d_model / num_heads; fla fixes head_dim = 128); no grouped value heads (``num_v_heads``: one
value head per key head); no ``lower_bound`` / ``safe_gate`` option (the bounded gate
``lower_bound * sigmoid(...)`` of fla's TensorCore kernel); no depth-scaled ``o_proj`` (an option of
fla's model init); the conv states are kept per stream in the state object.

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim,
R rank of the gate projections.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from .base import at_least
from .common import default_init_, normal_linears_
from .deltanet import DeltaNet, GatedDeltaNetConfig, init_decay_

__all__ = ["KDAConfig", "KDA"]


@dataclass
class KDAConfig(GatedDeltaNetConfig):
    expand_v: float = 1.0  # V = expand_v * K (the reference's: no value expansion)
    gate_low_rank_dim: int | None = at_least(1, None)  # R of the decay and output-gate projections; None = V
    init_std: float = 0.02  # std of the N(0, std) init of projections and short convolutions

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.gate_low_rank_dim is None:
            self.gate_low_rank_dim = self.head_v_dim
        if not isinstance(self.gate_low_rank_dim, int) or self.gate_low_rank_dim < 1:
            raise ValueError(f"gate_low_rank_dim must be a positive int or None, got {self.gate_low_rank_dim!r}")
        if not 0 < self.init_std < float("inf"):
            raise ValueError(f"init_std must be a finite number > 0, got {self.init_std!r}")
        if not 0 < self.A_init_range[0] <= self.A_init_range[1]:
            raise ValueError(f"A_init_range must be (low, high) with 0 < low <= high, got {self.A_init_range}")


class KDA(DeltaNet):
    """Kimi Delta Attention layer (see module docstring)."""

    config_cls = KDAConfig

    no_decay_params = ("A_log", "dt_bias")

    def _build(self, c: KDAConfig) -> None:
        super()._build(c)
        HK, HV, R = c.num_heads * c.head_dim, c.num_heads * c.head_v_dim, c.gate_low_rank_dim
        self.f_proj = nn.Sequential(nn.Linear(c.d_model, R, bias=False),
                                    nn.Linear(R, HK, bias=False))  # decay input, low rank
        self.g_proj = nn.Sequential(nn.Linear(c.d_model, R, bias=False),
                                    nn.Linear(R, HV, bias=True))  # output gate, low rank
        self.A_log = nn.Parameter(torch.empty(c.num_heads))  # (H,) decay rate A = exp(A_log)
        self.dt_bias = nn.Parameter(torch.empty(HK))  # (H*K,) softplus(dt_bias) = initial step per channel

    def reset_parameters(self) -> None:
        """fla's KDA model init: projections and convolution weights N(0, init_std), biases zero,
        norm weights 1; A ~ U(A_init_range), softplus(dt_bias) log-uniform in [dt_min, dt_max]."""
        c = self.config
        default_init_(self)  # norms to the identity
        normal_linears_(self, c.init_std)
        with torch.no_grad():
            for conv in (self.q_conv, self.k_conv, self.v_conv):
                if conv.conv is not None:  # conv_size = 0: no convolution
                    nn.init.normal_(conv.conv.weight, 0.0, c.init_std)
        init_decay_(self.A_log, self.dt_bias, c)

    def decay(self, x):
        """log a_t (B, T, H, K): ``-exp(A_log) * softplus(W_f2 W_f1 x + dt_bias)``."""
        acc = torch.promote_types(x.dtype, torch.float32)
        f = self.f_proj(x).to(acc) + self.dt_bias.to(acc)  # (B, T, H*K)
        f = rearrange(f, "b t (h k) -> b t h k", h=self.config.num_heads)  # (B, T, H, K)
        return -self.A_log.to(acc).exp()[:, None] * F.softplus(f)

    def output(self, o, x):
        """``RMSNorm(o) * sigmoid(W_g2 W_g1 x + b_g)`` per head: (B, T, H, V)."""
        gate = rearrange(self.g_proj(x), "b t (h v) -> b t h v", h=self.config.num_heads)  # (B, T, H, V)
        return self.o_norm(o) * torch.sigmoid(gate.to(o.dtype))
