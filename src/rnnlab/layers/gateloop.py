"""GateLoop: linear attention with data-controlled complex transitions.

Katsch 2023, "GateLoop: Fully Data-Controlled Linear Recurrence for Sequence Modeling". Per head,
a complex state ``h_t ∈ C^{K×V}`` and a complex gate per key channel,
``a_t = sigmoid(W_a x_t)^(1/τ) · exp(i · W_θ x_t)`` (a magnitude in (0, 1) and a phase):

* ``h_t = a_t ⊙ h_{t-1} + k_t v_t^T``  (a_t scales and rotates row j of h by its own a_tj)
* ``o_t = Re(h_t^T q_t) / sqrt(K)``, then ``W_o (RMSNorm(o_t) ⊙ swish(W_g x_t))`` per head.

**How it is computed.** With the phase summed from the start of the call, ``Θ_t = θ_1 + ... + θ_t``,
the rotation factors out: ``h_t = e^{iΘ_t} g_t`` where ``g_t`` is a gated linear attention state
with the real decay ``|a_t|`` and the complex key ``k_t e^{-iΘ_t}``. Written over 2K real channels
(real and imaginary parts), keys ``[k cos Θ, -k sin Θ]`` and queries ``[q cos Θ, -q sin Θ]`` give
``q̃·k̃ = q·k cos(Θ_t - Θ_s)``, so the whole layer is one call of the gated delta rule's GLA case
(ops family B) with 2K keys. The state kept between calls is h itself (real and imaginary parts),
so the phases restart at 0 in every call and stay small; they are summed in float64.

rnnlab's layer (the paper fixes the recurrence, not the block) is GLA's block with GateLoop's gate:
q, k, v, output gate and the two gate projections from x; no short convolution; ``τ``
(``gate_logit_normalizer``) as in GLA slows the initial decay. Init: xavier-uniform with gain
2^-2.5 on every projection (as rnnlab's GLA), biases zero, norm weight 1.

Dimension letters: B batch, T tokens, D model width, H heads, K key head dim, V value head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.bounds import check_cu_seqlens
from ..ops.delta import gated_delta_rule
from .base import Mixer, MixerConfig, positive, state_batch
from .common import RMSNorm, reset_norms_, xavier_linears_
from .state import State

__all__ = ["GateLoopConfig", "GateLoopState", "GateLoop"]


@dataclass
class GateLoopConfig(MixerConfig):
    num_heads: int = 4  # H
    gate_logit_normalizer: float = positive(16.0)  # τ: |a| = sigmoid(W_a x)^(1/τ), slow decay at init (as GLA)
    norm_eps: float = positive(1e-5)  # epsilon of the per-head output RMSNorm

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.d_model % self.num_heads:
            raise ValueError(f"num_heads must be a positive int dividing d_model={self.d_model}, got {self.num_heads!r}")
        if not self.gate_logit_normalizer > 0:
            raise ValueError(f"gate_logit_normalizer must be > 0, got {self.gate_logit_normalizer}")


@dataclass(frozen=True)
class GateLoopState(State):
    h: torch.Tensor  # (B, H, 2, K, V): the complex state, real part [:, :, 0] and imaginary part [:, :, 1]


class GateLoop(Mixer):
    """GateLoop layer (see the module docstring)."""

    config_cls = GateLoopConfig
    state_cls = GateLoopState

    def __init__(self, config: GateLoopConfig):
        super().__init__(config)
        c = config
        D = c.d_model
        self.q_proj, self.k_proj, self.v_proj, self.g_proj = (nn.Linear(D, D, bias=False) for _ in range(4))
        self.a_proj = nn.Linear(D, D, bias=True)  # the gate's magnitude (logits)
        self.theta_proj = nn.Linear(D, D, bias=False)  # the gate's phase (radians)
        self.g_norm = RMSNorm(D // c.num_heads, c.norm_eps)
        self.o_proj = nn.Linear(D, D, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xavier-uniform (gain 2^-2.5) projections, zero biases, norm weight 1."""
        xavier_linears_(self, 2 ** -2.5)
        reset_norms_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> GateLoopState:
        c = self.config
        K = c.d_model // c.num_heads
        return GateLoopState(h=torch.zeros(batch_size, c.num_heads, 2, K, K, device=device, dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        K = c.d_model // c.num_heads
        h0 = (state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)).h.to(acc)  # (B|N, H, 2, K, V)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        q, k, v = heads(self.q_proj(x)), heads(self.k_proj(x)), heads(self.v_proj(x))  # (B, T, H, K)
        log_mag = F.logsigmoid(heads(self.a_proj(x))) / c.gate_logit_normalizer  # (B, T, H, K) log |a_t|
        # 1. phases summed from the start of the call (of each sequence, when packed), in float64
        phase = _phase_sums(heads(self.theta_proj(x)).double(), cu_seqlens)  # (B, T, H, K)
        cos, sin = phase.cos().to(acc), phase.sin().to(acc)
        # 2. the rotating frame: keys and queries over 2K real channels, decay |a| on both halves
        k2 = torch.cat([k * cos, -k * sin], dim=-1)  # (B, T, H, 2K)
        q2 = torch.cat([q * cos, -q * sin], dim=-1)
        g0 = rearrange(h0, "b h c k v -> b h (c k) v")  # Θ = 0 at the start: g_0 = h_0
        o, g = gated_delta_rule(q2, k2, v, log_g=torch.cat([log_mag, log_mag], dim=-1), scale=K ** -0.5,
                                initial_state=g0, cu_seqlens=cu_seqlens)  # (B, T, H, V), (B|N, H, 2K, V)
        # 3. back to the fixed frame: h = e^{iΘ_end} g, Θ_end the phase after each row's last token
        g = rearrange(g, "b h (c k) v -> b h c k v", c=2)
        ce, se = _end_phase(cos, sin, cu_seqlens)  # (B|N, H, K, 1) each
        h = torch.stack([ce * g[:, :, 0] - se * g[:, :, 1], se * g[:, :, 0] + ce * g[:, :, 1]], dim=2)
        # 4. per-head norm, output gate, projection
        o = self.g_norm(o) * F.silu(heads(self.g_proj(x)))  # (B, T, H, V)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)").to(x.dtype)), GateLoopState(h=h)


def _phase_sums(theta: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """Running sums of ``theta`` (B, T, H, K) along T, restarting at each packed sequence (each
    sequence summed on its own, so nothing, not even a NaN, crosses a boundary)."""
    if cu_seqlens is None:
        return theta.cumsum(1)
    cu = check_cu_seqlens(cu_seqlens, theta.shape[0], theta.shape[1])
    return torch.cat([theta[:, a:b].cumsum(1) for a, b in zip(cu, cu[1:])], dim=1)


def _end_phase(cos: torch.Tensor, sin: torch.Tensor, cu_seqlens: torch.Tensor | None):
    """cos and sin of the phase after each row's last token, (B|N, H, K, 1); an empty packed
    sequence has turned by nothing (cos 1, sin 0)."""
    if cu_seqlens is None:
        return cos[:, -1, ..., None], sin[:, -1, ..., None]
    cu = cu_seqlens.to(cos.device)
    last = (cu[1:] - 1).clamp(min=0)  # (N,)
    empty = (cu[1:] == cu[:-1])[:, None, None, None]
    ce = torch.where(empty, torch.ones_like(cos[0, last, ..., None]), cos[0, last, ..., None])
    se = torch.where(empty, torch.zeros_like(sin[0, last, ..., None]), sin[0, last, ..., None])
    return ce, se
