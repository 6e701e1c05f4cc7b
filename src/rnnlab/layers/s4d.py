"""S4D: diagonal state-space layers (Gu et al. 2022, "On the Parameterization and Initialization of
Diagonal State Space Models").

Per channel d (of D), with N/2 complex states and a learned step dt_d, zero-order hold:
    h_t = exp(dt A) ⊙ h_{t-1} + (exp(dt A) - 1) / A ⊙ x_t,      y_t = 2 Re(C · h_t) + D_skip x_t
then GELU and an output GLU (``Linear(D, 2D)`` then GLU), as in the reference S4D block. A is the
HiPPO-derived diagonal: S4D-Lin ``A_n = -1/2 + iπn`` (default) or S4D-Real ``A_n = -(n+1)``;
``log dt`` starts uniform in [log 1e-3, log 1e-1]; B is folded into C (the reference's minimal S4D).
Runs on ``rnnlab.ops.lti`` with a complex diagonal: training convolves with the Vandermonde
kernel by FFT, as the reference does, and one token at a time is one step of the recurrence, so
the layer also streams with a constant (B, D, N/2) state.

rnnlab differs from the reference in: the convolution also takes and returns the state; no dropout. (``lssl`` is the dense HiPPO-LegS
layer of Gu et al. 2021.)

Init follows the reference (state-spaces/s4 ``models/s4/s4d.py``): log dt uniform, A as above,
C ~ complex N(0, 1) (real and imaginary parts N(0, 1/2)), D ~ N(0, 1), the output projection at
PyTorch's default (the reference's 1x1 Conv1d has the same init). As there (``register(...)`` with
weight_decay 0), log_dt, log_A_real and A_imag skip weight decay; C, D and the projection do not.

Dimension letters: B batch, T tokens, D model width = channels, N state size (N/2 complex).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lti import lti
from .base import Mixer, MixerConfig, positive, state_batch
from .state import State

__all__ = ["S4DConfig", "S4DState", "S4D"]


@dataclass
class S4DConfig(MixerConfig):
    d_state: int = 64  # N (N/2 complex conjugate pairs kept)
    init: str = "lin"  # "lin" (S4D-Lin: -1/2 + iπn) or "real" (S4D-Real: -(n+1))
    dt_min: float = positive(0.001)  # log dt starts uniform in [log dt_min, log dt_max]
    dt_max: float = positive(0.1)  # upper end of that initial range

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_state < 2 or self.d_state % 2:
            raise ValueError(f"d_state must be an even number >= 2, got {self.d_state}")
        if self.init not in ("lin", "real"):
            raise ValueError(f"init must be 'lin' or 'real', got {self.init!r}")


@dataclass(frozen=True)
class S4DState(State):
    h: torch.Tensor  # (B, D, N/2) complex


class S4D(Mixer):
    """Diagonal SSM layer (see module docstring)."""

    config_cls = S4DConfig
    state_cls = S4DState
    no_decay_params = ("log_dt", "log_A_real", "A_imag")

    def __init__(self, config: S4DConfig):
        super().__init__(config)
        c = config
        D, N2 = c.d_model, c.d_state // 2
        self.log_dt = nn.Parameter(torch.empty(D))  # (D,) log step per channel
        self.log_A_real = nn.Parameter(torch.empty(D, N2))  # A = -exp(log_A_real) + i A_imag
        self.A_imag = nn.Parameter(torch.empty(D, N2), requires_grad=c.init == "lin")
        self.C_re = nn.Parameter(torch.empty(D, N2))
        self.C_im = nn.Parameter(torch.empty(D, N2))
        self.D = nn.Parameter(torch.empty(D))
        self.out_proj = nn.Linear(D, 2 * D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init (see the module docstring); S4D-Lin or S4D-Real A."""
        c = self.config
        D, N2 = c.d_model, c.d_state // 2
        with torch.no_grad():
            self.log_dt.copy_(torch.rand(D) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
            n = torch.arange(N2, dtype=torch.float32)
            if c.init == "lin":
                re, im = torch.full((D, N2), 0.5), math.pi * n.repeat(D, 1)
            else:
                re, im = (n + 1).repeat(D, 1), torch.zeros(D, N2)
            self.log_A_real.copy_(torch.log(re))
            self.A_imag.copy_(im)
            nn.init.normal_(self.C_re, 0.0, 0.5 ** 0.5)
            nn.init.normal_(self.C_im, 0.0, 0.5 ** 0.5)
            nn.init.normal_(self.D, 0.0, 1.0)
        self.out_proj.reset_parameters()

    def init_state(self, batch_size, device=None, dtype=None) -> S4DState:
        cdt = torch.complex128 if dtype == torch.float64 else torch.complex64
        return S4DState(h=torch.zeros(batch_size, self.config.d_model, self.config.d_state // 2,
                                      device=device, dtype=cdt))

    def mix(self, x, state, cu_seqlens=None):
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        xf = x.to(acc)
        # 1. zero-order hold: dA = exp(dt A), dB = (dA - 1) / A
        A = torch.complex(-torch.exp(self.log_A_real.to(acc)), self.A_imag.to(acc))  # (D, N/2)
        dtA = torch.exp(self.log_dt.to(acc))[:, None] * A
        dA, dB = torch.exp(dtA), (torch.exp(dtA) - 1) / A
        # 2. the complex diagonal state space: convolution for a sequence, recurrence for one token
        C = torch.complex(self.C_re.to(acc), self.C_im.to(acc))  # (D, N/2)
        y, h_last = lti(xf, dA, dB, C, st.h, cu_seqlens=cu_seqlens)  # (B, T, D) complex
        # 3. y = 2 Re(C h) + D x, GELU, output GLU
        y = 2 * y.real + self.D.to(acc) * xf
        y = F.glu(self.out_proj(F.gelu(y).to(x.dtype)), dim=-1)  # (B, T, D)
        return y, S4DState(h=h_last)
