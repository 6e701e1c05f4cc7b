"""Griffin and Hawk's recurrent block with the Real-Gated Linear Recurrent Unit (RG-LRU).

De et al. 2024, "Griffin: Mixing Gated Linear Recurrences with Local Attention for Efficient
Language Models". Per channel of the recurrence width E, with a learned ``Λ`` and c = 8:

* recurrence and input gates ``r_t = σ(W_a x_t + b_a)``, ``i_t = σ(W_x x_t + b_x)`` (block-diagonal
  W over H blocks);
* ``a_t = a^(c·r_t)`` with ``a = σ(Λ)``, computed as ``log a_t = -c · r_t · softplus(-Λ')``
  (``Λ'`` the stored parameter, as in RecurrentGemma);
* ``h_t = a_t ⊙ h_{t-1} + sqrt(1 - a_t²) ⊙ (i_t ⊙ x_t)`` (ops family A: ``rnnlab.ops.linear_scan``),
  except at a sequence's first token, where ``h_0 = i_0 ⊙ x_0`` (RecurrentGemma's reset).

The block: ``linear_out(rg_lru(conv(linear_x u)) ⊙ gelu(linear_y u))`` with a causal depthwise
convolution of width 4. Models (``rnnlab.build_model``), with the Gemma options of the LM
(``mlp="geglu", mlp_bias=True, norm_plus_one=True, embed_scale=sqrt(D), logit_softcap=30.0``):

* Hawk: ``layout="rg_lru(num_heads=10)"``, an RG-LRU block (and an MLP) in every layer;
* Griffin (RecurrentGemma): two RG-LRU blocks, then local attention, cycled over the layers:
  ``layout="rg_lru(num_heads=10)*2,swa(window=2048,num_heads=10,num_kv_heads=1,rope_fraction=0.5,out_bias=True)"``
  (RoPE on half of each head's dims, a bias on the attention's output projection only).

``rnnlab.from_hf`` reads transformers' ``RecurrentGemmaForCausalLM`` checkpoints as such models.

rnnlab follows transformers' ``RecurrentGemmaRecurrentBlock`` / ``RecurrentGemmaRglru`` (same
parameters and names, so checkpoints map one to one). The state records whether a row has seen a
token (``started``), so the reset applies to a sequence's first token however it is chunked, and
the chunking law holds. Differences: the square root's derivative is bounded by clamping
``1 - a²`` at 1e-6 (RecurrentGemma clips the derivative itself).

Init follows RecurrentGemma's ``_init_weights``: ``linear_x``/``linear_y`` N(0, 1/D), ``linear_out``
N(0, 2/(L·E)) with L = ``init_layers``, the convolution N(0, 0.01/W), the gates N(0, 0.01/(E/H)),
biases zero, and ``a = σ(Λ)`` with ``a²`` uniform in [0.9², 0.999²].

Dimension letters: B batch, T tokens, D model width, E recurrence width, H gate blocks, W conv width.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from einops import rearrange
from torch import nn

from ..ops import linear_scan
from ..ops.bounds import check_cu_seqlens
from .base import Mixer, MixerConfig, at_least, positive, state_batch
from .common import ShortConv
from .state import State

__all__ = ["RGLRUConfig", "RGLRUState", "RGLRU"]


@dataclass
class RGLRUConfig(MixerConfig):
    lru_width: int | None = None  # E, the recurrence width; None = d_model (RecurrentGemma)
    num_heads: int = at_least(1, 4)  # H, blocks of the block-diagonal gate matrices
    conv_size: int = at_least(1, 4)  # W, the causal depthwise convolution before the RG-LRU (always on)
    c: float = positive(8.0)  # the gate's sharpness: a_t = a^(c·r_t)
    init_layers: int = at_least(1, 12)  # L in linear_out's init variance 2 / (L·E) (RecurrentGemma: the model's depth)

    renamed = {"conv_width": "conv_size"}

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.lru_width is None:
            self.lru_width = self.d_model
        if not isinstance(self.lru_width, int) or self.lru_width < 1 or self.lru_width % self.num_heads:
            raise ValueError(f"lru_width must be a positive int divisible by num_heads={self.num_heads}, "
                             f"got {self.lru_width!r}")


@dataclass(frozen=True)
class RGLRUState(State):
    h: torch.Tensor  # (B, E) the recurrence's state
    conv: torch.Tensor  # (B, W-1, E) the convolution's last inputs
    started: torch.Tensor  # (B,) 1.0 once the row has seen a token (no reset at its next token)


class RGLRU(Mixer):
    """Griffin's recurrent block (see the module docstring)."""

    config_cls = RGLRUConfig
    state_cls = RGLRUState
    no_decay_params = ("rg_lru_recurrent_param", "input_gate_bias", "recurrent_gate_bias")

    def __init__(self, config: RGLRUConfig):
        super().__init__(config)
        c = config
        E, H = c.lru_width, c.num_heads
        self.linear_x = nn.Linear(c.d_model, E)
        self.linear_y = nn.Linear(c.d_model, E)
        self.linear_out = nn.Linear(E, c.d_model)
        self.conv = ShortConv(E, c.conv_size, bias=True, activation=False)
        self.input_gate_weight = nn.Parameter(torch.empty(H, E // H, E // H))
        self.input_gate_bias = nn.Parameter(torch.empty(H, E // H))
        self.recurrent_gate_weight = nn.Parameter(torch.empty(H, E // H, E // H))
        self.recurrent_gate_bias = nn.Parameter(torch.empty(H, E // H))
        self.rg_lru_recurrent_param = nn.Parameter(torch.empty(E))
        self.reset_parameters()

    def reset_parameters(self) -> None:
        """RecurrentGemma's init (see the module docstring)."""
        c = self.config
        E, H, D = c.lru_width, c.num_heads, c.d_model
        with torch.no_grad():
            for lin, std in ((self.linear_x, math.sqrt(1 / D)), (self.linear_y, math.sqrt(1 / D)),
                             (self.linear_out, math.sqrt(2 / (c.init_layers * E)))):
                nn.init.normal_(lin.weight, 0.0, std)
                nn.init.zeros_(lin.bias)
            nn.init.normal_(self.conv.conv.weight, 0.0, math.sqrt(0.01 / c.conv_size))
            nn.init.zeros_(self.conv.conv.bias)
            for w in (self.input_gate_weight, self.recurrent_gate_weight):
                nn.init.normal_(w, 0.0, math.sqrt(0.01 / (E // H)))
            nn.init.zeros_(self.input_gate_bias)
            nn.init.zeros_(self.recurrent_gate_bias)
            a_sq = torch.empty(E).uniform_(0.9 ** 2 + 1e-8, 0.999 ** 2 + 1e-8)
            self.rg_lru_recurrent_param.copy_(torch.log(torch.exp(-0.5 * torch.log(a_sq)) - 1))  # softplus⁻¹(-log a)

    def init_state(self, batch_size, device=None, dtype=None) -> RGLRUState:
        c = self.config
        dt = dtype or torch.float32
        return RGLRUState(h=torch.zeros(batch_size, c.lru_width, device=device, dtype=dt),
                          conv=torch.zeros(batch_size, c.conv_size - 1, c.lru_width, device=device, dtype=dt),
                          started=torch.zeros(batch_size, device=device, dtype=dt))

    def _gate(self, x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor) -> torch.Tensor:
        """σ(block-diagonal W x + b): (B, T, E) -> (B, T, E)."""
        xb = rearrange(x, "b t (h e) -> b t h e", h=self.config.num_heads)
        return torch.sigmoid(torch.einsum("bthe,hef->bthf", xb, weight.to(x.dtype)) + bias.to(x.dtype)).flatten(2)

    def mix(self, x, state, cu_seqlens=None):
        c = self.config
        acc = torch.promote_types(x.dtype, torch.float32)
        st = state or self.init_state(state_batch(x, cu_seqlens), x.device, acc)
        # 1. the two branches: a GeLU gate, and a causal convolution feeding the recurrence
        y = F.gelu(self.linear_y(x), approximate="tanh")  # (B, T, E)
        u, conv = self.conv(self.linear_x(x), st.conv.to(x.dtype), cu_seqlens=cu_seqlens)  # (B, T, E)
        u = u.to(acc)
        # 2. the gates and a_t = a^(c·r_t)
        r = self._gate(u, self.recurrent_gate_weight, self.recurrent_gate_bias)  # (B, T, E)
        i = self._gate(u, self.input_gate_weight, self.input_gate_bias)
        log_a = -c.c * r * F.softplus(self.rg_lru_recurrent_param.to(acc))  # (B, T, E)
        mult = (1 - torch.exp(2 * log_a)).clamp(min=1e-6).sqrt()  # sqrt(1 - a_t²)
        # 3. a sequence's first token resets: h_0 = i_0 x_0 (a = 0, no normalisation)
        reset = _first_tokens(x.shape[0], x.shape[1], st.started, cu_seqlens)  # (B, T, 1) bool
        a = torch.where(reset, 0.0, log_a.exp())
        b = torch.where(reset, 1.0, mult) * (i * u)
        # 4. h_t = a_t h_{t-1} + b_t, then the output gate and projection
        h, h_last = linear_scan(a, b, initial_state=st.h.to(acc), cu_seqlens=cu_seqlens)  # (B, T, E), (B|N, E)
        out = self.linear_out(h.to(x.dtype) * y)  # (B, T, D)
        started = torch.ones_like(st.started) if cu_seqlens is None else torch.where(  # an empty sequence keeps its own
            (cu_seqlens[1:] > cu_seqlens[:-1]).to(st.started.device), 1.0, st.started)
        return out, RGLRUState(h=h_last, conv=conv, started=started)


def _first_tokens(B: int, T: int, started: torch.Tensor, cu_seqlens: torch.Tensor | None) -> torch.Tensor:
    """(B, T, 1) True at the first token of every row (or packed sequence) that has not started."""
    first = torch.zeros(B, T, 1, dtype=torch.bool, device=started.device)
    if cu_seqlens is None:
        first[:, 0, 0] = started == 0
        return first
    cu = check_cu_seqlens(cu_seqlens, B, T)
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        if b > a:
            first[0, a, 0] = started[n] == 0
    return first
