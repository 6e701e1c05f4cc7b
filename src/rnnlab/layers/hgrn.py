"""HGRN: a gated elementwise linear recurrence whose forget gate has a lower bound rising with depth.

Qin, Yang, Zhong 2023, "Hierarchically Gated Recurrent Neural Network for Sequence Modeling". Per
channel of the hidden state (width E = expand_ratio · D):

* forget gate ``f_t = β + (1 - β) sigmoid(W_f x_t)`` with the layer's lower bound β in [0, 1);
* input ``i_t = swish(W_i x_t) (1 - f_t)`` (the input is weighted by what the gate lets go);
* ``h_t = f_t ⊙ h_{t-1} + i_t`` (ops family A: ``rnnlab.ops.linear_scan``);
* output ``W_o (RMSNorm(h_t) ⊙ swish(W_g x_t))``.

Low layers may forget fast, high layers only slowly: in a model the i-th of L blocks gets
``β = i / L`` unless the layout sets it (see ``hgrn2``, which shares the idea with a matrix state).

rnnlab follows flash-linear-attention's HGRN layer (its real-valued form; the paper's recurrence
is complex-valued, with a data-independent phase per channel, which fla and rnnlab leave out). It
differs from fla in: the lower bounds stay fixed (fla's model learns them through a cumulative
softmax over layers, a parameter of the whole model); a lone layer (``build_mixer``) has β = 0;
fla's optional short convolution is not offered.

Init follows fla's layer init for HGRN (as for its GLA/HGRN2 layers): xavier-uniform with gain
2^-2.5 on every projection, norm weight 1.

Dimension letters: B batch, T tokens, D model width, E hidden width (expand_ratio · D).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..ops import linear_scan
from .base import Mixer, MixerConfig, positive, state_batch
from .common import GatedRMSNorm, reset_norms_, xavier_linears_
from .state import State

__all__ = ["HGRNConfig", "HGRNState", "HGRN"]


@dataclass
class HGRNConfig(MixerConfig):
    expand_ratio: int = 1  # E / D: the hidden width relative to the model width
    lower_bound: float = 0.0  # β in [0, 1): the forget gate's lower bound; a model sets block_index / n_layers
    norm_eps: float = positive(1e-5)  # epsilon of the gated output RMSNorm
    d_hidden: int = 0  # derived: E = expand_ratio · d_model

    def __post_init__(self) -> None:
        super().__post_init__()
        if not isinstance(self.expand_ratio, int) or self.expand_ratio < 1:
            raise ValueError(f"expand_ratio must be an int >= 1, got {self.expand_ratio!r}")
        if not 0.0 <= self.lower_bound < 1.0:
            raise ValueError(f"lower_bound must be in [0, 1), got {self.lower_bound}")
        self.d_hidden = self.expand_ratio * self.d_model


@dataclass(frozen=True)
class HGRNState(State):
    h: torch.Tensor  # (B, E) the hidden state


class HGRN(Mixer):
    """HGRN layer (see the module docstring)."""

    config_cls = HGRNConfig
    state_cls = HGRNState

    def __init__(self, config: HGRNConfig):
        super().__init__(config)
        c = config
        self.i_proj = nn.Linear(c.d_model, c.d_hidden, bias=False)
        self.f_proj = nn.Linear(c.d_model, c.d_hidden, bias=False)
        self.g_proj = nn.Linear(c.d_model, c.d_hidden, bias=False)
        self.g_norm = GatedRMSNorm(c.d_hidden, c.norm_eps)
        self.o_proj = nn.Linear(c.d_hidden, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """fla's layer init: xavier-uniform (gain 2^-2.5) projections, norm weight 1."""
        xavier_linears_(self, 2 ** -2.5)
        reset_norms_(self)

    def init_state(self, batch_size, device=None, dtype=None) -> HGRNState:
        return HGRNState(h=torch.zeros(batch_size, self.config.d_hidden, device=device, dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        h0 = (state.h if state is not None else self.init_state(state_batch(x, cu_seqlens), x.device, acc).h).to(acc)
        # 1. the forget gate, bounded below by β, and the input it lets in
        f = c.lower_bound + (1 - c.lower_bound) * torch.sigmoid(self.f_proj(x).to(acc))  # (B, T, E)
        i = F.silu(self.i_proj(x).to(acc)) * (1 - f)  # (B, T, E)
        # 2. h_t = f_t h_{t-1} + i_t
        h, h_last = linear_scan(f, i, initial_state=h0, cu_seqlens=cu_seqlens)  # (B, T, E), (B, E)
        # 3. gated norm and output projection
        o = self.g_norm(h, self.g_proj(x))  # (B, T, E)
        return self.o_proj(o.to(x.dtype)), HGRNState(h=h_last)
