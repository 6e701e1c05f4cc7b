"""Batch sources: iterables of ``(x, y)`` token batches that can save and restore their position.

The trainer calls ``iter()`` once and ``next()`` per micro-batch; ``state_dict()`` /
``load_state_dict()`` make a resumed run continue bit-identically. :class:`RandomWindows` draws
training windows; :class:`SequentialWindows` walks the data once in order for evaluation.
"""
from __future__ import annotations

import math
from typing import Iterator, Protocol, runtime_checkable

import torch

from .shards import TokenData

__all__ = ["BatchSource", "RandomWindows", "SequentialWindows", "IGNORE_INDEX", "document_bounds", "bos_windows"]

IGNORE_INDEX = -100  # target id of positions that are not scored (cross_entropy's ignore_index)


@runtime_checkable
class BatchSource(Protocol):
    """An iterable of ``(x, y)`` batches, both (B, T) int64, ``y = -100`` where not scored.

    ``state_dict()`` returns everything needed to continue exactly (small, picklable);
    ``load_state_dict(state)`` restores it.
    """

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]: ...

    def state_dict(self) -> dict: ...

    def load_state_dict(self, state: dict) -> None: ...


def _as_token_data(data) -> TokenData:
    if isinstance(data, TokenData):
        return data
    if isinstance(data, torch.Tensor):
        return TokenData.from_tensor(data)
    raise TypeError(f"data must be a TokenData (or a 1-D tensor of token ids), got {type(data).__name__}")


def _positive_int(name: str, value, minimum: int = 1) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an int >= {minimum}, got {value!r}")
    return value


def _check_rank(rank, world_size) -> tuple[int, int]:
    world_size = _positive_int("world_size", world_size)
    rank = _positive_int("rank", rank, 0)
    if rank >= world_size:
        raise ValueError(f"rank must be in [0, world_size={world_size}), got {rank}")
    return rank, world_size


def _check_boundaries(boundaries: bool, data) -> bool:
    if not isinstance(boundaries, bool):
        raise ValueError(f"boundaries must be True or False, got {boundaries!r}")
    if boundaries and data.eod_id is None:
        raise ValueError("boundaries=True needs data with an end-of-document token (eod_id); this data has none")
    return boundaries


def bos_windows(data, starts: torch.Tensor, seq_len: int, bos_id: int | None) -> torch.Tensor:
    """Windows of ``seq_len + 1`` tokens at ``starts`` (N,) of ``data``: (N, seq_len + 1); with
    ``bos_id`` each opens with that token followed by ``seq_len`` tokens of the data (so inputs
    ``[bos, t_0, ...]`` predict every data token, the first included)."""
    if bos_id is None:
        return data.windows(starts, seq_len + 1)
    w = data.windows(starts, seq_len)  # (N, T)
    return torch.cat([torch.full_like(w[:, :1], bos_id), w], dim=1)  # (N, T + 1)


def _check_bos(bos_id, data) -> int | None:
    if bos_id is None:
        return None
    if isinstance(bos_id, bool) or not isinstance(bos_id, int) or not 0 <= bos_id < data.vocab_size:
        raise ValueError(f"bos_id must be None or a token id in [0, vocab_size={data.vocab_size}), got {bos_id!r}")
    return bos_id


def _check_state(state, kind: str, expected: dict) -> None:
    if not isinstance(state, dict) or state.get("sampler") != kind:
        got = state.get("sampler") if isinstance(state, dict) else type(state).__name__
        raise ValueError(f"state is not a {kind} state (got {got!r})")
    for key, want in expected.items():
        if state.get(key) != want:
            raise ValueError(f"state was saved with {key}={state.get(key)!r} but this {kind} has {key}={want!r}; "
                             f"a run resumes on the same data and shapes (start a new sampler to change them)")


def document_bounds(x: torch.Tensor, eod_id: int) -> torch.Tensor:
    """``cu_seqlens`` (N + 1,) int64 of the rows of ``x`` (b, T) flattened into one packed row of
    b·T tokens: a sequence starts at every row start and after every ``eod_id`` token, so no state
    crosses a row's edge or a document's end. (The end-of-document token itself closes its
    document: it is the last input of one sequence.)"""
    b, T = x.shape
    after_eod = torch.zeros_like(x, dtype=torch.bool)
    after_eod[:, 1:] = x[:, :-1] == eod_id  # (b, T): a document starts here
    after_eod[:, 0] = True
    starts = after_eod.reshape(-1).nonzero().reshape(-1)  # (N,)
    return torch.cat([starts, torch.tensor([b * T])]).to(torch.int64)


class RandomWindows:
    """Random training windows: each step draws ``batch_size`` windows of ``seq_len + 1`` tokens.

    Args:
        data: the tokens (a :class:`TokenData`; a 1-D tensor is wrapped).
        batch_size: the global batch, summed over ranks; must be divisible by ``world_size``.
        seq_len: T, the tokens per row.
        seed: seeds this sampler's own ``torch.Generator`` (the global RNG is not touched).
        rank, world_size: this process's slice of the global batch.
        boundaries: also yield the documents' boundaries (see :func:`document_bounds`), so the
            model reads each document from a fresh state; False: documents run into each other.
        bos_id: None, or a beginning-of-sequence token that opens every window: the inputs are
            ``[bos_id, t_0, ..., t_{T-2}]`` and the targets ``t_0, ..., t_{T-1}`` (T tokens of the
            data, the first predicted from the BOS alone), as a language model trained on
            documents that open with BOS sees them; position 0 always holds the same token.

    Yields ``(x, y)``, each (batch_size // world_size, T) int64, ``y`` = ``x`` shifted by one token
    (every position scored); with ``boundaries``, ``(x, y, cu_seqlens)``. Every rank draws the same global batch and keeps rows
    ``[rank * b, (rank + 1) * b)``, so the ranks' union is the single-process batch and a run can
    resume under a different world size. Infinite.
    """

    def __init__(self, data, batch_size: int, seq_len: int, seed: int = 0, rank: int = 0, world_size: int = 1,
                 boundaries: bool = False, bos_id: int | None = None):
        self.data = _as_token_data(data)
        self.boundaries = _check_boundaries(boundaries, self.data)
        self.bos_id = _check_bos(bos_id, self.data)
        self.batch_size = _positive_int("batch_size", batch_size)
        self.seq_len = _positive_int("seq_len", seq_len)
        self.rank, self.world_size = _check_rank(rank, world_size)
        if self.batch_size % self.world_size:
            raise ValueError(f"batch_size ({batch_size}) must be divisible by world_size ({world_size})")
        self.local_batch_size = self.batch_size // self.world_size
        self._span = self.seq_len + (self.bos_id is None)  # data tokens per window
        if len(self.data) < self._span:
            need = "seq_len" if self.bos_id is not None else "seq_len + 1"
            raise ValueError(f"data has {len(self.data)} tokens, fewer than {need} = {self._span}")
        if isinstance(seed, bool) or not isinstance(seed, int):
            raise ValueError(f"seed must be an int, got {seed!r}")
        self.seed = seed
        self._gen = torch.Generator().manual_seed(seed)
        self.batches = 0  # batches drawn so far

    def next_batch(self) -> tuple[torch.Tensor, torch.Tensor]:
        """Draw the next global batch and return this rank's rows ``(x, y)``, each (b, T) int64."""
        before = self._gen.get_state()
        try:
            starts = torch.randint(0, len(self.data) - self._span + 1, (self.batch_size,), generator=self._gen)
            mine = starts[self.rank * self.local_batch_size:(self.rank + 1) * self.local_batch_size]
            w = bos_windows(self.data, mine, self.seq_len, self.bos_id)  # (b, T + 1)
        except BaseException:
            self._gen.set_state(before)  # a failed read does not advance the stream
            raise
        self.batches += 1
        x, y = w[:, :-1].contiguous(), w[:, 1:].contiguous()
        return (x, y, document_bounds(x, self.data.eod_id)) if self.boundaries else (x, y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, ...]]:
        while True:
            yield self.next_batch()

    def state_dict(self) -> dict:
        """The generator state (a uint8 tensor) and the batches drawn, with the shapes they belong to."""
        return {"sampler": "RandomWindows", "generator": self._gen.get_state(), "batches": self.batches,
                "seed": self.seed, "batch_size": self.batch_size, "seq_len": self.seq_len,
                "data_tokens": len(self.data), "bos_id": self.bos_id}

    def load_state_dict(self, state: dict) -> None:
        """Continue from ``state``; it must come from a sampler of the same seed, batch, seq_len, data size
        and bos_id (the world size may differ)."""
        _check_state(state, "RandomWindows", {"seed": self.seed, "batch_size": self.batch_size,
                                              "seq_len": self.seq_len, "data_tokens": len(self.data),
                                              "bos_id": self.bos_id})
        g = state.get("generator")
        if not isinstance(g, torch.Tensor) or g.dtype != torch.uint8:
            raise ValueError(f"state['generator'] must be a uint8 tensor (torch.Generator.get_state()), got {type(g).__name__}")
        self._gen.set_state(g.clone())
        self.batches = int(state["batches"])


class SequentialWindows:
    """Evaluation windows: the data once, in order, as non-overlapping windows (finite).

    Window i has inputs tokens ``[i*T, i*T + T)`` and targets ``[i*T + 1, i*T + T + 1)``, so every
    token but the first is scored exactly once. The last window is padded (inputs with ``eod_id``
    or 0, targets with -100). Batches hold ``batch_size`` consecutive windows; the last may hold
    fewer rows. ``max_batches`` keeps the first batches only. ``boundaries`` adds ``cu_seqlens``
    as :class:`RandomWindows` does. With ``bos_id`` every window opens with that token, as in
    :class:`RandomWindows`: inputs ``[bos_id] + tokens [i*T, i*T + T - 1)``, targets ``[i*T, i*T + T)``,
    so every token, the first included, is scored exactly once. With ``world_size > 1`` rank r takes
    batches r, r + world_size, ... (the union over ranks is the single-process pass).

    ``iter()`` continues from the current position (0, or what ``load_state_dict`` set); a pass that
    runs to the end rewinds to 0 for the next ``iter()``.
    """

    def __init__(self, data, batch_size: int, seq_len: int, max_batches: int | None = None,
                 rank: int = 0, world_size: int = 1, boundaries: bool = False, bos_id: int | None = None):
        self.data = _as_token_data(data)
        self.boundaries = _check_boundaries(boundaries, self.data)
        self.bos_id = _check_bos(bos_id, self.data)
        self._unscored = int(self.bos_id is None)  # the data's first token is scored only after a BOS
        self.batch_size = _positive_int("batch_size", batch_size)
        self.seq_len = _positive_int("seq_len", seq_len)
        if max_batches is not None:
            max_batches = _positive_int("max_batches", max_batches)
        self.max_batches = max_batches
        self.rank, self.world_size = _check_rank(rank, world_size)
        if len(self.data) < 2:
            raise ValueError(f"data has {len(self.data)} tokens; evaluation needs at least 2")
        self.num_windows = math.ceil((len(self.data) - self._unscored) / self.seq_len)
        total = math.ceil(self.num_windows / self.batch_size)
        self.total_batches = total if max_batches is None else min(total, max_batches)  # over all ranks
        self._pad = self.data.eod_id if self.data.eod_id is not None else 0
        self.position = 0  # batches of this rank already yielded in the current pass

    def _global_batches(self) -> range:
        return range(self.rank, self.total_batches, self.world_size)

    def __len__(self) -> int:
        """Batches this rank yields in a full pass."""
        return len(self._global_batches())

    @property
    def scored_tokens(self) -> int:
        """Targets scored over a full pass of all ranks (without ``max_batches``: ``len(data) - 1``, or
        ``len(data)`` with ``bos_id``)."""
        last = min(self.total_batches * self.batch_size, self.num_windows)
        return min(last * self.seq_len, len(self.data) - self._unscored)

    def batch(self, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Global batch ``k`` as ``(x, y)``, each (rows, T) int64, ``y = -100`` on padding."""
        if not 0 <= k < self.total_batches:
            raise IndexError(f"batch index {k} is outside [0, {self.total_batches})")
        first, last = k * self.batch_size, min((k + 1) * self.batch_size, self.num_windows)
        T, n = self.seq_len, len(self.data)
        x = torch.full((last - first, T), self._pad, dtype=torch.int64)
        y = torch.full((last - first, T), IGNORE_INDEX, dtype=torch.int64)
        for row, i in enumerate(range(first, last)):
            w = self.data.window(i * T, min(T + self._unscored, n - i * T))
            if self.bos_id is not None:
                w = torch.cat([w.new_full((1,), self.bos_id), w])
            x[row, :len(w) - 1] = w[:-1]
            y[row, :len(w) - 1] = w[1:]
        return (x, y, document_bounds(x, self.data.eod_id)) if self.boundaries else (x, y)

    def __iter__(self) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        ks = self._global_batches()
        while self.position < len(ks):
            batch = self.batch(ks[self.position])
            self.position += 1
            yield batch
        self.position = 0

    def state_dict(self) -> dict:
        """The position in the pass, with the shapes it belongs to."""
        return {"sampler": "SequentialWindows", "batches": self.position, "batch_size": self.batch_size,
                "seq_len": self.seq_len, "data_tokens": len(self.data), "bos_id": self.bos_id}

    def load_state_dict(self, state: dict) -> None:
        """Continue the pass from ``state`` (same batch_size, seq_len, data size and bos_id)."""
        _check_state(state, "SequentialWindows", {"batch_size": self.batch_size, "seq_len": self.seq_len,
                                                  "data_tokens": len(self.data), "bos_id": self.bos_id})
        pos = int(state["batches"])
        if not 0 <= pos <= len(self):
            raise ValueError(f"state['batches'] = {pos} is outside [0, {len(self)}] for this rank")
        self.position = pos
