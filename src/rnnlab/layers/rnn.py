"""Classic nonlinear RNNs: LSTM and GRU, with block-diagonal (multi-head) recurrence.

* LSTM — Hochreiter & Schmidhuber 1997, with the forget gate of Gers et al. 2000:
  ``c_t = σ(f) ⊙ c_{t-1} + σ(i) ⊙ tanh(g)``, ``h_t = σ(o) ⊙ tanh(c_t)``, where each gate is
  ``W x_t + b + U h_{t-1}``.
* GRU — Cho et al. 2014: ``r, z = σ(W x_t + U h_{t-1})``, ``h~ = tanh(W x_t + U (r ⊙ h_{t-1}))``,
  ``h_t = z ⊙ h_{t-1} + (1 - z) ⊙ h~`` (Cho's placement of r and z; PyTorch's nn.GRU differs).

The recurrent matrices U are block-diagonal with ``num_heads`` blocks: each head's K = E / H hidden
units see only their own head. ``num_heads = 1`` is the classic dense cell; ``num_heads = d_hidden``
is the diagonal-recurrence variant of ParaRNN (Danieli et al. 2025), whose Newton Jacobians are
2x2 (LSTM) or 1x1 (GRU) per unit. ``parallel=True`` replaces the sequential loop by the Newton
iterations of DEER / ParaRNN (``rnnlab.ops.rnn_newton``, ops family D): every iteration is a
linear recurrence in the per-head Jacobians; it converges to the sequential trajectory, so both
forms give the same outputs and states and obey the chunking law.

The layer is ``in_proj`` (all gates' input terms, with bias) -> recurrence -> ``out_proj``.
rnnlab differs from the papers in: the output projection back to the model width (the LM block
adds the residual, norm and MLP); the block-diagonal option; one bias per gate (nn.LSTM has two);
U drawn from U(-1/sqrt(K), 1/sqrt(K)) per block (nn.LSTM's rule with K for the hidden width); the
recurrence runs in float32 even under bf16 autocast (only the projections use bf16).

Init follows PyTorch's nn.LSTM / nn.GRU (``reset_parameters``: every weight and bias U(±1/sqrt(E)),
E the hidden width) for the input projection and its bias, with K for the hidden width in the
block-diagonal U as said above; the output projection (not in the references) N(0, 0.02). U is
weight-decayed like nn.LSTM's weight_hh; the gate biases are not.

Dimension letters: B batch, T tokens, D model width, E hidden width, H heads, K = E / H,
G gates (4 for the LSTM, 3 for the GRU), S state size per head (2K for the LSTM: h and c; K for the GRU).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import ClassVar

import torch
from einops import rearrange
from torch import nn

from ..ops import rnn_newton, rnn_sequential
from ..ops.newton import check_newton_block
from .base import Mixer, MixerConfig, state_batch
from .state import State

__all__ = ["LSTMConfig", "GRUConfig", "LSTMState", "GRUState", "LSTM", "GRU", "lstm_cell", "gru_cell"]


def _recur(h: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """Block-diagonal recurrent term: h (..., H, K), R (H, K, G, K) -> (..., H, G, K)."""
    return torch.einsum("...hk,hkgj->...hgj", h, R)


def lstm_cell(s: torch.Tensor, u: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """One LSTM step for any leading dims: s = [h, c] (..., H, 2K), u = W x + b (..., H, 4, K)."""
    K = R.shape[1]
    h, c = s[..., :K], s[..., K:]
    i, f, g, o = (u + _recur(h, R)).unbind(-2)  # (..., H, K) each
    c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
    h = torch.sigmoid(o) * torch.tanh(c)
    return torch.cat([h, c], dim=-1)


def gru_cell(h: torch.Tensor, u: torch.Tensor, R: torch.Tensor) -> torch.Tensor:
    """One GRU step (Cho et al. 2014) for any leading dims: h (..., H, K), u = W x + b (..., H, 3, K)."""
    rz = torch.sigmoid(u[..., :2, :] + _recur(h, R[:, :, :2]))  # (..., H, 2, K)
    r, z = rz.unbind(-2)
    h_tilde = torch.tanh(u[..., 2, :] + _recur(r * h, R[:, :, 2:])[..., 0, :])
    return z * h + (1 - z) * h_tilde


@dataclass
class LSTMConfig(MixerConfig):
    d_hidden: int | None = None  # E; None = d_model
    num_heads: int = 1  # H blocks of the block-diagonal recurrence (1 = dense, E = diagonal)
    parallel: bool = False  # Newton-parallel form (DEER / ParaRNN) instead of the sequential loop
    bias: bool = True  # bias of the input projection (the gates' b)

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_hidden is None:
            self.d_hidden = self.d_model
        if not isinstance(self.d_hidden, int) or self.d_hidden < 1:
            raise ValueError(f"d_hidden must be a positive int, got {self.d_hidden!r}")
        if not isinstance(self.num_heads, int) or self.num_heads < 1 or self.d_hidden % self.num_heads:
            raise ValueError(f"num_heads={self.num_heads!r} must be a positive divisor of d_hidden={self.d_hidden}")
        if self.parallel:
            check_newton_block(self.newton_state_per_unit * (self.d_hidden // self.num_heads),
                               self.d_hidden, self.num_heads)

    newton_state_per_unit: ClassVar[int] = 2  # Newton iterates on [h, c]


@dataclass
class GRUConfig(LSTMConfig):
    newton_state_per_unit: ClassVar[int] = 1  # Newton iterates on h


@dataclass(frozen=True)
class LSTMState(State):
    h: torch.Tensor  # (B, H, K) hidden state
    c: torch.Tensor  # (B, H, K) cell state


@dataclass(frozen=True)
class GRUState(State):
    h: torch.Tensor  # (B, H, K) hidden state


class LSTM(Mixer):
    """LSTM layer with block-diagonal recurrence (see module docstring)."""

    config_cls = LSTMConfig
    state_cls = LSTMState
    recurrent = True
    num_gates = 4

    def __init__(self, config: LSTMConfig):
        super().__init__(config)
        c = config
        H, K, G = c.num_heads, c.d_hidden // c.num_heads, self.num_gates
        self.in_proj = nn.Linear(c.d_model, G * c.d_hidden, bias=c.bias)  # gate order i, f, g, o (GRU: r, z, n)
        self.R = nn.Parameter(torch.empty(H, K, G, K))  # (H, K, G, K) U per head
        self.out_proj = nn.Linear(c.d_hidden, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """nn.LSTM's rule: in_proj weight and bias U(±1/sqrt(E)), U U(±1/sqrt(K)); out_proj N(0, 0.02)."""
        c = self.config
        E, K = c.d_hidden, c.d_hidden // c.num_heads
        nn.init.uniform_(self.in_proj.weight, -1 / math.sqrt(E), 1 / math.sqrt(E))
        if self.in_proj.bias is not None:
            nn.init.uniform_(self.in_proj.bias, -1 / math.sqrt(E), 1 / math.sqrt(E))
        nn.init.uniform_(self.R, -1 / math.sqrt(K), 1 / math.sqrt(K))
        nn.init.normal_(self.out_proj.weight, 0.0, 0.02)

    def init_state(self, batch_size, device=None, dtype=None):
        c = self.config
        S = self.state_width() * (c.d_hidden // c.num_heads)
        return self._from_vec(torch.zeros(batch_size, c.num_heads, S, device=device, dtype=dtype or torch.float32))

    # -- the state as one vector per head, (B, H, S), for the ops ------------------------------------
    def state_width(self) -> int:
        return 2  # S / K: h and c

    def _to_vec(self, state: LSTMState) -> torch.Tensor:
        return torch.cat([state.h, state.c], dim=-1)  # (B, H, 2K)

    def _from_vec(self, s: torch.Tensor) -> LSTMState:
        h, c = s.chunk(2, dim=-1)
        return LSTMState(h=h.clone(), c=c.clone())  # own storage (states are saved tensor by tensor)

    def _readout(self, s: torch.Tensor) -> torch.Tensor:
        return s[..., : s.shape[-1] // self.state_width()]  # h

    def cell(self, s, u):
        return lstm_cell(s, u, self.R.to(u.dtype))

    def recurrence_inputs(self, x: torch.Tensor, state: State | None = None,
                          cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """The ops-level problem of this layer: the cell inputs ``u = W x + b`` (B, T, H, G, K) and
        the start state (B, H, S) (N rows with ``cu_seqlens``), in the accumulation dtype
        (``cell(s, u)`` is the step)."""
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state if state is not None else self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        s0 = self._to_vec(st).to(acc)
        u = rearrange(self.in_proj(x).to(acc), "b t (g h k) -> b t h g k", g=self.num_gates, h=self.config.num_heads)
        return u, s0

    # -- the contract ---------------------------------------------------------------------------------
    def mix(self, x, state, cu_seqlens=None):
        # 1. input terms of all gates at once
        u, s0 = self.recurrence_inputs(x, state, cu_seqlens)  # (B, T, H, G, K), (B, H, S)
        # 2. the recurrence, sequential or by Newton iterations (same trajectory), in float32+
        run = rnn_newton if self.config.parallel else rnn_sequential
        with torch.autocast(x.device.type, enabled=False):
            s, s_last = run(self.cell, u, s0, cu_seqlens=cu_seqlens)  # (B, T, H, S), (B, H, S)
        # 3. hidden states back to the model width
        h = rearrange(self._readout(s), "b t h k -> b t (h k)")  # (B, T, E)
        return self.out_proj(h.to(x.dtype)), self._from_vec(s_last)


class GRU(LSTM):
    """GRU layer (Cho et al. 2014) with block-diagonal recurrence (see module docstring)."""

    config_cls = GRUConfig
    state_cls = GRUState
    num_gates = 3

    def state_width(self) -> int:
        return 1

    def _to_vec(self, state: GRUState) -> torch.Tensor:
        return state.h

    def _from_vec(self, s: torch.Tensor) -> GRUState:
        return GRUState(h=s)

    def cell(self, s, u):
        return gru_cell(s, u, self.R.to(u.dtype))
