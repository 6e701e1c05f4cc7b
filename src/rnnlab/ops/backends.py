"""Backends other than plain eager torch: ``torch.compile`` of loop-free cores, and fla's CUDA kernels.

* "compile": :func:`compiled` wraps a function in ``torch.compile``, built once per function: an
  op's loop-free intra-chunk work, a layer's elementwise steps (:func:`rnnlab.ops.registry.fused`),
  or a loop over the few tokens of one time-chunk (:func:`rnnlab.ops.scan.over_compiled_chunks`),
  which the compiler unrolls. A loop over a whole sequence's chunks would unroll into a very slow
  compile. If compiling fails (no C++ compiler, an unsupported op), the function runs eagerly from
  then on, with one warning.
* "fla": adapters from rnnlab's gated delta rule (layout (B, T, H, K), decays passed as log_g,
  state (B, H, K, V)) onto flash-linear-attention's ``chunk_gated_delta_rule``, ``chunk_gla`` and
  ``chunk_simple_gla`` (the same layout and log-space gates). CUDA only; usable when ``fla``
  imports. **Untested**: fla's Triton kernels cannot run on the CPU machines rnnlab is developed
  on; check against ``gated_delta_rule_recurrent`` before relying on them.

Each backend has a check ``(inputs) -> None | reason``: None when it can run these inputs, else a
sentence saying why not; :func:`rnnlab.ops.registry.select` reports that reason and falls back
to "torch".
"""
from __future__ import annotations

import functools
import warnings
from typing import Callable

import torch

__all__ = ["compiled", "compile_or_eager", "compile_check", "fla_check", "fla_gated_delta_rule", "fla_gla", "fla_simple_gla"]


class _Compiled:
    """``torch.compile(fn)`` that falls back to ``fn`` for good if compiling fails."""

    def __init__(self, fn: Callable):
        self.fn = fn
        self.compiled = torch.compile(fn, dynamic=None)
        self.failed = False
        functools.update_wrapper(self, fn)

    def __call__(self, *args):
        if not self.failed:
            try:
                return self.compiled(*args)
            except Exception as e:  # a compiler failure must not stop the op: run it eagerly
                self.failed = True
                warnings.warn(f"torch.compile of {getattr(self.fn, '__qualname__', self.fn)} failed ({type(e).__name__}: "
                              f"{str(e).splitlines()[0] if str(e) else ''}); running it eagerly", RuntimeWarning)
        return self.fn(*args)


_compiled: dict[Callable, _Compiled] = {}


def compiled(fn: Callable) -> Callable:
    """The compiled version of a loop-free function, built on first use and shared afterwards."""
    c = _compiled.get(fn)
    if c is None:
        c = _compiled[fn] = compile_or_eager(fn)
    return c


def compile_or_eager(fn: Callable) -> Callable:
    """A new ``torch.compile(fn)`` (shapes made dynamic after the first change) that runs ``fn``
    eagerly for good, with one warning, if compiling fails. Not shared: the caller keeps it."""
    return _Compiled(fn)


def compile_check(inputs: dict) -> str | None:
    """The "compile" backend runs wherever ``torch.compile`` exists."""
    return None if hasattr(torch, "compile") else f"torch {torch.__version__} has no torch.compile"


@functools.lru_cache(maxsize=None)
def _fla_import_error() -> str | None:
    try:
        import fla.ops  # noqa: F401
    except Exception as e:  # ImportError, or a Triton / driver error raised while importing
        return f"flash-linear-attention is not importable ({type(e).__name__}: {e})"
    return None


def fla_check(inputs: dict) -> str | None:
    """fla needs CUDA tensors, an importable ``fla``, and (for the gated delta rule, whose kernel
    refuses float32) bfloat16 or float16 inputs with a scalar decay or none."""
    q = inputs["q"]
    if q.device.type != "cuda":
        return f"fla's kernels run on CUDA only (inputs are on {q.device.type})"
    error = _fla_import_error()
    if error:
        return error
    if inputs.get("beta") is not None:
        log_g = inputs.get("log_g")
        if log_g is not None and log_g.dim() == 4:
            return "fla's chunk_gated_delta_rule takes a scalar decay per head, not a vector decay"
        if q.dtype not in (torch.bfloat16, torch.float16):
            return f"fla's chunk_gated_delta_rule takes bfloat16 or float16 inputs, not {q.dtype}"
    return None


def _state(initial_state):
    return None if initial_state is None else initial_state.float()


def fla_gated_delta_rule(q, k, v, log_g=None, beta=None, scale=None, initial_state=None, chunk_size=None,
                         cu_seqlens=None):
    """UNTESTED (CUDA + fla only). The gated delta rule by fla's ``chunk_gated_delta_rule``:
    q, k (B, T, H, K), v (B, T, H, V), log_g None | (B, T, H) (None: no decay, passed as zeros),
    beta (B, T, H), initial_state (B, H, K, V). fla picks its own chunk size (``chunk_size`` is
    ignored). ``cu_seqlens`` (packed rows, B = 1, initial_state (N, H, K, V)) is fla's own argument of
    the same name and meaning. Returns (o (B, T, H, V) in q's dtype, final_state (B|N, H, K, V) float32)."""
    from fla.ops.gated_delta_rule import chunk_gated_delta_rule
    g = q.new_zeros(q.shape[:3], dtype=torch.float32) if log_g is None else log_g.float()
    o, S = chunk_gated_delta_rule(q=q, k=k, v=v, g=g, beta=beta.to(q.dtype), scale=scale,
                                  initial_state=_state(initial_state), output_final_state=True,
                                  cu_seqlens=cu_seqlens)
    return o.to(q.dtype), S.float()


def fla_gla(q, k, v, log_g=None, beta=None, scale=None, initial_state=None, chunk_size=None,
            cu_seqlens=None):
    """UNTESTED (CUDA + fla only). Gated linear attention with a vector decay by fla's
    ``chunk_gla``: log_g (B, T, H, K) is fla's ``g`` (log-space forget gates); beta must be None.
    Returns (o (B, T, H, V) in q's dtype, final_state (B, H, K, V) float32)."""
    from fla.ops.gla import chunk_gla
    o, S = chunk_gla(q=q, k=k, v=v, g=log_g.float(), scale=scale, initial_state=_state(initial_state),
                     output_final_state=True, cu_seqlens=cu_seqlens)
    return o.to(q.dtype), S.float()


def fla_simple_gla(q, k, v, log_g=None, beta=None, scale=None, initial_state=None, chunk_size=None,
                   cu_seqlens=None):
    """UNTESTED (CUDA + fla only). Gated linear attention with a scalar decay per head (Mamba-2's
    SSD, RetNet) or none by fla's ``chunk_simple_gla``: log_g None | (B, T, H) is fla's ``g``;
    beta must be None. Returns (o (B, T, H, V) in q's dtype, final_state (B, H, K, V) float32)."""
    from fla.ops.simple_gla import chunk_simple_gla
    o, S = chunk_simple_gla(q=q, k=k, v=v, g=None if log_g is None else log_g.float(), scale=scale,
                            initial_state=_state(initial_state), output_final_state=True, cu_seqlens=cu_seqlens)
    return o.to(q.dtype), S.float()
