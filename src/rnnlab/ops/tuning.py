"""The one per-device tuning table: every threshold and chunk size the op dispatchers use.

Entries are read per device type: ``get("scan.loop_min_lanes", x.device)`` looks in the table of
``x.device.type`` ("cpu", "cuda", ...) and then in ``"default"``. Chunk sizes never change a
result (every chunked form is exact); they only move speed and memory, and the thresholds pick
between exact forms. The numbers below were measured on the 2-vCPU Zen 4 machines described in
DESIGN.md §8 (torch 2.13 CPU); nothing has been measured on a GPU yet, so "cuda" keeps the
defaults.

Override entries for a while or for good::

    from rnnlab.ops import tuning
    with tuning.override(cpu={"scan.loop_min_lanes": 4096}):   # restored on leaving the block
        ...
    tuning.override(default={"delta.chunk_size": 128})          # without ``with``: stays in force

Unknown keys and ill-typed values are refused with a ValueError naming the key.
"""
from __future__ import annotations

import torch

__all__ = ["get", "table", "override", "KEYS"]

# Every key with its default (used on any device type without an entry of its own). ``None`` for a
# threshold means "never": that form is not chosen on this device.
_DEFAULT: dict[str, int | None] = {
    # Gated delta rule / gated linear attention with no decay or a scalar decay per head: chunks of
    # 64 tokens (DESIGN.md §3 "chunk 64 by default", the size fla's kernels use as well).
    "delta.chunk_size": 64,
    # ... but chunks no longer than the key size K, and at least this long: with small heads the
    # (C, C) work per token outweighs the (K, V) work. Measured on a quiet machine (2-layer models,
    # B=64, T=64, one thread, training step, chunk forced to C): K=8 C=16 69 ms against 127 with
    # C=64; K=16 C=16 151, 32 157, 64 212; K=32 C=32 322 against 353 with 64.
    "delta.chunk_min": 16,
    # Vector decays (GLA, HGRN2, KDA, RWKV-6): chunks of 32. On finite CPU inputs whose cumulative
    # log-decays fit (rnnlab.ops.bounds.decay_factors_fit) the scores are two matmuls; otherwise
    # chunks are cut into sub-chunks of 8, between which the decay factors through the earlier
    # sub-chunk's end. Measured: sub-chunks fwd+bwd 2x faster than chunks of 16 without them
    # (T=4096: 1986 -> 996 ms; commit 69a5566); the factored scores halve GLA's layer again
    # (d_model 512, T=4096, one thread, quiet machine: 535 -> 281 ms); chunks of 64 timed the same as 32.
    "gla.chunk_size": 32,
    "gla.sub_chunk": 8,
    # The chunked delta rule on long sequences: blocks of this many tokens run one after another
    # (the state passed), so the per-chunk tensors of a block stay cache-resident. Off by default
    # (GPUs). Measured on CPU, (1, T, 8, 64/128) fwd+bwd: T=16384 1.49 -> 1.10 s with 4096 (2048:
    # 1.22 s, 1024: 1.59 s); T=4096 unchanged (0.245 s).
    "delta.block_tokens": None,
    # Diagonal-plus-low-rank transitions (RWKV-7): chunks of 32 cut into sub-chunks of 8, the
    # sizes of the vector-decay GLA case whose score computation this form shares. Not measured.
    "dplr.chunk_size": 32,
    "dplr.sub_chunk": 8,
    # mLSTM: chunks of 64 (the masked L x L block per chunk).
    "mlstm.chunk_size": 64,
    # Elementwise linear scan: Hillis-Steele within chunks of 64, a carry pass across chunks.
    "scan.chunk_size": 64,
    # From this many lanes (B * prod(other dims) recurrences per step) a plain loop over time
    # replaces the log-depth scan. Off by default: on GPUs the log-depth scan wins.
    "scan.loop_min_lanes": None,
    # Small-matrix scan (Newton iterations of dense-block RNNs): Hillis-Steele chunks of 64.
    "matrix_scan.chunk_size": 64,
    # From this many matrix entries per step (B * blocks * S * S) a loop over time replaces the
    # log-depth scan. Off by default (GPUs).
    "matrix_scan.loop_min_entries": None,
    # Mamba-1's selective scan: time-chunks of 64 tokens, each a parallel scan over (B, Tc, D, N)
    # tensors, recomputed in the backward pass. Measured: 64 (cache-resident) beats 256; 2-layer
    # d=128 Mamba training step (B=8, T=256) 717 -> 409 ms (commit d7251b7).
    "selective_scan.time_chunk": 64,
    # ... and on the "compile" backend, time-chunks of 32 tokens, each a loop unrolled by the
    # compiler. Measured (one Mamba-1 scan, D=1024, N=16, T=2048, fwd+bwd, 2 threads): with each
    # chunk wrapped in a checkpoint, 155 / 120 / 145 ms for 16 / 32 / 64 (eager form 270-295 ms),
    # compiling in 15 / 20 / 50 s; 32 as run (no checkpoint: the compiled backward recomputes what
    # it needs) 75 ms, peak 41 MB against the eager form's 169 MB.
    "selective_scan.compile_chunk": 32,
    # Longhorn: time-chunks of 64, as for the selective scan. Measured: 2-layer d=128 training
    # step (B=8, T=256) 708 -> 285 ms against chunks of 256 (commit d7251b7).
    "longhorn.time_chunk": 64,
    # ... and on the "compile" backend, unrolled time-chunks of 32, as for the selective scan.
    "longhorn.compile_chunk": 32,
    # Gated slot attention: chunks of 8 (measured fastest: the (C, C, M) decay tensor halves
    # against 16; 2-layer d=128 training step 714 -> 358 ms, prefill 8.6k -> 19.7k tok/s; commit
    # ef27129), computed in parallel within blocks of 256 tokens that are recomputed in backward.
    "gsa.chunk_size": 8,
    # ... and chunks of this many tokens where the decays factor as matmuls (finite CPU inputs whose
    # per-token decays keep every chunk within rnnlab.ops.bounds.decay_factors_fit), with no
    # (C, C, M) tensor. Measured on a quiet machine: one gsa layer (d_model 512) fwd+bwd at T=2048,
    # one thread, 614 ms with chunks of 8 before the factored form; with it 485 (8), 344 (16),
    # 319 (32), 303 (64).
    "gsa.factored_chunk_size": 64,
    "gsa.block_size": 256,
    # LTI convolution form: time-chunks of 1024 with the state passed, the chunk kernels computed
    # once, so the Krylov memory (D * N * T) is bounded. Measured: lssl T=16384 fwd+bwd 6.7 s,
    # 1.16x causal SDPA (commit f2aa808).
    "lti.conv_chunk": 1024,
    # Diagonal LTI (S4D) for batches of at most this many sequences: chunked scans instead of the
    # FFT convolution (the scan's work grows with the batch, the convolution's kernel does not).
    # Measured: B=1 T=4096 s4d fwd+bwd 8.2 s -> 1.9 s; the B=8 training step keeps the
    # convolution (commit 5312e22).
    "lti.scan_max_batch": 1,
    # ... and those scans run on time-chunks of 64, like the selective scan.
    "lti.scan_time_chunk": 64,
    # ... and on the "compile" backend, unrolled time-chunks of 32, as for the selective scan.
    "lti.compile_chunk": 32,
}

# Only what differs from the default. Keys must exist in _DEFAULT.
_DEVICE: dict[str, dict[str, int | None]] = {
    "cpu": {
        # A loop over time reads each element once: 3-10x faster than the log-depth scan from
        # ~1k lanes ((1, 4096, 8192): 0.15 s vs 1.1-1.7 s; selective_scan fwd+bwd 1.8-9.7x over
        # its loop, longhorn 5-12x; commit ff973c4).
        "scan.loop_min_lanes": 1024,
        # A loop over time with batched small matmuls: 2-3x faster than the log-depth scan from
        # 256 matrix entries per step (LSTM Newton fwd at T=4096 1.43 -> 1.06 s; commit 3c87852).
        "matrix_scan.loop_min_entries": 256,
        "delta.block_tokens": 4096,
    },
    "cuda": {},  # nothing measured on a GPU yet: the defaults
}

KEYS = tuple(_DEFAULT)
_NONE_ALLOWED = {"scan.loop_min_lanes", "matrix_scan.loop_min_entries", "delta.block_tokens"}  # None: never take that form
_LEAST = {"lti.scan_max_batch": 0}  # 0: never scan; every other entry is at least 1

_merged: dict[str, dict[str, int | None]] = {}  # device type -> merged table (cache)


def _device_type(device) -> str:
    if device is None:
        return "default"
    if isinstance(device, str):
        return torch.device(device).type if device != "default" else "default"
    return device.type


def table(device=None) -> dict[str, int | None]:
    """The merged table for a device (a torch.device, a device string, or None / "default"):
    the device type's own entries over the defaults. Returns a dict to read, not to change."""
    dt = _device_type(device)
    t = _merged.get(dt)
    if t is None:
        t = _merged[dt] = {**_DEFAULT, **_DEVICE.get(dt, {})} if dt != "default" else dict(_DEFAULT)
    return t


def get(key: str, device=None) -> int | None:
    """One entry for a device (see :func:`table`); a ValueError for an unknown key."""
    t = table(device)
    if key not in t:
        raise ValueError(f"unknown tuning key {key!r}; known keys: {', '.join(KEYS)}")
    return t[key]


def _validate(device_type: str, entries: dict) -> None:
    if not isinstance(entries, dict):
        raise ValueError(f"override({device_type}=...) takes a dict of entries, got {type(entries).__name__}")
    for key, value in entries.items():
        if key not in _DEFAULT:
            raise ValueError(f"unknown tuning key {key!r} (for {device_type!r}); known keys: {', '.join(KEYS)}")
        least = _LEAST.get(key, 1)
        ok = (value is None and key in _NONE_ALLOWED) or (type(value) is int and value >= least)
        if not ok:
            want = f"an int >= {least}" + (" or None (never)" if key in _NONE_ALLOWED else "")
            raise ValueError(f"tuning key {key!r} (for {device_type!r}) takes {want}, got {value!r}")


class override:
    """Set tuning entries per device type: ``override(cpu={...}, cuda={...}, default={...})``.

    Takes effect at once. Used as a context manager, the previous entries come back on leaving the
    block; called plainly, the change stays. Raises ValueError for an unknown key or a bad value.
    """

    def __init__(self, **by_device: dict):
        for dt, entries in by_device.items():
            _validate(dt, entries)
        self._saved = {dt: dict(_DEFAULT) if dt == "default" else dict(_DEVICE.get(dt, {})) for dt in by_device}
        for dt, entries in by_device.items():
            (_DEFAULT if dt == "default" else _DEVICE.setdefault(dt, {})).update(entries)
        _merged.clear()

    def __enter__(self) -> "override":
        return self

    def __exit__(self, *exc) -> None:
        for dt, entries in self._saved.items():
            target = _DEFAULT if dt == "default" else _DEVICE[dt]
            target.clear()
            target.update(entries)
        _merged.clear()
