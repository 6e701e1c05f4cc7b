"""LMU: the Legendre Memory Unit's fixed linear memory, as LMUFormer runs it in parallel.

Voelker, Kajić, Eliasmith 2019, "Legendre Memory Units: Continuous-Time Representation in Recurrent
Neural Networks"; Chilkuri & Eliasmith 2021 (the parallel, convolutional LMU); Liu et al. 2024,
"LMUFormer: Low Complexity Yet Powerful Spiking Model With Legendre Memory Units". Per token:

    u_t = ReLU(W_u x_t),   m_t = Ā m_{t-1} + B̄ u_t,   y_t = W_o ReLU(W_h [m_t; x_t])

where (A, B) is the Legendre delay system of order N and window θ (``rnnlab.ops.lti.legendre_delay``:
the memory holds the last θ tokens of u in N shifted Legendre coefficients) and (Ā, B̄) its
zero-order hold with a step of one token. Nothing in the memory is learned: the state space is
fixed and the same for each of the P memory channels; only the projections are trained.

The memory runs on ``rnnlab.ops.lti`` (the dense LTI family of ``lssl``) with ``C=None``, which
returns the states themselves: a causal convolution with the memory's impulse response (by FFT, in
time-chunks) for a sequence, one step of the recurrence for one token; the state is m (B, P, N).

Defaults follow LMUFormer's reference (``src/blocks/lmu.py`` and ``lmu_cell.py``, ``LMUFFTCell``):
one memory channel (P = 1) of order N = d_model (its ``memory_size = dim``), θ = 128 (its
``theta = seq_len = 128``, the length it was trained on), hidden width d_model, ReLU on u and on
the hidden layer; PyTorch's default init of every projection, as there. rnnlab differs in: the
output projection is a Linear without the reference's BatchNorm (a batch statistic over time
breaks streaming; the model's norms take its place); no spiking variant; the discretised matrices
are computed in float64 (as the reference does with scipy) and cast to the accumulation dtype.

Dimension letters: B batch, T tokens, D model width, P memory channels, N memory order.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.lti import legendre_delay, lti, zoh
from .base import Mixer, MixerConfig, state_batch
from .common import default_init_
from .state import State

__all__ = ["LMUConfig", "LMUState", "LMU"]


@dataclass
class LMUConfig(MixerConfig):
    order: int | None = None  # N, Legendre coefficients per memory channel; None = d_model (LMUFormer)
    theta: float = 128.0  # θ, the window the memory holds, in tokens (LMUFormer: 128)
    memory_dim: int = 1  # P, input channels u_t with a memory each (LMUFormer: 1)
    d_hidden: int | None = None  # width of the hidden layer ReLU(W_h [m; x]); None = d_model

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.order is None:
            self.order = self.d_model
        if not isinstance(self.order, int) or self.order < 1:
            raise ValueError(f"order must be a positive int (or None for d_model), got {self.order!r}")
        if not isinstance(self.theta, (int, float)) or not self.theta > 0:
            raise ValueError(f"theta must be a number > 0 (the window in tokens), got {self.theta!r}")
        if not isinstance(self.memory_dim, int) or self.memory_dim < 1:
            raise ValueError(f"memory_dim must be a positive int, got {self.memory_dim!r}")
        if self.d_hidden is None:
            self.d_hidden = self.d_model
        if not isinstance(self.d_hidden, int) or self.d_hidden < 1:
            raise ValueError(f"d_hidden must be a positive int (or None for d_model), got {self.d_hidden!r}")


@dataclass(frozen=True)
class LMUState(State):
    m: torch.Tensor  # (B, P, N) the Legendre memory


class LMU(Mixer):
    """Legendre Memory Unit layer (see the module docstring)."""

    config_cls = LMUConfig
    state_cls = LMUState

    def __init__(self, config: LMUConfig):
        super().__init__(config)
        c = config
        self.u_proj = nn.Linear(c.d_model, c.memory_dim)  # W_u
        self.h_proj = nn.Linear(c.memory_dim * c.order + c.d_model, c.d_hidden)  # W_h on [m; x]
        self.out_proj = nn.Linear(c.d_hidden, c.d_model)  # W_o
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """LMUFormer's init: PyTorch's default for every projection (kaiming-uniform, uniform bias)."""
        default_init_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> LMUState:
        c = self.config
        return LMUState(m=torch.zeros(batch_size, c.memory_dim, c.order, device=device, dtype=dtype or torch.float32))

    def discretised(self, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
        """(Ā (P, N, N), B̄ (P, N)): the zero-order hold of the Legendre delay system, one token a
        step, computed once in float64 per dtype and device (they depend on the config only)."""
        c = self.config
        cache = self.__dict__.setdefault("_discretised", {})
        key = (dtype, str(device))
        if key not in cache:
            A, B = legendre_delay(c.order, float(c.theta), torch.float64)
            dA, dB = zoh(A, B, torch.ones(1, dtype=torch.float64))  # (1, N, N), (1, N)
            P = c.memory_dim  # the same memory for every channel
            cache[key] = (dA.expand(P, -1, -1).to(device, dtype), dB.expand(P, -1).to(device, dtype))
        return cache[key]

    def mix(self, x, state, cu_seqlens=None):
        acc = torch.promote_types(x.dtype, torch.float32)
        m0 = (state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)).m.to(acc)
        dA, dB = self.discretised(acc, x.device)
        # 1. the memory's input
        u = F.relu(self.u_proj(x)).to(acc)  # (B, T, P)
        # 2. the fixed Legendre memory: its states themselves (C=None)
        m, m_last = lti(u, dA, dB, None, m0, cu_seqlens=cu_seqlens)  # (B, T, P, N), (B, P, N)
        # 3. the hidden layer on [m; x], the output projection
        mx = torch.cat([rearrange(m, "b t p n -> b t (p n)").to(x.dtype), x], dim=-1)  # (B, T, P·N + D)
        y = self.out_proj(F.relu(self.h_proj(mx)))  # (B, T, D)
        return y, LMUState(m=m_last)
