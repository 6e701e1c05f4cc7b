"""mLSTM: xLSTM's matrix-memory LSTM layer (Beck et al. 2024, "xLSTM: Extended Long Short-Term Memory").

Per head, with exponential input gate and sigmoid forget gate (stabilised, see ``rnnlab.ops.mlstm``):
    C_t = f_t C_{t-1} + i_t k_t v_t^T,  n_t = f_t n_{t-1} + i_t k_t,  h_t = C_t^T q_t / max(|n_t^T q_t|, 1)
The block follows the paper's mLSTM block (NX-AI's ``mLSTMLayer``): up-projection to x and z
(factor 2), causal conv (width 4) + swish on x giving x_c; q, k from x_c and v from x; input and
forget gates from [q, k, v] (forget-gate bias initialised to linspace(3, 6), input-gate bias
N(0, 0.1), weights zero); per-head layer norm of h; a learnable skip ``+ s ⊙ x_c``; output gate
``swish(z)``; down-projection.

rnnlab differs from the reference in: q, k, v are full linear maps instead of block-diagonal
"headwise" projections, and the kernel is ``rnnlab.ops.mlstm`` (chunked, no fused CUDA kernel).

Init follows ``mLSTMLayer.reset_parameters`` / ``mLSTMCell.reset_parameters``: "small init"
N(0, 2/(5D)) on the up-projection and on q, k, v (with D = d_model, as there, although rnnlab's
q, k, v are full maps); "wang init" N(0, (2/(n·sqrt(D)))²) on the down-projection with n = 1
block (the reference's value for a lone layer; inside its stacks n is the number of blocks, which
rnnlab's layer does not know); gates as above; skip and norm weight 1; conv at PyTorch's default.
Weight decay as in xLSTM (``'weight' in name and 'norm' not in name``): the gate biases, the skip,
the norm weight and the conv bias skip it.

``mlstm7b`` is the simpler layer of xLSTM 7B (Beck et al. 2025, "xLSTM 7B: A Recurrent LLM for
Fast and Efficient Inference"; NX-AI's ``xlstm_large`` ``mLSTMLayer``, transformers'
``xLSTMLayer``, whose parameter names it keeps): no up-projection, no convolution, no skip;
q, k (width qk_dim_factor·D), v and an output gate (width v_dim_factor·D) straight from x; the gate
pre-activations soft-capped, ``z -> 15·tanh(z / 15)``; the op's ``eps = 1e-6`` in the stabilised
denominator; per-head layer norm, then ``sigmoid(o) ⊙`` and the output projection:
    y = W_out(σ(W_o x) ⊙ LN_heads(mLSTM(W_q x, W_k x, W_v x, logsigmoid(cap(W_f x + b_f)), cap(W_i x + b_i))))
Init as there: q, k, v, o "small init" N(0, 2/(5D)), out_proj "wang init" N(0, (2/(L·sqrt(D)))²)
with L = ``init_layers`` (the model's depth there), gate weights zero, input-gate bias -10,
forget-gate biases linspace(3, 6), norm weight 1.

Dimension letters: B batch, T tokens, D model width, E = 2·D inner width, H heads, K = E / H
(mlstm7b: K = qk_dim / H, V = v_dim / H).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops.mlstm import mlstm
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import ShortConv
from .state import State

__all__ = ["MLSTMConfig", "MLSTMState", "MLSTM", "MLSTM7BConfig", "MLSTM7BState", "MLSTM7B"]


@dataclass
class MLSTMConfig(MixerConfig):
    num_heads: int = at_least(1, 4)  # H
    proj_factor: float = positive(2.0)  # E = proj_factor · d_model
    conv_size: int = at_least(1, 4)  # W, causal conv width on the q/k path (always on)
    norm_eps: float = positive(1e-5)  # epsilon of the per-head layer norm (xLSTM's MultiHeadLayerNorm default)
    d_inner: int = 0  # derived: E

    def __post_init__(self) -> None:
        super().__post_init__()
        self.d_inner = int(self.proj_factor * self.d_model)
        if self.d_inner % self.num_heads:
            raise ValueError(f"proj_factor·d_model = {self.d_inner} is not divisible by num_heads={self.num_heads}")


@dataclass(frozen=True)
class MLSTMState(State):
    C: torch.Tensor  # (B, H, K, K) matrix memory (divided by exp(m))
    n: torch.Tensor  # (B, H, K) normaliser
    m: torch.Tensor  # (B, H) stabiliser
    conv: torch.Tensor  # (B, W-1, E) last inputs of the conv


class MLSTM(Mixer):
    """xLSTM's mLSTM layer (see module docstring)."""

    config_cls = MLSTMConfig
    state_cls = MLSTMState
    no_decay_params = ("skip", "norm_weight")

    def __init__(self, config: MLSTMConfig):
        super().__init__(config)
        c = config
        E, H = c.d_inner, c.num_heads
        self.up_proj = nn.Linear(c.d_model, 2 * E, bias=False)
        self.conv = ShortConv(E, c.conv_size, bias=True)
        self.q_proj = nn.Linear(E, E, bias=False)
        self.k_proj = nn.Linear(E, E, bias=False)
        self.v_proj = nn.Linear(E, E, bias=False)
        self.igate = nn.Linear(3 * E, H)
        self.fgate = nn.Linear(3 * E, H)
        self.norm_weight = nn.Parameter(torch.empty(E))  # (E,) weight of the per-head layer norm
        self.skip = nn.Parameter(torch.empty(E))  # (E,) learnable skip gain
        self.out_proj = nn.Linear(E, c.d_model, bias=False)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xLSTM's mLSTM init (see the module docstring)."""
        D, H = self.config.d_model, self.config.num_heads
        small, wang = (2 / (5 * D)) ** 0.5, 2 / D ** 0.5
        nn.init.normal_(self.up_proj.weight, 0.0, small)
        nn.init.normal_(self.out_proj.weight, 0.0, wang)
        for proj in (self.q_proj, self.k_proj, self.v_proj):
            nn.init.normal_(proj.weight, 0.0, small)
        self.conv.reset_parameters()
        with torch.no_grad():
            self.skip.fill_(1.0)
            self.norm_weight.fill_(1.0)
            nn.init.zeros_(self.fgate.weight)
            self.fgate.bias.copy_(torch.linspace(3.0, 6.0, H))
            nn.init.zeros_(self.igate.weight)
            nn.init.normal_(self.igate.bias, 0.0, 0.1)

    def init_state(self, batch_size, device=None, dtype=None) -> MLSTMState:
        c, dt = self.config, dtype or torch.float32
        K = c.d_inner // c.num_heads
        z = lambda *s: torch.zeros(batch_size, *s, device=device, dtype=dt)  # noqa: E731
        return MLSTMState(C=z(c.num_heads, K, K), n=z(c.num_heads, K), m=z(c.num_heads),
                          conv=self.conv.init_state(batch_size, device, dt))

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        # 1. up-projection; conv + swish on the q/k path
        xm, z = self.up_proj(x).chunk(2, dim=-1)  # (B, T, E) each
        xc, conv = self.conv(xm, st.conv, cu_seqlens)
        q, k, v = self.q_proj(xc), self.k_proj(xc), self.v_proj(xm)
        # 2. gates from [q, k, v]: exponential input gate, sigmoid forget gate (log space)
        qkv = torch.cat([q, k, v], dim=-1)
        log_i = self.igate(qkv).to(acc)  # (B, T, H)
        log_f = F.logsigmoid(self.fgate(qkv).to(acc))
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        h, (C, n, m) = mlstm(heads(q), heads(k), heads(v), log_f, log_i, initial_state=(st.C, st.n, st.m),
                             cu_seqlens=cu_seqlens)  # (B, T, H, K)
        # 3. per-head layer norm, learnable skip, output gate, down-projection
        h = F.layer_norm(h, h.shape[-1:], eps=c.norm_eps)  # (B, T, H, K)
        h = rearrange(h, "b t h d -> b t (h d)") * self.norm_weight.to(acc) + self.skip.to(acc) * xc.to(acc)
        y = self.out_proj((h * F.silu(z.to(acc))).to(x.dtype))  # (B, T, D)
        return y, MLSTMState(C=C, n=n, m=m, conv=conv)


@dataclass
class MLSTM7BConfig(MixerConfig):
    num_heads: int = at_least(1, 8)  # H
    qk_dim_factor: float = 0.5  # q and k are int(qk_dim_factor · d_model) wide
    v_dim_factor: float = 1.0  # v and the output gate are int(v_dim_factor · d_model) wide
    gate_softcap: float | None = 15.0  # input/forget gate pre-activations z -> c·tanh(z / c); None = no cap
    eps: float = 1e-6  # added to the stabilised denominator of h (the op's eps)
    norm_eps: float = positive(1e-6)  # epsilon of the per-head layer norm
    bias: bool = False  # biases in the q, k, v, output-gate and output projections and the norm
    init_layers: int = 1  # L in out_proj's "wang init" std 2 / (L · sqrt(D)) (xLSTM 7B: the model's depth)
    qk_dim: int = 0  # derived: H·K
    v_dim: int = 0  # derived: H·V

    def __post_init__(self) -> None:
        super().__post_init__()
        self.qk_dim, self.v_dim = int(self.qk_dim_factor * self.d_model), int(self.v_dim_factor * self.d_model)
        for name in ("qk_dim", "v_dim"):
            if getattr(self, name) < self.num_heads or getattr(self, name) % self.num_heads:
                raise ValueError(f"{name}_factor·d_model = {getattr(self, name)} must be a positive multiple of "
                                 f"num_heads={self.num_heads}")
        if self.gate_softcap is not None and not self.gate_softcap > 0:
            raise ValueError(f"gate_softcap must be > 0 or None, got {self.gate_softcap!r}")
        if not self.eps >= 0:
            raise ValueError(f"eps must be >= 0, got {self.eps!r}")
        if not isinstance(self.init_layers, int) or self.init_layers < 1:
            raise ValueError(f"init_layers must be an int >= 1, got {self.init_layers!r}")


@dataclass(frozen=True)
class MLSTM7BState(State):
    C: torch.Tensor  # (B, H, K, V) matrix memory (divided by exp(m))
    n: torch.Tensor  # (B, H, K) normaliser
    m: torch.Tensor  # (B, H) stabiliser


class MLSTM7B(Mixer):
    """xLSTM 7B's mLSTM layer (see the module docstring)."""

    config_cls = MLSTM7BConfig
    state_cls = MLSTM7BState
    def __init__(self, config: MLSTM7BConfig):
        super().__init__(config)
        c = config
        self.q = nn.Linear(c.d_model, c.qk_dim, bias=c.bias)
        self.k = nn.Linear(c.d_model, c.qk_dim, bias=c.bias)
        self.v = nn.Linear(c.d_model, c.v_dim, bias=c.bias)
        self.ogate_preact = nn.Linear(c.d_model, c.v_dim, bias=c.bias)
        self.igate_preact = nn.Linear(c.d_model, c.num_heads)
        self.fgate_preact = nn.Linear(c.d_model, c.num_heads)
        self.multihead_norm = nn.GroupNorm(c.num_heads, c.v_dim, eps=c.norm_eps)  # per-head layer norm
        if not c.bias:
            self.multihead_norm.bias = None  # xLSTM 7B's norm has a weight only
        self.out_proj = nn.Linear(c.v_dim, c.d_model, bias=c.bias)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """xLSTM 7B's init (see the module docstring)."""
        c = self.config
        small, wang = (2 / (5 * c.d_model)) ** 0.5, 2 / c.init_layers / c.d_model ** 0.5
        with torch.no_grad():
            for lin in (self.q, self.k, self.v, self.ogate_preact, self.out_proj):
                nn.init.normal_(lin.weight, 0.0, wang if lin is self.out_proj else small)
                if lin.bias is not None:
                    nn.init.zeros_(lin.bias)
            nn.init.zeros_(self.igate_preact.weight)
            self.igate_preact.bias.fill_(-10.0)
            nn.init.zeros_(self.fgate_preact.weight)
            self.fgate_preact.bias.copy_(torch.linspace(3.0, 6.0, c.num_heads))
            nn.init.ones_(self.multihead_norm.weight)
            if self.multihead_norm.bias is not None:
                nn.init.zeros_(self.multihead_norm.bias)

    def init_state(self, batch_size, device=None, dtype=None) -> MLSTM7BState:
        c, dt = self.config, dtype or torch.float32
        z = lambda *s: torch.zeros(batch_size, c.num_heads, *s, device=device, dtype=dt)  # noqa: E731
        return MLSTM7BState(C=z(c.qk_dim // c.num_heads, c.v_dim // c.num_heads), n=z(c.qk_dim // c.num_heads), m=z())

    def _cap(self, z: torch.Tensor) -> torch.Tensor:
        cap = self.config.gate_softcap
        return z if cap is None else cap * torch.tanh(z / cap)

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        heads = lambda t: rearrange(t, "b t (h d) -> b t h d", h=c.num_heads).to(acc)  # noqa: E731
        # 1. q, k, v and the gates, all from x; exponential input gate, sigmoid forget gate (log space)
        log_i = self._cap(self.igate_preact(x).to(acc))  # (B, T, H)
        log_f = F.logsigmoid(self._cap(self.fgate_preact(x).to(acc)))
        h, (C, n, m) = mlstm(heads(self.q(x)), heads(self.k(x)), heads(self.v(x)), log_f, log_i,
                             initial_state=(st.C, st.n, st.m), cu_seqlens=cu_seqlens, eps=c.eps)  # (B, T, H, V)
        # 2. per-head layer norm (a group norm with a group per head), output gate, projection
        B, T = x.shape[:2]
        norm = self.multihead_norm
        h = F.group_norm(rearrange(h, "b t h d -> (b t) (h d)"), c.num_heads, norm.weight.to(acc),
                         None if norm.bias is None else norm.bias.to(acc), c.norm_eps).view(B, T, -1)  # (B, T, H·V)
        y = self.out_proj((torch.sigmoid(self.ogate_preact(x).to(acc)) * h).to(x.dtype))  # (B, T, D)
        return y, MLSTM7BState(C=C, n=n, m=m)
