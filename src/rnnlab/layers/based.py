"""Based: linear attention with a 2nd-order Taylor feature map (Arora et al. 2024, "Simple linear
attention language models balance the recall-throughput tradeoff").

``φ(x) = [1, x / d^(1/4), vec(x x^T) / (sqrt(2) d^(1/2))]`` on small projected queries and keys
(feature dim d = 16), so ``φ(q)·φ(k) = 1 + q·k/√d + (q·k)²/(2d)``, the Taylor expansion of
``exp(q·k/√d)``; then normalised linear attention:
``o_t = Σ_{s<=t} φ(q_t)·φ(k_s) v_s / Σ_{s<=t} φ(q_t)·φ(k_s)``. State per head: (1 + d + d²) x (V + 1).
The paper pairs it with short sliding-window attention in the layout, e.g.
``"based,swa(window=64)"``. Runs on ``rnnlab.ops.gated_delta_rule`` (no decay, no delta term).

rnnlab differs from the reference in: no short convolution before the feature map (the LM layout
can interleave one through other mixers), and the full d² quadratic features are kept (not the
reference's symmetric-half trick).

Init follows the reference's model init (HazyResearch/based ``models/gpt.py`` ``_init_weights``):
every projection N(0, 0.02); its depth-scaled out_proj (0.02/sqrt(2·n_layers)) is a model choice
rnnlab's layer does not make.

Dimension letters: B batch, T tokens, D model width, H heads, F feature dim, V value head dim.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange
from torch import nn

from ..ops.delta import gated_delta_rule
from .base import Mixer, MixerConfig, at_least, state_batch
from .common import normal_linears_, normalised, with_normaliser
from .linear_attention import MatrixState

__all__ = ["BasedConfig", "Based", "taylor_features"]


def taylor_features(x: torch.Tensor) -> torch.Tensor:
    """(..., F) -> (..., 1 + F + F²): the 2nd-order Taylor feature map of exp(q·k/√F)."""
    F_ = x.shape[-1]
    x2 = (x[..., :, None] * x[..., None, :]).flatten(-2) / (2 ** 0.5 * F_ ** 0.5)
    return torch.cat([torch.ones_like(x[..., :1]), x / F_ ** 0.25, x2], dim=-1)


@dataclass
class BasedConfig(MixerConfig):
    num_heads: int = at_least(1, 4)  # H
    feature_dim: int = at_least(1, 16)  # F, the projected q/k size
    eps: float = 1e-6  # added to the normaliser

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.d_model % self.num_heads:
            raise ValueError(f"d_model={self.d_model} is not divisible by num_heads={self.num_heads}")


class Based(Mixer):
    """Based linear attention (see module docstring)."""

    config_cls = BasedConfig
    state_cls = MatrixState

    def __init__(self, config: BasedConfig):
        super().__init__(config)
        self.build(config)
        self.reset_parameters()

    def build(self, c: BasedConfig) -> None:
        """The projections: q and k to H heads of F features, v and out at full width."""
        self.q_proj = nn.Linear(c.d_model, c.num_heads * c.feature_dim, bias=False)
        self.k_proj = nn.Linear(c.d_model, c.num_heads * c.feature_dim, bias=False)
        self.v_proj = nn.Linear(c.d_model, c.d_model, bias=False)
        self.o_proj = nn.Linear(c.d_model, c.d_model, bias=False)

    def reset_parameters(self) -> None:
        """The reference's init: every projection N(0, 0.02)."""
        normal_linears_(self, 0.02)

    def init_state(self, batch_size, device=None, dtype=None) -> MatrixState:
        c = self.config
        Fx = 1 + c.feature_dim + c.feature_dim ** 2
        return MatrixState(S=torch.zeros(batch_size, c.num_heads, Fx, c.d_model // c.num_heads + 1,
                                         device=device, dtype=dtype or torch.float32))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        q, k = taylor_features(heads(self.q_proj(x))), taylor_features(heads(self.k_proj(x)))  # (B, T, H, 1+F+F²)
        v = heads(self.v_proj(x))
        v = with_normaliser(v)  # (B, T, H, V+1): last column sums φ(k)
        o, S = gated_delta_rule(q, k, v, scale=1.0, initial_state=st.S, cu_seqlens=cu_seqlens)
        o = normalised(o, c.eps)  # (B, T, H, V)
        return self.o_proj(rearrange(o, "b t h v -> b t (h v)").to(x.dtype)), MatrixState(S=S)
