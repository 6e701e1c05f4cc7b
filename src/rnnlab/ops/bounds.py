"""Sequence boundaries inside a packed row: ``cu_seqlens``, shared by every op that supports them.

With ``cu_seqlens`` (a 1-D int64 tensor of cumulative lengths ``[0, l_1, l_1 + l_2, ..., T]``,
N + 1 entries for N sequences) an op's inputs are one packed row (B = 1, T tokens) holding N
sequences back to back. Sequence n covers positions ``cu_seqlens[n] <= t < cu_seqlens[n + 1]``;
it starts from row n of ``initial_state`` (N rows in place of B; None: zeros) and ends in row n
of the final state. Nothing crosses a boundary. Zero-length sequences are allowed: their final
state is their initial state.

Two mechanisms, each written once here:

* :class:`Carry` hands the state from index to index (tokens in a reference loop, chunks in a
  chunked form): at the first index of sequence n the state is *replaced* by sequence n's initial
  state (a selection, so nothing, not even a NaN, carries over from the previous sequence), and
  at its last index the state is recorded as sequence n's final state. Without ``cu_seqlens`` it
  is the plain carry of a (B, ...) state from the first index to the last.
* :class:`ChunkLayout` lays a packed row out so that every sequence starts on a chunk boundary
  (each sequence padded to a multiple of the chunk size with neutral values), so a chunked form
  runs unchanged within chunks and only its pass across chunks uses a :class:`Carry`. The waste
  is at most C - 1 tokens per sequence.
* :class:`PrefixLayout` puts each sequence of a packed row after its own ``width`` rows of state,
  for causal convolutions whose state is their last inputs (short convolutions).

:func:`causal_product` is the masked intra-chunk product ``sum_{s <= t} A[t, s] U[s]`` that keeps
a non-finite value at a later position s out of earlier positions t (a plain ``A @ U`` computes
``0 * NaN = NaN`` for them).

Where they are used: reference loops of every family take a token :class:`Carry`
(:func:`token_carry`); the chunkwise-parallel matrix families (gated delta rule, mLSTM, GSA) use
:class:`ChunkLayout`; Titans' memory carries its state across mini-batch segments that never
cross a boundary (a :class:`Carry` over segments); the layers' short convolutions use
:class:`PrefixLayout`; the elementwise scan (family A) is a segmented scan
(:mod:`rnnlab.ops.scan`: at a sequence's first token ``h_t = a_t h0_n + b_t`` by selection), and
the ops built on time-chunks of it (selective scan, Longhorn, LTI scan, GSA's blocks) run the
pieces of the sequences in each time-chunk as a packed row of their own
(:func:`rnnlab.ops.scan.over_time_chunks`). Softmax attention takes a per-query first key (the
blockwise form) or, in the attention layer, runs SDPA sequence by sequence on views of the packed
row; the Newton form zeroes the Jacobian at first tokens. An FFT convolution (LTI) runs sequence
by sequence, with non-finite inputs selected out of the transform.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable

import torch

__all__ = ["check_cu_seqlens", "state_rows", "Segments", "Carry", "token_carry", "ChunkLayout", "PrefixLayout",
           "causal_product", "known_finite", "chunk_middle", "decay_factors_fit", "rows", "cat_rows"]


def check_cu_seqlens(cu_seqlens: torch.Tensor | None, B: int, T: int) -> list[int] | None:
    """Validate ``cu_seqlens`` for inputs of batch B and length T; return it as a list of ints
    (None for None). Raises ValueError naming ``cu_seqlens`` and what was expected."""
    if cu_seqlens is None:
        return None
    if not isinstance(cu_seqlens, torch.Tensor):
        raise ValueError(f"cu_seqlens must be a 1-D int64 tensor, got {type(cu_seqlens).__name__}")
    if cu_seqlens.dtype != torch.int64:
        raise ValueError(f"cu_seqlens must be int64, got {cu_seqlens.dtype}")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must be 1-D with N + 1 >= 2 entries, got shape {tuple(cu_seqlens.shape)}")
    if B != 1:
        raise ValueError(f"cu_seqlens needs one packed row (B = 1), got B = {B}")
    cu = cu_seqlens.tolist()
    if cu[0] != 0:
        raise ValueError(f"cu_seqlens must start at 0, got {cu[0]}")
    if any(b < a for a, b in zip(cu, cu[1:])):
        raise ValueError(f"cu_seqlens must be non-decreasing, got {cu}")
    if cu[-1] != T:
        raise ValueError(f"cu_seqlens must end at T = {T} (the packed row's length), got {cu[-1]}")
    return cu


def state_rows(B: int, cu: list[int] | None) -> int:
    """The number of rows of initial and final states: B, or N sequences with ``cu_seqlens``."""
    return B if cu is None else len(cu) - 1


def _map(fn: Callable, x: Any) -> Any:
    """``fn`` on every tensor of a state (a tensor or a tuple / NamedTuple of tensors)."""
    if isinstance(x, torch.Tensor):
        return fn(x)
    items = [_map(fn, a) for a in x]
    return type(x)(*items) if hasattr(x, "_fields") else tuple(items)


def rows(state: Any, a: int, b: int) -> Any:
    """Rows a .. b-1 of a state (a tensor or a tuple / NamedTuple of tensors)."""
    return _map(lambda x: x[a:b], state)


def cat_rows(states: list) -> Any:
    """Concatenate states (tensors or tuples of tensors) along their rows."""
    return _cat(states)


def _cat(states: list) -> Any:
    """Concatenate states along their batch (row) dimension."""
    first = states[0]
    if isinstance(first, torch.Tensor):
        return torch.cat(states, dim=0)
    items = [_cat([s[i] for s in states]) for i in range(len(first))]
    return type(first)(*items) if hasattr(first, "_fields") else tuple(items)


@dataclass(frozen=True)
class Segments:
    """Where the sequences of a row start and end along its indices (tokens or chunks), and how
    many rows of a state each has; no tensors, so a backward may keep it."""

    starts: dict[int, int]  # first index -> sequence
    ends: dict[int, int]  # last index -> sequence
    rows: list[int]  # rows of each sequence's state: [B] without boundaries, else 1 each

    def rows_of(self, x, n: int):
        """Sequence n's rows of a (rows, ...) state x (a view)."""
        return x if len(self.rows) == 1 else _map(lambda t: t[n:n + 1], x)

    def empty(self) -> list[int]:
        """The sequences without an index (zero length): their final state is their initial one."""
        return sorted(set(range(len(self.rows))) - set(self.starts.values()))


class Carry:
    """The state passed along indices 0 .. n_index - 1 (tokens or chunks) of a row.

    ``starts`` maps the first index of each non-empty sequence to its number, ``ends`` the last
    index; ``initial`` is the (rows, ...) initial state (a tensor or tuple of tensors) or None and
    ``zeros(rows)`` makes a zero state. Without ``cu_seqlens`` (``starts`` None) there is one
    "sequence" of B rows. Use as::

        carry = Carry(...)
        S = None
        for i in range(n_index):
            S = carry.enter(i, S)   # the sequence's initial state at its first index
            S = ... step ...
            carry.leave(i, S)       # recorded at its last index
        final = carry.final()       # (rows, ...)
    """

    def __init__(self, initial, zeros: Callable[[int], Any], rows: int, n_index: int,
                 starts: dict[int, int] | None = None, ends: dict[int, int] | None = None):
        if starts is None:  # no boundaries: one carry of all B rows
            self.segments = Segments({0: 0}, {n_index - 1: 0}, [rows])
        else:
            self.segments = Segments(starts, ends, [1] * rows)
        self._initial, self._zeros = initial, zeros
        self._finals: list = [None] * len(self.segments.rows)

    def _init(self, n: int):
        return self._zeros(self.segments.rows[n]) if self._initial is None else self.segments.rows_of(self._initial, n)

    def enter(self, i: int, state):
        """The state entering index i: sequence n's initial state if n starts at i, else ``state``."""
        n = self.segments.starts.get(i)
        return state if n is None else self._init(n)

    def leave(self, i: int, state) -> None:
        """Record ``state`` as the final state of the sequence ending at index i, if any."""
        n = self.segments.ends.get(i)
        if n is not None:
            self._finals[n] = state

    def final(self):
        """The final states of all sequences, (rows, ...); a zero-length one keeps its initial state."""
        finals = [self._init(n) if f is None else f for n, f in enumerate(self._finals)]
        return finals[0] if len(finals) == 1 else _cat(finals)


def token_carry(cu: list[int] | None, initial, zeros: Callable[[int], Any], B: int, T: int) -> Carry:
    """The :class:`Carry` of a reference loop over the T tokens (``cu`` from :func:`check_cu_seqlens`)."""
    if cu is None:
        return Carry(initial, zeros, B, T)
    seqs = [(n, a, b) for n, (a, b) in enumerate(zip(cu, cu[1:])) if b > a]
    return Carry(initial, zeros, len(cu) - 1, T, {a: n for n, a, _ in seqs}, {b - 1: n for n, _, b in seqs})


class ChunkLayout:
    """A packed row laid out in chunks of C tokens so that every sequence starts a chunk.

    ``cu`` from :func:`check_cu_seqlens`; sequence n of length L_n takes ceil(L_n / C) chunks,
    padded at its end. ``pad`` maps (1, T, ...) to (1, P, ...) (P = C x the number of chunks),
    ``unpad`` maps back, and :meth:`carry` gives the :class:`Carry` across chunks.
    """

    def __init__(self, cu: list[int], C: int, device: torch.device):
        self.cu, self.C = cu, C
        T = cu[-1]
        src, pos, self.starts, self.ends = [], [], {}, {}
        chunk = 0
        for n, (a, b) in enumerate(zip(cu, cu[1:])):
            if b == a:
                continue
            m = -(-(b - a) // C)
            self.starts[chunk], self.ends[chunk + m - 1] = n, n
            pos.extend(range(len(src), len(src) + b - a))
            src.extend(list(range(a, b)) + [T] * (m * C - (b - a)))  # T: the fill value
            chunk += m
        self.n_chunks = chunk
        self.padded_cu = [0]  # the cumulative lengths in the padded row
        for a, b in zip(cu, cu[1:]):
            self.padded_cu.append(self.padded_cu[-1] + -(-(b - a) // C) * C)
        self._src = torch.tensor(src, dtype=torch.long, device=device)  # (P,)
        self._pos = torch.tensor(pos, dtype=torch.long, device=device)  # (T,)

    def pad(self, x: torch.Tensor | None, fill: float = 0.0) -> torch.Tensor | None:
        """(1, T, ...) -> (1, P, ...): each sequence padded to whole chunks with ``fill``."""
        if x is None:
            return None
        filler = x.new_full((1, 1, *x.shape[2:]), fill)
        return torch.cat([x, filler], dim=1)[:, self._src]

    def unpad(self, y: torch.Tensor) -> torch.Tensor:
        """(1, P, ...) -> (1, T, ...): the real tokens back in packed order."""
        return y[:, self._pos]

    def carry(self, initial, zeros: Callable[[int], Any]) -> Carry:
        """The :class:`Carry` across the chunks."""
        return Carry(initial, zeros, len(self.cu) - 1, self.n_chunks, self.starts, self.ends)


class PrefixLayout:
    """A packed row laid out with each sequence preceded by its own ``width`` rows of state: the
    layout of a causal convolution of window ``width + 1`` whose state is its last ``width`` inputs.

    ``cu`` from :func:`check_cu_seqlens` (N sequences, T tokens). :meth:`pad` maps the state
    (N, width, ...) and the row (1, T, ...) to (1, N·width + T, ...); a valid convolution over it
    gives N·width + T - width outputs, of which :attr:`out` (T,) are the tokens' (no window
    reaches into another sequence), and :attr:`last` (N, width) indexes each sequence's last
    ``width`` rows of the padded row: its final state (its initial state for an empty sequence).
    """

    def __init__(self, cu: list[int], width: int, device: torch.device):
        N, T = len(cu) - 1, cu[-1]
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:])], device=device)  # (N,)
        seq = torch.repeat_interleave(torch.arange(N, device=device), lengths)  # (T,) each token's sequence
        t = torch.arange(T, device=device)
        starts = torch.tensor(cu[:-1], device=device)  # (N,)
        i = torch.arange(width, device=device)
        n = torch.arange(N, device=device)
        state_at = (starts + n * width)[:, None] + i  # (N, width) padded positions of the state rows
        src = torch.empty(N * width + T, dtype=torch.long, device=device)  # (N·width + T,)
        src[t + (seq + 1) * width] = N * width + t  # tokens, after their sequence's state rows
        src[state_at.flatten()] = (n[:, None] * width + i).flatten()
        self._src, self.width = src, width
        self.out = t + seq * width  # (T,)
        self.last = (torch.tensor(cu[1:], device=device) + n * width)[:, None] + i  # (N, width)

    def pad(self, state: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """state (N, width, ...), x (1, T, ...) -> (1, N·width + T, ...)."""
        return torch.cat([state.reshape(1, state.shape[0] * self.width, *state.shape[2:]), x], dim=1)[:, self._src]


def known_finite(*xs: torch.Tensor | None) -> bool:
    """True when every given tensor is known to hold only finite values, so that an op may skip
    the guards that keep a non-finite token out of earlier positions (they cost several passes
    over the data). Decided on CPU only, by one sum per tensor (any NaN or inf makes it non-finite;
    an overflow merely sends the op down the guarded path); on other devices the answer would
    cost a device-to-host sync per call, so it is always False there."""
    if torch.compiler.is_compiling() or any(x is not None and x.device.type != "cpu" for x in xs):
        return False
    with torch.no_grad():
        return all(x is None or bool(torch.isfinite(x.sum())) for x in xs)


# Largest |cumulative log-decay| within a chunk for which e^c and e^-c both lie far inside the
# dtype's range (float32 overflows at e^88.7, float64 at e^709).
_FACTOR_LIMIT = {torch.float64: 600.0}
_FACTOR_LIMIT_DEFAULT = 60.0


def chunk_middle(cum: torch.Tensor, dim: int = -2) -> torch.Tensor:
    """The cumulative log-decay at each chunk's middle position along ``dim`` (the position axis of
    a chunk), kept as a size-1 axis: the point factored decays are counted from, so that
    ``cum - chunk_middle(cum)`` spans at most half a chunk's decay either way."""
    return cum.narrow(dim, cum.shape[dim] // 2, 1)


def decay_factors_fit(cum: torch.Tensor) -> bool:
    """Whether every cumulative log-decay in ``cum`` (any shape, e.g. (B, H, N, C, K) counted from
    a point inside each chunk) lies within the range where a decay's scores may be formed as
    ``(x_t e^c_t) . (y_s e^-c_s)`` (two matmuls) instead of from the masked (C, C) decay matrix
    ((C, C, K) tensor for a vector decay): |c| <= 60 in float32 (and lower precisions), 600 in
    float64. One reduction and a host read: for CPU inputs already :func:`known_finite` (a
    non-finite value would leak through the matmuls into earlier positions). False while
    ``torch.compile`` traces: compiled code takes the masked form rather than read the host."""
    if torch.compiler.is_compiling():
        return False
    lo, hi = torch.aminmax(cum)
    limit = _FACTOR_LIMIT.get(cum.dtype, _FACTOR_LIMIT_DEFAULT)
    return bool(-limit <= lo) and bool(hi <= limit)


def causal_product(A: torch.Tensor, U: torch.Tensor) -> torch.Tensor:
    """``out[t] = sum_{s <= t} A[t, s] U[s]`` for A (..., C, C) already zero above the diagonal
    and U (..., C, V): one matmul, with non-finite entries of U kept out of earlier positions.

    ``A @ U`` would give ``0 * NaN = NaN`` at every t < s for a non-finite U[s, v]; here U is
    zeroed there (by selection) for the product and column v of ``out`` is NaN from t = s on,
    where the recurrence makes it non-finite anyway.
    """
    bad = ~torch.isfinite(U)
    out = A @ U.masked_fill(bad, 0.0)
    return out.masked_fill(bad.cumsum(dim=-2) > 0, float("nan"))
