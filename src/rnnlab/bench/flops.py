"""FLOP accounting for ``rnnlab bench speed``: what a layer must compute (its floor) and what the
chunked kernels of the op registry actually compute.

FLOPs count 2 per multiply-add of every contraction (matmul, einsum) and 1 per elementwise
multiply or add that the algorithm does per element; exps, masks, softmax and reductions that do
not scale with a matrix dimension are not counted.

**A layer's floor** (:func:`layer_flops`, forward; defined in :mod:`rnnlab.flops`, shared with the trainer's MFU): ``2 · params · B·T`` (every parameter is used
once per token in one multiply-add: projections, short convolutions, recurrent matrices) plus the
mixing FLOPs:

* softmax attention: ``4 · B · H · K · P`` with P the (query, key) pairs under the causal mask,
  ``T(T+1)/2`` (a window w and s sinks: ``sum_t min(t+1, w+s)``) — Q K^T and P V;
* a recurrent mixer: ``c · B · T · n`` with n the floats of its state (``layer.state_size()``,
  complex counted as two) and c FLOPs per state element per token: 4 (decay-and-write, read) by
  default, 6 for the delta rule (one more read, ``k^T S``), ``2 N + 2`` for LSSL's dense N x N
  transition per channel.

It is an estimate of the work any implementation must do, not a count of what rnnlab runs. The
backward pass is taken as twice the forward (``3x`` for forward + backward).

**Kernel FLOPs** (:func:`kernel_flops`): the arithmetic of the chunked algorithm as written in
:mod:`rnnlab.ops`, per sequence and head, for chunks of C tokens (T padded to N·C where the kernel
pads), key size K and value size V; B·H sequences (the scan: B·H·K lanes):

* ``delta`` (gated delta rule, scalar decay): per chunk ``4C²K`` (Q K^T and K K^T) ``+ C³ +
  2C²(K+V)`` (the UT transform on finite inputs: the unit-triangular matrix inverted by a solve
  against I, then its products with V and K) ``+ 2C²V`` (A U) ``+ 6CKV`` (W S, Q S, K^T U);
* ``delta_vector`` (gated delta rule, decay vector over K, sub-chunks of c, m = C/c): the scores
  become ``4C²K + 6CcK + 2mCK`` (masked decay tensors within sub-chunks, decay-factored matmuls
  between them) or, where the decays factor over the whole chunk (finite CPU inputs within
  range), ``4C²K + 3CK`` (q and k scaled by e^c, k by e^-c, two matmuls); the rest as for ``delta``;
* ``ssd`` (scalar decay, no delta term): ``2C²K + 2C²V + 4CKV``;
* ``gla`` (vector decay, no delta term): ``4C²K + 6CcK + 2mCK + 2C²V + 4CKV`` (factored:
  ``2C²K + 2CK + 2C²V + 4CKV``: Q K^T alone);
* ``mlstm`` (chunks of L = C, the last one shorter): ``2L²K + 2L²V + 4LKV + 2LK + 2L²``;
* ``scan`` (Hillis-Steele within chunks, per lane): ``3 · sum_{d=1,2,4..<C} (C-d)`` per chunk,
  ``2`` per chunk for the carry and ``2`` per element to apply it; the loop form: 2 per element;
* ``sdpa`` (causal softmax attention, the reference): ``4K · T(T+1)/2``.
"""
from __future__ import annotations

import math

from ..flops import attention_pairs, layer_flops

__all__ = ["layer_flops", "kernel_flops", "KERNEL_CASES", "FORMULAS", "attention_pairs"]

def _chunks(T: int, C: int) -> int:
    return -(-T // C)


def _scores_vector(C: int, K: int, sub: int | None, delta: bool) -> float:
    if sub is None:  # factored: (q e^c) (k e^-c)^T (and (k e^c) (k e^-c)^T with the delta term), and the scalings
        return (4 * C * C * K + 3 * C * K) if delta else (2 * C * C * K + 2 * C * K)
    c = sub if C % sub == 0 else C
    return 4 * C * C * K + 6 * C * c * K + 2 * (C // c) * C * K


def kernel_flops(case: str, B: int, T: int, H: int, K: int, V: int, chunk: int, sub_chunk: int | None = 8) -> float:
    """Forward FLOPs of the chunked kernel ``case`` (one of :data:`KERNEL_CASES`) on B sequences of
    T tokens with H heads of key size K and value size V, chunks of ``chunk`` (the vector-decay
    cases: sub-chunks of ``sub_chunk``, None for the factored scores). See the module docstring."""
    C = chunk
    N = _chunks(T, C)
    if case == "delta":
        per = 4 * C * C * K + C ** 3 + 2 * C * C * (K + V) + 2 * C * C * V + 6 * C * K * V
    elif case == "delta_vector":
        per = _scores_vector(C, K, sub_chunk, True) + C ** 3 + 2 * C * C * (K + V) + 2 * C * C * V + 6 * C * K * V
    elif case == "ssd":
        per = 2 * C * C * K + 2 * C * C * V + 4 * C * K * V
    elif case == "gla":
        per = _scores_vector(C, K, sub_chunk, False) + 2 * C * C * V + 4 * C * K * V
    elif case == "mlstm":  # no padding: full chunks and a shorter last one
        def block(L):
            return 2 * L * L * K + 2 * L * L * V + 4 * L * K * V + 2 * L * K + 2 * L * L
        full, rest = divmod(T, C)
        return float(B * H * (full * block(C) + (block(rest) if rest else 0)))
    elif case == "scan":  # per lane; B·H·K lanes
        C = min(C, T)
        N = _chunks(T, C)
        steps = sum(C - d for d in (2 ** i for i in range(int(math.log2(C)) + 1)) if d < C)
        return float(B * H * K * (N * 3 * steps + 2 * (N - 1) + 2 * N * C))
    elif case == "scan_loop":
        return float(B * H * K * 2 * T)
    elif case == "sdpa":
        return float(B * H * 4 * K * attention_pairs(T))
    else:
        raise ValueError(f"unknown kernel case {case!r}; choose from {KERNEL_CASES}")
    return float(B * H * N * per)


KERNEL_CASES = ("delta", "delta_vector", "ssd", "gla", "mlstm", "scan", "scan_loop", "sdpa")

# the formulas of :func:`kernel_flops`, printed beside the efficiency table (per sequence and head;
# N chunks of C, sub-chunks of c, m = C/c; the scan per lane)
FORMULAS = {
    "delta": "N·(4C²K + C³ + 2C²(K+V) + 2C²V + 6CKV)",
    "delta_vector": "N·(4C²K + 6CcK + 2mCK + C³ + 2C²(K+V) + 2C²V + 6CKV); scores factored: 4C²K + 3CK",
    "ssd": "N·(2C²K + 2C²V + 4CKV)",
    "gla": "N·(4C²K + 6CcK + 2mCK + 2C²V + 4CKV); scores factored: 2C²K + 2CK",
    "mlstm": "sum over chunks of L: 2L²K + 2L²V + 4LKV + 2LK + 2L²",
    "scan": "per lane: N·3·sum_{d=1,2,4..<C}(C-d) + 2(N-1) + 2NC",
    "scan_loop": "per lane: 2T",
    "sdpa": "4K·T(T+1)/2",
}
assert set(FORMULAS) == set(KERNEL_CASES)
