"""The mixer contract: ``y, state = mixer(x, state=None)``.

Every token mixer derives from :class:`Mixer`. The base class checks the input and the state once,
in :meth:`Mixer.forward`, so a layer's :meth:`Mixer.mix` sees only well-formed arguments.

Parameters belong to their layer: each mixer initialises all of its parameters in
:meth:`Mixer.reset_parameters` (called at the end of its ``__init__``, following its paper's
reference implementation), and names the ones that skip weight decay in
:meth:`Mixer.no_weight_decay`. A mixer built alone and the same mixer inside a model therefore
start from the same weights (for the same seed) and are trained alike.

A prefix: ``mixer(x, state, prefix_len=P)`` marks the first P tokens of x (of each row, or of each
sequence with ``cu_seqlens``) as a prompt that may be read non-causally. Only mixers with
``reads_prefix`` (JRT-RNN's prefix linear attention) use it; every other mixer accepts and ignores
it. After the prefix the chunking law holds as always: the prefix goes in one call, and the rest
may then be split anywhere.
"""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field
from typing import Any, ClassVar

import torch
from torch import nn

from ..ops.bounds import check_cu_seqlens, state_rows
from .common import NORM_TYPES
from .state import State, StateError

__all__ = ["MixerConfig", "Mixer", "Range", "positive", "at_least", "check_tokens_input", "check_prefix_len",
           "state_batch"]


@dataclass(frozen=True)
class Range:
    """The numbers a config field accepts: above ``lo`` (or at it, unless ``lo_open``)."""

    lo: float  # the lower bound
    lo_open: bool = False  # True: lo itself is refused

    def __contains__(self, value: float) -> bool:
        return value > self.lo if self.lo_open else value >= self.lo

    def __str__(self) -> str:
        return f"{'>' if self.lo_open else '>='} {self.lo}"


def positive(default: float) -> Any:
    """A config field (default ``default``) that must be > 0, e.g. a norm's epsilon or a base."""
    return field(default=default, metadata={"range": Range(0, lo_open=True)})


def at_least(lo: int, default: int | float | None) -> Any:
    """A config field (default ``default``) that must be >= ``lo`` when set (None is left to the
    config's own rule), e.g. a convolution width that cannot be 0."""
    return field(default=default, metadata={"range": Range(lo)})


@dataclass
class MixerConfig:
    """Fields every mixer config has.

    A field declared with :func:`positive` or :func:`at_least` carries its range; the checks here
    refuse a value outside it, naming the field. ``renamed`` maps option names a config used to
    have to their new names: :func:`rnnlab.models.registry.make_config` and the layout parser
    still accept them (with a FutureWarning)."""

    d_model: int  # model width D

    renamed: ClassVar[dict[str, str]] = {}  # old option name -> its new name

    def __post_init__(self) -> None:
        if not isinstance(self.d_model, int) or self.d_model < 1:
            raise ValueError(f"d_model must be a positive int, got {self.d_model!r}")
        # what holds for every config: no size is negative, no number is NaN or infinite (each
        # config checks its own finer rules after this; 0 is a "derive it" default in some)
        for f in dataclasses.fields(self):
            if not f.init:  # derived sizes: not set yet
                continue
            value = getattr(self, f.name)
            if isinstance(value, bool):
                continue
            if isinstance(value, int) and value < 0:
                raise ValueError(f"{f.name} must be >= 0, got {value}")
            if isinstance(value, float) and not math.isfinite(value):
                raise ValueError(f"{f.name} must be a finite number, got {value}")
            allowed = f.metadata.get("range")
            if allowed is not None and isinstance(value, (int, float)) and value not in allowed:
                raise ValueError(f"{f.name} must be {allowed}, got {value}")


def check_init_range(name: str, value: Any) -> None:
    """Refuse, naming the field, an initial range that is not (low, high) with 0 <= low <= high,
    both finite (a decay rate A ~ U(low, high) whose log is taken)."""
    ok = (isinstance(value, (tuple, list)) and len(value) == 2
          and all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in value)
          and 0 <= value[0] <= value[1])
    if not ok:
        raise ValueError(f"{name} must be (low, high) with 0 <= low <= high, both finite, got {value!r}")


def state_batch(x: torch.Tensor, cu_seqlens: torch.Tensor | None) -> int:
    """Rows of a mixer's state for input ``x`` (B, T, D): B, or N sequences with ``cu_seqlens``."""
    return x.shape[0] if cu_seqlens is None else cu_seqlens.numel() - 1


def _param_dtype(module: nn.Module) -> torch.dtype | None:
    for p in module.parameters():
        return p.dtype
    return None


class Mixer(nn.Module):
    """Base class of token mixers.

    Subclasses set ``config_cls`` and ``state_cls``, implement :meth:`init_state` (the state
    before any token: zeros for recurrent mixers, an empty cache for attention), :meth:`mix` and
    :meth:`reset_parameters` (called at the end of their ``__init__``), and list in
    ``no_decay_params`` the parameters (besides biases and norm weights) that skip weight decay.
    ``recurrent`` is True when the state size does not depend on the number of tokens seen.
    """

    config_cls: ClassVar[type[MixerConfig]] = MixerConfig
    state_cls: ClassVar[type[State]] = State
    recurrent: ClassVar[bool] = True
    # parameter names (as in named_parameters()) that skip weight decay besides the biases and norm
    # weights found by module type: decays, eigenvalues, time steps, skip gains, gate biases.
    # A name that is a buffer in some configuration (e.g. a fixed A) is skipped there.
    no_decay_params: ClassVar[tuple[str, ...]] = ()
    # True: mix() takes ``prefix_len`` (a prompt read non-causally, JRT-RNN); other mixers ignore it
    reads_prefix: ClassVar[bool] = False
    # True: the one-token step (T = 1, no cu_seqlens) traces into one torch.compile graph, so
    # LM.compile_step compiles it. False where the step reads positions on the host (KV-cache
    # writes, chunk bookkeeping, range checks): such blocks stay eager between compiled ones.
    step_compiles: ClassVar[bool] = True

    def __init__(self, config: MixerConfig):
        super().__init__()
        if not isinstance(config, self.config_cls):
            raise TypeError(f"{type(self).__name__} needs a {self.config_cls.__name__}, got {type(config).__name__}")
        self.config = config

    # -- to implement ---------------------------------------------------------------------------
    def init_state(self, batch_size: int, device: torch.device | str | None = None,
                   dtype: torch.dtype | None = None) -> State:
        """The state before the first token, for ``batch_size`` sequences."""
        raise NotImplementedError

    def mix(self, x: torch.Tensor, state: State | None,
            cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """(B, T, D), state -> (B, T, D), new state. Arguments are already checked; with
        ``cu_seqlens`` (N sequences packed in one row) ``state`` and the new state have N rows
        (:func:`state_batch`)."""
        raise NotImplementedError

    def reset_parameters(self) -> None:
        """(Re-)initialise every parameter of the layer as its paper's reference implementation
        does (the docstring of each layer says which). Called at the end of ``__init__``."""
        raise NotImplementedError(f"{type(self).__name__} must implement reset_parameters()")

    # -- parameters -----------------------------------------------------------------------------
    def no_weight_decay(self) -> set[str]:
        """Names (relative to this mixer, as in ``named_parameters()``) of the parameters that skip
        weight decay: the biases of Linear/convolution modules, every parameter of normalisation
        modules (RMSNorm, LayerNorm, GroupNorm), and the layer's own ``no_decay_params``."""
        names: set[str] = set()
        for mname, m in self.named_modules():
            prefix = f"{mname}." if mname else ""
            if isinstance(m, NORM_TYPES):
                names |= {prefix + n for n, _ in m.named_parameters(recurse=False)}
            elif isinstance(m, (nn.Linear, nn.modules.conv._ConvNd)) and m.bias is not None:
                names.add(prefix + "bias")
        params = dict(self.named_parameters())
        buffers = dict(self.named_buffers())
        for n in self.no_decay_params:
            if n in params:
                names.add(n)
            elif n not in buffers:
                raise AttributeError(f"{type(self).__name__}.no_decay_params names {n!r}, which is neither a "
                                     f"parameter nor a buffer; parameters are {sorted(params)}")
        return names & set(params)

    # -- the contract ---------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, state: State | None = None, cu_seqlens: torch.Tensor | None = None,
                prefix_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """Mix ``x`` (B, T, D) given the ``state`` after the previous tokens (None = start).

        Returns ``y`` (B, T, D) and the state after the last token of ``x``.

        ``cu_seqlens``: None, or int64 (N + 1,) cumulative lengths ``[0, l_1, l_1 + l_2, ..., T]``
        of N sequences packed in one row (B = 1). Each sequence starts from its own row of
        ``state`` (N rows; None: the initial state) and ends in its own row of the returned state;
        nothing crosses a boundary (:mod:`rnnlab.ops.bounds`).

        ``prefix_len``: None, an int, or one int per row (per sequence with ``cu_seqlens``): the
        first tokens of x form a prompt that mixers with ``reads_prefix`` read non-causally; the
        others ignore it (:func:`check_prefix_len`).
        """
        self.check_input(x)
        cu = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
        prefix = check_prefix_len(prefix_len, x.shape[0], x.shape[1], cu, x.device)
        if state is not None:
            rows = state_rows(x.shape[0], cu)
            if cu is not None and isinstance(state, State) and state.batch_size != rows:
                raise StateError(f"state has {state.batch_size} rows, but cu_seqlens holds N = {rows} sequences: "
                                 "the state needs one row (initial state) per sequence")
            self.check_state(state, rows)
        return self.call_mix(x, state, cu_seqlens, prefix)

    def call_mix(self, x: torch.Tensor, state: State | None, cu_seqlens: torch.Tensor | None = None,
                 prefix_len: torch.Tensor | None = None) -> tuple[torch.Tensor, State]:
        """:meth:`mix` on checked arguments, given ``prefix_len`` (from :func:`check_prefix_len`)
        only if the mixer ``reads_prefix``."""
        if self.reads_prefix:
            return self.mix(x, state, cu_seqlens, prefix_len=prefix_len)
        return self.mix(x, state, cu_seqlens)

    def check_input(self, x: torch.Tensor) -> None:
        """Raise a ValueError/TypeError naming ``x`` unless it is a (B, T, d_model) float tensor."""
        if not isinstance(x, torch.Tensor):
            raise TypeError(f"x must be a torch.Tensor of shape (B, T, {self.config.d_model}), got {type(x).__name__}")
        if x.dim() != 3:
            raise ValueError(f"x must have shape (B, T, D) = (B, T, {self.config.d_model}), got {tuple(x.shape)}")
        if x.shape[-1] != self.config.d_model:
            raise ValueError(f"x has width {x.shape[-1]}, but this {type(self).__name__} has d_model={self.config.d_model}")
        if x.shape[1] < 1:
            raise ValueError("x must hold at least one token (T >= 1)")
        if not x.is_floating_point():
            raise TypeError(f"x must be a floating-point tensor, got {x.dtype}")
        pdt = _param_dtype(self)
        if pdt is not None and x.dtype != pdt and not torch.is_autocast_enabled(x.device.type):
            raise TypeError(f"x has dtype {x.dtype} but the parameters are {pdt}; cast one of them "
                            "(or run under torch.autocast)")

    def check_state(self, state: State, batch_size: int) -> None:
        """Raise :class:`StateError` unless ``state`` belongs to this mixer and batch size (the
        number of sequences with ``cu_seqlens``)."""
        if not isinstance(state, State):
            raise StateError(f"state must be a {self.state_cls.__name__} or None, got {type(state).__name__}")
        refs = self.__dict__.setdefault("_state_refs", {})  # shapes depend on the config only: built once
        if batch_size not in refs:
            refs[batch_size] = self.init_state(batch_size, device="meta")
        state.check_like(refs[batch_size], where=f"{type(self).__name__} state")

    def state_size(self, batch_size: int = 1, dtype: torch.dtype = torch.float32) -> int:
        """Bytes of the initial state (for recurrent mixers: the state at any time)."""
        return self.init_state(batch_size, device="meta", dtype=dtype).nbytes

    def extra_repr(self) -> str:
        return f"{type(self.config).__name__}"


def check_prefix_len(prefix_len: int | torch.Tensor | list[int] | None, B: int, T: int, cu: list[int] | None,
                     device: torch.device | str | None = None) -> torch.Tensor | None:
    """Validate ``prefix_len`` for inputs of batch B and length T (``cu`` from
    :func:`rnnlab.ops.bounds.check_cu_seqlens`): None, an int for every row, or one int per row
    (per sequence with ``cu_seqlens``), each between 0 and the length of its row. Returns None,
    or the lengths as an int64 (R,) tensor on ``device`` (R = B, or N sequences)."""
    if prefix_len is None:
        return None
    lengths = [T] * B if cu is None else [b - a for a, b in zip(cu, cu[1:])]
    what = "row" if cu is None else "sequence (cu_seqlens)"
    bad = TypeError(f"prefix_len must be None, an int or integers (one per {what}), got {prefix_len!r}")
    if isinstance(prefix_len, int) and not isinstance(prefix_len, bool):
        values = [prefix_len] * len(lengths)
    elif isinstance(prefix_len, (list, tuple)) or isinstance(prefix_len, torch.Tensor) and prefix_len.dim() == 1 \
            and not (prefix_len.is_floating_point() or prefix_len.is_complex() or prefix_len.dtype == torch.bool):
        values = prefix_len.tolist() if isinstance(prefix_len, torch.Tensor) else list(prefix_len)
        if not all(isinstance(v, int) and not isinstance(v, bool) for v in values):
            raise bad
        if len(values) != len(lengths):
            raise ValueError(f"prefix_len must be an int or {len(lengths)} integers (one per {what}), got {len(values)}")
    else:
        raise bad
    for i, (p, n) in enumerate(zip(values, lengths)):
        if not 0 <= p <= n:
            raise ValueError(f"prefix_len must lie in [0, length] for each {what}: got {p} for {what.split()[0]} {i} "
                             f"of length {n}")
    return torch.tensor(values, dtype=torch.int64, device=device)


def check_tokens_input(tokens: torch.Tensor, vocab_size: int) -> None:
    """Raise a clear error unless ``tokens`` is a (B, T) integer tensor of ids < vocab_size."""
    if not isinstance(tokens, torch.Tensor):
        raise TypeError(f"tokens must be a (B, T) int64 tensor, got {type(tokens).__name__}")
    if tokens.dim() != 2:
        raise ValueError(f"tokens must have shape (B, T), got {tuple(tokens.shape)}")
    if tokens.dtype not in (torch.int64, torch.int32, torch.int16, torch.uint8):
        raise TypeError(f"tokens must be integer ids (int64), got {tokens.dtype}")
    if tokens.shape[1] < 1:
        raise ValueError("tokens must hold at least one token (T >= 1)")
    if not tokens.numel():
        return
    lo, hi = torch.aminmax(tokens)
    if tokens.device.type != "cpu":  # no host sync on accelerators: the check fails on the device
        torch._assert_async((lo >= 0) & (hi < vocab_size), f"token ids must lie in [0, {vocab_size})")
    elif int(lo) < 0 or int(hi) >= vocab_size:
        raise ValueError(f"token ids must lie in [0, {vocab_size}), got range [{int(lo)}, {int(hi)}]")


__all__ += ["State", "StateError"]
