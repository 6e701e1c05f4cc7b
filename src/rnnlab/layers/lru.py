"""LRU: the Linear Recurrent Unit (Orvieto et al. 2023, "Resurrecting Recurrent Neural Networks
for Long Sequences").

A complex diagonal recurrence, per state index n:
    h_t = λ ⊙ h_{t-1} + γ ⊙ (B x_t),     y_t = Re(C h_t) + D ⊙ x_t
with the exponential parametrisation ``λ = exp(-exp(ν_log) + i·exp(θ_log))`` (|λ| < 1 always), the
ring initialisation (|λ| uniform on the ring [r_min, r_max] by area, phase uniform in
[0, max_phase]) and the normalisation ``γ = sqrt(1 - |λ|²)`` (stored as γ_log, trained, as in the
paper). Runs on ``rnnlab.ops.linear_scan`` with complex values.

rnnlab differs from the paper in: the MLP/GLU that follows the recurrence in the paper's block is the
LM block's MLP here; B and C are stored as real and imaginary parts (plain real parameters).

Init follows the paper's reference code (its appendix ``init_lru_parameters``): ring init of ν and
θ, γ = sqrt(1 - |λ|²), B ~ N(0, 1/(2D)), C ~ N(0, 1/N) (real and imaginary parts), D ~ N(0, 1).
ν, θ and γ (the eigenvalues and their normaliser) skip weight decay; B, C, D are ordinary weights.

Dimension letters: B batch, T tokens, D model width, N complex state size.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import nn

from ..ops.scan import linear_scan
from .base import Mixer, MixerConfig, at_least, state_batch
from .state import State

__all__ = ["LRUConfig", "LRUState", "LRU"]


@dataclass
class LRUConfig(MixerConfig):
    d_state: int | None = at_least(1, None)  # N complex states; None = d_model
    r_min: float = 0.9  # ring initialisation: smallest |λ|
    r_max: float = 0.999  # largest |λ|
    max_phase: float = at_least(0, 2 * math.pi)  # phases of λ start uniform in [0, max_phase]

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_state is None:
            self.d_state = self.d_model
        if not 0.0 <= self.r_min < self.r_max < 1.0:
            raise ValueError(f"need 0 <= r_min < r_max < 1, got r_min={self.r_min}, r_max={self.r_max}")


@dataclass(frozen=True)
class LRUState(State):
    h: torch.Tensor  # (B, N) complex


class LRU(Mixer):
    """Linear Recurrent Unit (see module docstring)."""

    config_cls = LRUConfig
    state_cls = LRUState
    no_decay_params = ("nu_log", "theta_log", "gamma_log")

    def __init__(self, config: LRUConfig):
        super().__init__(config)
        c = config
        N, D = c.d_state, c.d_model
        self.nu_log = nn.Parameter(torch.empty(N))  # (N,) |λ| = exp(-exp(nu_log))
        self.theta_log = nn.Parameter(torch.empty(N))  # (N,) arg λ = exp(theta_log)
        self.gamma_log = nn.Parameter(torch.empty(N))  # (N,) input normaliser γ = exp(gamma_log)
        self.B_re = nn.Parameter(torch.empty(N, D))
        self.B_im = nn.Parameter(torch.empty(N, D))
        self.C_re = nn.Parameter(torch.empty(D, N))
        self.C_im = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.empty(D))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The paper's init: ring init of λ (|λ| in [r_min, r_max] uniform by area, phase uniform in
        [0, max_phase]), γ = sqrt(1 - |λ|²), B ~ N(0, 1/(2D)), C ~ N(0, 1/N), D ~ N(0, 1)."""
        c = self.config
        N, D = c.d_state, c.d_model
        with torch.no_grad():
            u1, u2 = torch.rand(N), torch.rand(N)
            nu_log = torch.log(-0.5 * torch.log(u1 * (c.r_max ** 2 - c.r_min ** 2) + c.r_min ** 2))
            self.nu_log.copy_(nu_log)
            self.theta_log.copy_(torch.log(c.max_phase * u2 + 1e-8))
            self.gamma_log.copy_(torch.log(torch.sqrt(1 - torch.exp(-torch.exp(nu_log)) ** 2)))
            for w in (self.B_re, self.B_im):
                nn.init.normal_(w, 0.0, 1 / math.sqrt(2 * D))
            for w in (self.C_re, self.C_im):
                nn.init.normal_(w, 0.0, 1 / math.sqrt(N))
            nn.init.normal_(self.D, 0.0, 1.0)

    def init_state(self, batch_size, device=None, dtype=None) -> LRUState:
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        return LRUState(h=torch.zeros(batch_size, self.config.d_state, device=device, dtype=cdt))

    def mix(self, x, state, cu_seqlens=None):
        acc = torch.promote_types(x.dtype, torch.float32)
        cdt = torch.complex128 if acc == torch.float64 else torch.complex64
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        xf = x.to(acc)
        lam = torch.exp(torch.complex(-torch.exp(self.nu_log.to(acc)), torch.exp(self.theta_log.to(acc))))  # (N,)
        Bm = torch.complex(self.B_re.to(acc), self.B_im.to(acc)) * torch.exp(self.gamma_log.to(acc))[:, None]
        Bx = xf.to(cdt) @ Bm.T  # (B, T, N): γ ⊙ (B x_t)
        h, h_last = linear_scan(lam.expand_as(Bx), Bx, st.h.to(cdt), cu_seqlens=cu_seqlens)  # (B, T, N)
        y = (h @ torch.complex(self.C_re.to(acc), self.C_im.to(acc)).T).real + self.D.to(acc) * xf  # (B, T, D)
        return y.to(x.dtype), LRUState(h=h_last)
