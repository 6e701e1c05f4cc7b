"""minGRU and minLSTM: GRU and LSTM reduced until they are linear in h.

Feng, Tung, Ahmed, Bengio, Hajimirsadeghi 2024, "Were RNNs All We Needed?". The gates depend on
the input only, so the recurrence is an elementwise linear scan (ops family A):

* minGRU:  ``z_t = sigmoid(W_z x_t)``, ``h_t = (1 - z_t) * h_{t-1} + z_t * g(W_h x_t)``
* minLSTM: ``f_t = sigmoid(W_f x_t)``, ``i_t = sigmoid(W_i x_t)``, normalised to
  ``f'_t = f_t / (f_t + i_t)``, ``i'_t = i_t / (f_t + i_t)``; ``h_t = f'_t * h_{t-1} + i'_t * g(W_h x_t)``

with the paper's activation ``g(x) = x + 0.5`` for x >= 0 and ``sigmoid(x)`` otherwise, which keeps
h positive so the scan can be done in log space. The coefficients are computed from their logs as
in the paper's parallel algorithm: ``log(1 - z) = -softplus(k)``, ``log z = -softplus(-k)``,
``log f' = -softplus(d)``, ``log i' = -softplus(-d)`` with ``d = softplus(-k_f) - softplus(-k_i)``,
``log g(x) = log(x + 0.5)`` or ``-softplus(-x)``. The layer follows the reference code
(BorealisAI/minRNNs): one input projection ``D -> n·D_h`` (hidden and gates, with bias), the scan,
an output projection ``D_h -> D``.

rnnlab differs from the reference in: the scan is ``rnnlab.ops.linear_scan`` (chunked, any
initial state) instead of a Heinsen log-cumsum-exp over the whole sequence; the start state is
h_0 = 0 (the reference's optional learned initial hidden state and minLSTM's forget-bias rescaling
are left out; the reference's optional causal conv and MLP live in the LM block here); and the
same function serves prefill and decoding (the reference has a separate T = 1 path).

Init follows the reference: PyTorch's nn.Linear default (kaiming-uniform weights, uniform biases)
on both projections; no weight decay on the biases.

Dimension letters: B batch, T tokens, D model width, E hidden width D_h.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_scan
from .base import Mixer, MixerConfig, state_batch
from .common import default_init_
from .state import State

__all__ = ["MinGRUConfig", "MinLSTMConfig", "MinGRUState", "MinLSTMState", "MinGRU", "MinLSTM",
           "g", "log_g"]


def g(x: torch.Tensor) -> torch.Tensor:
    """The paper's positive activation: ``x + 0.5`` for x >= 0, ``sigmoid(x)`` otherwise."""
    return torch.where(x >= 0, x + 0.5, torch.sigmoid(x))


def log_g(x: torch.Tensor) -> torch.Tensor:
    """``log g(x)``, computed without forming g: ``log(x + 0.5)`` or ``-softplus(-x)``."""
    return torch.where(x >= 0, torch.log(F.relu(x) + 0.5), -F.softplus(-x))


@dataclass
class MinGRUConfig(MixerConfig):
    expand: float = 1.0  # hidden width D_h = expand · d_model (the reference's expansion_factor)
    d_hidden: int | None = None  # E = D_h; None = round(expand · d_model)
    bias: bool = True  # biases in the input and output projections (the reference has them)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_hidden is None:
            if not self.expand > 0:
                raise ValueError(f"expand must be > 0, got {self.expand!r}")
            self.d_hidden = max(1, round(self.expand * self.d_model))
        if not isinstance(self.d_hidden, int) or self.d_hidden < 1:
            raise ValueError(f"d_hidden must be a positive int, got {self.d_hidden!r}")


@dataclass
class MinLSTMConfig(MinGRUConfig):
    normalize_gates: bool = True  # f' = f/(f+i), i' = i/(f+i) (the paper; the reference's use_coeff_norm)


@dataclass(frozen=True)
class MinGRUState(State):
    h: torch.Tensor  # (B, E) the hidden state (positive once a token has been seen)


@dataclass(frozen=True)
class MinLSTMState(State):
    h: torch.Tensor  # (B, E) the hidden state


class MinGRU(Mixer):
    """minGRU layer: ``in_proj`` (hidden, gate) -> linear scan -> ``out_proj``."""

    config_cls = MinGRUConfig
    state_cls = MinGRUState
    recurrent = True
    num_parts = 2  # the input projection's pieces: hidden and gate(s)

    def __init__(self, config: MinGRUConfig):
        super().__init__(config)
        c = config
        self.in_proj = nn.Linear(c.d_model, self.num_parts * c.d_hidden, bias=c.bias)
        self.out_proj = nn.Linear(c.d_hidden, c.d_model, bias=c.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """The reference's init: PyTorch's nn.Linear default on in_proj and out_proj."""
        default_init_(self)

    def init_state(self, batch_size, device=None, dtype=None):
        return self.state_cls(h=torch.zeros(batch_size, self.config.d_hidden, device=device,
                                            dtype=dtype or torch.float32))

    def log_coefficients(self, proj: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, T, 2E) projections -> log a, log b (B, T, E) of ``h_t = a_t h_{t-1} + b_t``."""
        hidden, gate = proj.chunk(2, dim=-1)
        log_a = -F.softplus(gate)  # log(1 - z)
        log_b = -F.softplus(-gate) + log_g(hidden)  # log z + log g(h~)
        return log_a, log_b

    def mix(self, x, state, cu_seqlens=None):
        acc = torch.promote_types(x.dtype, torch.float32)
        h0 = (state.h if state is not None else self.init_state(state_batch(x, cu_seqlens), x.device, acc).h).to(acc)
        # 1. gates and candidate from x alone, as logs of the scan coefficients
        log_a, log_b = self.log_coefficients(self.in_proj(x).to(acc))  # (B, T, E) each
        # 2. the linear recurrence h_t = a_t h_{t-1} + b_t (a in (0, 1), b > 0)
        h, h_last = linear_scan(log_a.exp(), log_b.exp(), initial_state=h0, cu_seqlens=cu_seqlens)  # (B, T, E), (B, E)
        # 3. back to the model width
        y = self.out_proj(h.to(x.dtype))  # (B, T, D)
        return y, self.state_cls(h=h_last)


class MinLSTM(MinGRU):
    """minLSTM layer: ``in_proj`` (hidden, forget, input) -> linear scan -> ``out_proj``."""

    config_cls = MinLSTMConfig
    state_cls = MinLSTMState
    num_parts = 3

    def log_coefficients(self, proj):
        hidden, f, i = proj.chunk(3, dim=-1)
        if self.config.normalize_gates:
            diff = F.softplus(-f) - F.softplus(-i)  # log(i / f)
            log_a, log_i = -F.softplus(diff), -F.softplus(-diff)  # log f', log i'
        else:
            log_a, log_i = F.logsigmoid(f), F.logsigmoid(i)
        return log_a, log_i + log_g(hidden)
