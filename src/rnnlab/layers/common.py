"""Building blocks shared by the architecture files: norms, the short causal convolution, RoPE,
and the initialisation helpers the layers' ``reset_parameters`` use."""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from ..ops.bounds import PrefixLayout
from ..ops.registry import fused

__all__ = ["RMSNorm", "GatedRMSNorm", "l2_normalize", "ShortConv", "apply_rope", "NORM_TYPES", "xavier_linears_",
           "normal_linears_", "default_init_", "reset_norms_", "log_uniform_dt", "inverse_softplus", "split_heads", "with_normaliser", "normalised"]


class RMSNorm(nn.Module):
    """RMSNorm over the last dimension: ``x / rms(x) * weight`` (computed in float32), or with
    ``plus_one`` ``x / rms(x) * (1 + weight)`` with weight initialised to 0 (Gemma's form)."""

    def __init__(self, dim: int, eps: float = 1e-6, plus_one: bool = False):
        super().__init__()
        self.eps, self.plus_one = eps, plus_one
        self.weight = nn.Parameter(torch.zeros(dim) if plus_one else torch.ones(dim))

    def reset_parameters(self) -> None:
        """The identity: weight = 1 (weight = 0 with ``plus_one``)."""
        (nn.init.zeros_ if self.plus_one else nn.init.ones_)(self.weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return fused(_rms_norm)(x, self.weight, self.eps, self.plus_one)


class GatedRMSNorm(RMSNorm):
    """``RMSNorm(x) * silu(z)`` (Mamba-2 / Gated DeltaNet output norm), over the last dimension."""

    def forward(self, x: torch.Tensor, z: torch.Tensor) -> torch.Tensor:  # type: ignore[override]
        return fused(_gated_rms_norm)(x, z, self.weight, self.eps, self.plus_one)


def _rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float, plus_one: bool) -> torch.Tensor:
    acc = torch.promote_types(x.dtype, torch.float32)
    xf = x.to(acc)
    y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + eps)
    w = weight.to(acc)
    return (y * (1 + w if plus_one else w)).to(x.dtype)


def _gated_rms_norm(x, z, weight, eps: float, plus_one: bool) -> torch.Tensor:
    return _rms_norm(x, weight, eps, plus_one) * F.silu(z.to(torch.promote_types(z.dtype, torch.float32))).to(x.dtype)


def l2_normalize(x: torch.Tensor) -> torch.Tensor:
    """``x / max(||x||, 1e-12)`` over the last dimension (``F.normalize``), fused on the compile backend."""
    return fused(_l2_normalize)(x)


def _l2_normalize(x: torch.Tensor) -> torch.Tensor:
    return F.normalize(x, dim=-1)


def _depthwise_cl(xp: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    """Valid depthwise convolution of xp (B, W-1+n, C) with weight (C, 1, W) as a channels-last
    conv2d, which reads the (B, time, C) memory as it lies: (B, n, C), no transposed copies."""
    x4 = xp.unsqueeze(1).permute(0, 3, 1, 2)  # (B, C, 1, W-1+n) viewing (B, W-1+n, C) memory
    y = F.conv2d(x4, weight.unsqueeze(2), bias, groups=xp.shape[2])  # (B, C, 1, n) channels-last
    return y.permute(0, 2, 3, 1).squeeze(1)  # (B, n, C), contiguous


class _CausalConvCPU(torch.autograd.Function):
    """:func:`_depthwise_cl` with its backward written out: the input's gradient is the same kind of
    convolution (of the zero-padded output gradient with the flipped kernel), the kernel's gradient
    W sums of products. On CPU this is several times faster than the generic depthwise backward."""

    @staticmethod
    def forward(ctx, xp, weight, bias):
        ctx.save_for_backward(xp, weight)
        ctx.bias_dtype = None if bias is None else bias.dtype
        return _depthwise_cl(xp, weight, bias)

    @staticmethod
    def backward(ctx, gy):
        xp, weight = ctx.saved_tensors
        # it may arrive in another layout (a later rearrange's gradient) and, under autocast, in
        # the lower precision the forward ran in: products need xp's layout and dtype
        gy = gy.contiguous().to(xp.dtype)
        W, n = weight.shape[-1], gy.shape[1]
        gx = gw = gb = None
        if ctx.needs_input_grad[0]:  # dxp[s] = sum_j w[j] gy[s - j]
            gx = _depthwise_cl(F.pad(gy, (0, 0, W - 1, W - 1)), weight.flip(-1).to(gy.dtype), None)  # (B, W-1+n, C)
        if ctx.needs_input_grad[1]:  # dw[c, j] = sum_{b, t} gy[b, t, c] xp[b, t + j, c]
            gw = torch.stack([torch.linalg.vecdot(gy, xp[:, j:j + n], dim=1).sum(0) for j in range(W)], dim=-1)
            gw = gw[:, None].to(weight.dtype)  # (C, 1, W)
        if ctx.bias_dtype is not None and ctx.needs_input_grad[2]:
            gb = gy.sum((0, 1)).to(ctx.bias_dtype)  # (C,)
        return gx, gw, gb


class ShortConv(nn.Module):
    """Causal depthwise 1-D convolution of width W over time, with its last W-1 inputs as state.

    ``y, conv_state = conv(x, conv_state, cu_seqlens=None)``: x (B, T, C) -> y (B, T, C);
    conv_state (B, W-1, C). With ``cu_seqlens`` (N sequences packed in one row, B = 1, already
    checked) conv_state has N rows and each sequence's window sees only its own state and inputs
    (:class:`rnnlab.ops.bounds.PrefixLayout`).

    Width 0 is no convolution (a layer's ``conv_size = 0``): y = SiLU(x) (x itself without
    ``activation``), no parameters, and a conv_state of shape (B, 0, C).
    """

    def __init__(self, channels: int, width: int = 4, bias: bool = False, activation: bool = True):
        super().__init__()
        if width < 0:
            raise ValueError(f"conv width must be >= 0 (0 = no convolution), got {width}")
        self.channels, self.width, self.activation = channels, width, activation
        self.conv = nn.Conv1d(channels, channels, width, groups=channels, bias=bias) if width else None

    def reset_parameters(self) -> None:
        """PyTorch's Conv1d default (kaiming-uniform weight, uniform bias), as the references keep."""
        if self.conv is not None:
            self.conv.reset_parameters()

    def init_state(self, batch_size: int, device=None, dtype=None) -> torch.Tensor:
        return torch.zeros(batch_size, max(self.width - 1, 0), self.channels, device=device,
                           dtype=dtype or torch.float32)

    def forward(self, x: torch.Tensor, conv_state: torch.Tensor | None,
                cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        B, T, C = x.shape
        W1 = self.width - 1
        cu = None if cu_seqlens is None else cu_seqlens.tolist()
        if conv_state is None:
            conv_state = self.init_state(B if cu is None else len(cu) - 1, x.device, x.dtype)
        if self.conv is None:  # width 0: no convolution, nothing to remember
            return (F.silu(x) if self.activation else x), conv_state
        if cu is None:
            xp = torch.cat([conv_state.to(x.dtype), x], dim=1)  # (B, W-1+T, C)
            # the state is a copy: a view would keep all of xp alive (a prefill's whole input) and
            # give the state other strides after a prefill than after a step
            return self._conv(xp), xp[:, xp.shape[1] - W1:].clone(memory_format=torch.contiguous_format)
        layout = PrefixLayout(cu, W1, x.device)
        xp = layout.pad(conv_state.to(x.dtype), x)  # (1, N(W-1)+T, C): each sequence after its own state
        return self._conv(xp)[:, layout.out], xp[0, layout.last]  # (1, T, C), (N, W-1, C)

    def _conv(self, xp: torch.Tensor) -> torch.Tensor:
        """The valid convolution (and SiLU) of xp (B, W-1+n, C): (B, n, C)."""
        n, C = xp.shape[1] - (self.width - 1), xp.shape[2]
        if n <= 16:  # decoding: a multiply-add over the window is ~10x faster than conv1d's call here
            y = (xp.unfold(1, self.width, 1) * self.conv.weight[:, 0]).sum(-1)  # (B, n, C)
            if self.conv.bias is not None:
                y = y + self.conv.bias
        elif xp.device.type == "cpu":
            y = _CausalConvCPU.apply(xp, self.conv.weight, self.conv.bias)  # (B, n, C)
        else:
            y = self.conv(xp.transpose(1, 2)).transpose(1, 2)  # (B, n, C)
        return F.silu(y) if self.activation else y


def apply_rope(x: torch.Tensor, pos: torch.Tensor, theta: float = 10000.0) -> torch.Tensor:
    """Rotary position embedding (rotate-half convention) of x (B, H, T, K) at integer positions
    pos (T,) or, one per row, (B, T). Angles are computed in float64 (exact for large positions)."""
    K, acc = x.shape[-1], torch.promote_types(x.dtype, torch.float32)
    inv_freq = theta ** (-torch.arange(0, K, 2, device=x.device, dtype=torch.float64) / K)  # (K/2,)
    ang = pos.to(torch.float64)[..., None] * inv_freq  # (T, K/2) or (B, T, K/2)
    ang = ang if pos.dim() == 1 else ang[:, None]  # (T, K/2) or (B, 1, T, K/2)
    cos, sin = torch.cat([ang.cos()] * 2, -1).to(acc), torch.cat([ang.sin()] * 2, -1).to(acc)  # (.., T, K)
    x1, x2 = x.to(acc).chunk(2, dim=-1)
    rot = torch.cat([-x2, x1], dim=-1)
    return (x.to(acc) * cos + rot * sin).to(x.dtype)


# -- initialisation helpers ---------------------------------------------------------------------------
NORM_TYPES: tuple[type[nn.Module], ...] = (RMSNorm, nn.RMSNorm, nn.LayerNorm, nn.GroupNorm,
                                           nn.modules.batchnorm._NormBase)
"""Normalisation modules: their parameters are initialised to the identity and never weight-decayed."""


def xavier_linears_(module: nn.Module, gain: float = 1.0) -> None:
    """``xavier_uniform_(weight, gain)`` on every ``nn.Linear`` inside ``module``; biases to zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.xavier_uniform_(m.weight, gain=gain)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def normal_linears_(module: nn.Module, std: float = 0.02) -> None:
    """``N(0, std)`` on the weight of every ``nn.Linear`` inside ``module``; biases to zero."""
    for m in module.modules():
        if isinstance(m, nn.Linear):
            nn.init.normal_(m.weight, 0.0, std)
            if m.bias is not None:
                nn.init.zeros_(m.bias)


def default_init_(module: nn.Module, zero_linear_bias: bool = False) -> None:
    """PyTorch's own init of every Linear, convolution and norm inside ``module`` (Linear and Conv:
    kaiming-uniform weight, uniform bias; norms: identity); ``zero_linear_bias`` zeroes the
    Linear biases afterwards (as mamba_ssm's model init does)."""
    for m in module.modules():
        if isinstance(m, (nn.Linear, nn.modules.conv._ConvNd) + NORM_TYPES):
            m.reset_parameters()
            if zero_linear_bias and isinstance(m, nn.Linear) and m.bias is not None:
                nn.init.zeros_(m.bias)


def reset_norms_(module: nn.Module) -> None:
    """Every normalisation module inside ``module`` back to the identity (weight 1, bias 0)."""
    for m in module.modules():
        if isinstance(m, NORM_TYPES):
            m.reset_parameters()


def log_uniform_dt(shape, dt_min: float, dt_max: float, floor: float = 0.0) -> torch.Tensor:
    """Initial step sizes (Mamba's scheme): log-uniform in [dt_min, dt_max] (one ``torch.rand``
    draw of ``shape``), clamped below at ``floor``."""
    log_min, log_max = math.log(dt_min), math.log(dt_max)
    return torch.exp(torch.rand(shape) * (log_max - log_min) + log_min).clamp(min=floor)


def inverse_softplus(y: torch.Tensor) -> torch.Tensor:
    """x with softplus(x) = y (y > 0): the bias that makes a softplus start at y."""
    return y + torch.log(-torch.expm1(-y))


def split_heads(d_model: int, num_heads: int, head_dim: int | None) -> int:
    """The head dimension K: ``head_dim``, or d_model / num_heads when it is None (then
    num_heads must divide d_model). Raises a ValueError naming the field otherwise."""
    if not isinstance(num_heads, int) or num_heads < 1:
        raise ValueError(f"num_heads must be a positive int, got {num_heads!r}")
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(f"d_model={d_model} is not divisible by num_heads={num_heads}; set head_dim")
        return d_model // num_heads
    if not isinstance(head_dim, int) or head_dim < 1:
        raise ValueError(f"head_dim must be a positive int, got {head_dim!r}")
    return head_dim


def with_normaliser(v: torch.Tensor) -> torch.Tensor:
    """[v, 1] (..., V+1): run through a linear-attention state, the last column accumulates the
    normaliser z = sum φ(k), so one recurrence gives both the numerator and φ(q)·z."""
    return torch.cat([v, torch.ones_like(v[..., :1])], dim=-1)


def normalised(o: torch.Tensor, eps: float) -> torch.Tensor:
    """The read of a state built with :func:`with_normaliser` divided by its last column, φ(q)·z
    (+ eps): (..., V+1) -> (..., V)."""
    return o[..., :-1] / (o[..., -1:] + eps)
