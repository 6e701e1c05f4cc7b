"""LSSL: the Linear State-Space Layer (Gu et al. 2021, "Combining Recurrent, Convolutional, and
Continuous-time Models with Linear State-Space Layers").

Per channel d (of D), a continuous state space x'(t) = A x(t) + B u(t), y = C x + D u with the
HiPPO-LegS matrices A (N x N, lower triangular) and B, discretised by the bilinear transform with a
learned step dt_d (the recurrence in ``rnnlab.ops.lti``):
    h_t = dA_d h_{t-1} + dB_d x_t,   y_t = C_d · h_t + D_d x_t,   dA = (I - dt/2 A)^-1 (I + dt/2 A)
then GELU and an output GLU (``Linear(D, 2D)`` then GLU), as in rnnlab's ``s4d`` block.

The state is run DENSE: an N x N matrix per channel, not diagonalised. HiPPO-LegS is
diagonalisable in exact arithmetic, but its eigenvector matrix is exponentially ill-conditioned
(entries ~2^N), so a diagonal form loses the matrix in float32 (the S4 paper's observation) — and
small dense states are what LSSL itself ran. Training uses the convolution form (kernel C dA^l dB
by Krylov doubling, FFT); streaming uses the recurrence, with the same (B, D, N) state.

As in the paper: A and B from HiPPO-LegS; log dt per channel starts uniform in [log dt_min,
log dt_max] and is learned; A is fixed by default (the paper's LSSL-fixed; ``learn_A=True``
trains it from the LegS start); C and D are learned. rnnlab differs in: one copy per feature (the
paper's M copies are d_model channels here), the GELU + GLU output of ``s4d``, no dropout.

Init follows the reference (state-spaces/s4 ``src/models/sequence/modules/lssl.py``, init="normal"):
C ~ N(0, 1), D ~ N(0, 1), log dt uniform, the output projection at PyTorch's default. A (when
learned) and log_dt skip weight decay (the reference gives them their own learning rates).

Dimension letters: B batch, T tokens, D model width = channels, N state size per channel.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.lti import bilinear, hippo_legs, lti
from .base import Mixer, MixerConfig, positive, state_batch
from .state import State

__all__ = ["LSSLConfig", "LSSLState", "LSSL"]


@dataclass
class LSSLConfig(MixerConfig):
    d_state: int = 64  # N, the dense state per channel
    dt_min: float = positive(0.001)  # log dt starts uniform in [log dt_min, log dt_max]
    dt_max: float = positive(0.1)  # upper end of that initial range
    learn_A: bool = False  # False: A is the fixed HiPPO-LegS matrix (LSSL-fixed); True: trained from it

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.d_state, int) or self.d_state < 1:
            raise ValueError(f"d_state must be a positive int, got {self.d_state!r}")
        if not self.dt_min <= self.dt_max:
            raise ValueError(f"need dt_min <= dt_max, got dt_min={self.dt_min}, dt_max={self.dt_max}")


@dataclass(frozen=True)
class LSSLState(State):
    h: torch.Tensor  # (B, D, N)


class LSSL(Mixer):
    """Dense HiPPO-LegS state-space layer (see module docstring)."""

    config_cls = LSSLConfig
    state_cls = LSSLState
    step_compiles = False  # the discretisation cache compares data pointers
    no_decay_params = ("A", "log_dt")  # "A" is a buffer unless learn_A

    def __init__(self, config: LSSLConfig):
        super().__init__(config)
        c = config
        D, N = c.d_model, c.d_state
        A, B = hippo_legs(N)
        if c.learn_A:
            self.A = nn.Parameter(A)  # (N, N) HiPPO-LegS start
        else:
            self.register_buffer("A", A)
        self.register_buffer("B", B)
        self.log_dt = nn.Parameter(torch.empty(D))  # (D,) log step per channel
        self.C = nn.Parameter(torch.empty(D, N))
        self.D = nn.Parameter(torch.empty(D))
        self.out_proj = nn.Linear(D, 2 * D)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: A, B from HiPPO-LegS, log dt uniform in [log dt_min, log dt_max],
        C and D ~ N(0, 1), the output projection at PyTorch's default."""
        c = self.config
        with torch.no_grad():
            self.A.copy_(hippo_legs(c.d_state)[0])
            self.log_dt.copy_(torch.rand(c.d_model) * (math.log(c.dt_max) - math.log(c.dt_min)) + math.log(c.dt_min))
            nn.init.normal_(self.C, 0.0, 1.0)
            nn.init.normal_(self.D, 0.0, 1.0)
        self.out_proj.reset_parameters()
        self.__dict__.pop("_cache", None)

    def init_state(self, batch_size, device=None, dtype=None) -> LSSLState:
        c = self.config
        return LSSLState(h=torch.zeros(batch_size, c.d_model, c.d_state, device=device, dtype=dtype or torch.float32))

    def _discretised(self, acc: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """Bilinear discretisation with the learned step per channel. Without autograd (decoding)
        it is reused until a parameter changes: the N x N solves per channel cost more than a token."""
        if torch.is_grad_enabled() and any(p.requires_grad for p in (self.A, self.log_dt)):
            return bilinear(self.A.to(acc), self.B.to(acc), torch.exp(self.log_dt.to(acc)))
        key = tuple((t.data_ptr(), t._version) for t in (self.A, self.B, self.log_dt)) + (acc,)
        cached = self.__dict__.get("_cache")
        if cached is None or cached[0] != key:
            with torch.no_grad():
                cached = (key, bilinear(self.A.to(acc), self.B.to(acc), torch.exp(self.log_dt.to(acc))))
            self.__dict__["_cache"] = cached
        return cached[1]

    def mix(self, x, state, cu_seqlens=None):
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        xf = x.to(acc)
        dA, dB = self._discretised(acc)  # 1. (D, N, N), (D, N)
        # 2. the dense state space: convolution for a sequence, recurrence for one token
        y, h = lti(xf, dA, dB, self.C.to(acc), st.h, cu_seqlens=cu_seqlens)  # (B, T, D)
        # 3. D skip, GELU, output GLU
        y = F.glu(self.out_proj(F.gelu(y + self.D.to(acc) * xf).to(x.dtype)), dim=-1)  # (B, T, D)
        return y, LSSLState(h=h)
