"""Typed, immutable mixer states.

Every mixer's state is a frozen dataclass deriving from :class:`State`. Its fields are tensors
(batch first), ``None`` (a part the mixer does not use) or plain ints (counters). A state knows its
size in bytes, moves between devices and dtypes, and flattens to named tensors + JSON-able scalars
for saving (see :mod:`rnnlab.inference.state_io`).
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, ClassVar

import torch

__all__ = ["State", "StateError"]


class StateError(ValueError):
    """A state does not fit the mixer or model it is given to."""


_COMPLEX_OF = {torch.float32: torch.complex64, torch.float64: torch.complex128,
               torch.bfloat16: torch.complex64, torch.float16: torch.complex64}


@dataclass(frozen=True)
class State:
    """Base class of mixer states: a frozen dataclass of tensors, ``None`` and ints.

    Subclasses list their tensor fields with batch as the first dimension. ``variable_dims`` names
    the dimensions of a field whose size may change with the number of tokens seen (a KV cache's
    length); every other dimension must match the mixer's :meth:`Mixer.init_state` exactly.
    """

    variable_dims: ClassVar[dict[str, tuple[int, ...]]] = {}

    # -- introspection -----------------------------------------------------------------------
    def tensors(self) -> dict[str, torch.Tensor]:
        """The tensor fields by name (``None`` fields left out)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), torch.Tensor)}

    def scalars(self) -> dict[str, int]:
        """The integer fields by name."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(self)
                if isinstance(getattr(self, f.name), int)}

    @property
    def nbytes(self) -> int:
        """Bytes held by the state's tensors."""
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def batch_size(self) -> int:
        """The batch size of the state (first dimension of its tensors)."""
        ts = list(self.tensors().values())
        return ts[0].shape[0] if ts else 0

    # -- conversion ----------------------------------------------------------------------------
    def to(self, device: Any = None, dtype: torch.dtype | None = None) -> "State":
        """A copy on ``device`` with floating tensors cast to ``dtype`` (complex to its complex
        counterpart, integer tensors unchanged)."""
        def move(t: torch.Tensor) -> torch.Tensor:
            if dtype is None or not (t.is_floating_point() or t.is_complex()):
                return t.to(device=device)
            target = _COMPLEX_OF[dtype] if t.is_complex() else dtype
            return t.to(device=device, dtype=target)
        return dataclasses.replace(self, **{k: move(v) for k, v in self.tensors().items()})

    def detach(self) -> "State":
        """A copy cut from the autograd graph (for truncated back-propagation through time)."""
        return dataclasses.replace(self, **{k: v.detach() for k, v in self.tensors().items()})

    # -- rows (a state is a batch of sequences) ---------------------------------------------------
    def select(self, rows: "torch.Tensor | list[int] | slice") -> "State":
        """The state of the sequences ``rows`` (a slice, or batch indices as a list or an int64
        tensor) as a state of its own; rows stay a batch, so a single int is refused."""
        if isinstance(rows, slice):
            return dataclasses.replace(self, **{k: t[rows] for k, t in self.tensors().items()})
        if not isinstance(rows, (torch.Tensor, list, tuple)) or isinstance(rows, torch.Tensor) and rows.dim() != 1:
            raise TypeError(f"index must be a slice or an index tensor (rows stay a batch), got {type(rows).__name__}")
        pick = lambda t: t.index_select(0, torch.as_tensor(rows, dtype=torch.long, device=t.device))  # noqa: E731
        return dataclasses.replace(self, **{k: pick(t) for k, t in self.tensors().items()})

    def split(self, sizes: int | list[int] = 1) -> list["State"]:
        """The state cut along the batch into pieces of ``sizes`` rows (an int: equal pieces)."""
        bounds, n = [], 0
        for size in ([sizes] * -(-self.batch_size // sizes) if isinstance(sizes, int) else sizes):
            bounds.append(slice(n, min(n + size, self.batch_size)))
            n += size
        if n < self.batch_size or (not isinstance(sizes, int) and n != self.batch_size):
            raise StateError(f"split sizes {sizes} do not add up to the batch size {self.batch_size}")
        return [self.select(b) for b in bounds]

    @classmethod
    def cat(cls, states: list["State"]) -> "State":
        """States of one mixer stacked along their rows (a ragged batch when they sit at different
        positions). Dimensions listed in ``variable_dims`` are zero-padded at their end to the
        largest size; integer fields must agree."""
        if not states or any(type(s) is not type(states[0]) for s in states):
            raise StateError(f"states must be a non-empty list of one state type, got {[type(s).__name__ for s in states]}")
        if any(s.scalars() != states[0].scalars() for s in states):
            raise StateError(f"states to concatenate have different counters: {[s.scalars() for s in states]}")

        def stack(name: str) -> torch.Tensor:
            ts = [s.tensors()[name] for s in states]
            size = [max(t.shape[d] for t in ts) for d in range(ts[0].dim())]
            pads = []
            for t in ts:
                for d in cls.variable_dims.get(name, ()):
                    grow = [0, 0] * (t.dim() - 1 - d) + [0, size[d] - t.shape[d]]
                    t = torch.nn.functional.pad(t, grow)
                pads.append(t)
            return torch.cat(pads, dim=0)
        return dataclasses.replace(states[0], **{k: stack(k) for k in states[0].tensors()})

    @classmethod
    def from_parts(cls, tensors: dict[str, torch.Tensor], scalars: dict[str, int]) -> "State":
        """Rebuild a state from :meth:`tensors` and :meth:`scalars` output; absent fields are None."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = (set(tensors) | set(scalars)) - names
        if unknown:
            raise StateError(f"{cls.__name__} has no field(s) {sorted(unknown)}; fields are {sorted(names)}")
        kw = {n: None for n in names}
        kw.update(tensors)
        kw.update(scalars)
        return cls(**kw)

    def check_like(self, ref: "State", where: str = "state") -> None:
        """Raise :class:`StateError` unless this state has the type and shapes of ``ref``
        (dimensions listed in ``variable_dims`` may differ)."""
        if type(self) is not type(ref):
            raise StateError(f"{where}: expected a {type(ref).__name__}, got a {type(self).__name__} "
                             "(a state from another mixer?)")
        mine, theirs = self.tensors(), ref.tensors()
        if set(mine) != set(theirs):
            raise StateError(f"{where}: tensors {sorted(mine)} do not match the expected {sorted(theirs)}")
        for name, t in mine.items():
            r = theirs[name]
            free = self.variable_dims.get(name, ())
            same = t.dim() == r.dim() and all(a == b or i in free for i, (a, b) in enumerate(zip(t.shape, r.shape)))
            if not same:
                what = "batch size" if t.dim() and r.dim() and t.shape[0] != r.shape[0] else "shape"
                raise StateError(f"{where}.{name}: wrong {what}: got {tuple(t.shape)}, expected {tuple(r.shape)}"
                                 + (f" (dims {free} may vary)" if free else ""))
            if t.is_complex() != r.is_complex():
                raise StateError(f"{where}.{name}: expected a {'complex' if r.is_complex() else 'real'} tensor")
