"""One registry of op families: their forms, backends and test inputs, and the one place a form is chosen.

A family is one recurrence in one input regime (the gated delta rule is three: with the delta
term, with a vector decay, with a scalar decay or none). Its entry (:class:`Family`) holds the
reference loop (the definition), the fast forms (chunked / parallel / conv / scan / loop ...),
the one-token step form where there is one, the public dispatcher, a maker of random inputs of
a given size and dtype (initial state included), the names of the differentiable inputs, the
rule choosing a form from the inputs and the tuning table (:mod:`rnnlab.ops.tuning`), and the
backends beyond plain eager torch (:mod:`rnnlab.ops.backends`). Every form of every family is
called the same way: ``form(**inputs) -> (output, final_state)``.

Public dispatchers (``gated_delta_rule``, ``linear_scan``, ``lti``, ...) all call :func:`select`
and run :func:`implementation`; the op tests (tests/ops/test_registry.py) and the speed benchmark
(``rnnlab bench ops``) read the same table, so a family or backend added here is tested and
benchmarked at once.

Backends: "torch" (always), "compile" (``torch.compile`` of a fast form's loop-free core, or of a
short loop over a time-chunk's tokens, unrolled; off by default) and "fla" (flash-linear-attention's CUDA kernels, untested here). Choose one with
:func:`use_backend` (a plain call or a context manager); a backend that cannot run a call (not on
this device, not installed, not for this family or dtype) is reported once with the reason and
"torch" runs instead — never an error.

Sequence boundaries: a family whose ``packed`` lists forms takes ``cu_seqlens`` (N sequences packed
in one row, B = 1; :mod:`rnnlab.ops.bounds`) in its reference, those forms and its dispatcher;
:meth:`Family.packed_inputs` and :func:`unpack_inputs` let the tests compare a packed row with
each sequence run alone, for every such family.

Adding a family: write its forms in an op module, add a ``Family(...)`` to :func:`_build` with an
inputs maker and a ``choose`` rule reading :mod:`rnnlab.ops.tuning` (add any new threshold there,
with the measurement that set it), and make its dispatcher call :func:`select`. Adding a backend:
give the families it covers a :class:`Backend` with the forms it replaces (same signatures) and a
check returning why it cannot run given inputs.
"""
from __future__ import annotations

import functools
import importlib
import math
import warnings
from dataclasses import dataclass, field
from typing import Any, Callable

import torch
import torch.nn.functional as F

from . import tuning

__all__ = ["Family", "Backend", "BACKENDS", "families", "get_family", "select", "implementation",
           "use_backend", "fused", "outside_autocast", "backend_status", "cast", "tensors", "with_grad", "unpack_inputs"]

BACKENDS = ("torch", "compile", "fla")


@dataclass(frozen=True)
class Backend:
    """Another implementation of some of a family's forms.

    ``forms`` maps a form name to a callable with that form's signature; ``check(inputs)`` returns
    None when the backend can run these inputs, else the reason it cannot.
    """

    name: str
    forms: dict[str, Callable]
    check: Callable[[dict], str | None]


@dataclass(frozen=True)
class Family:
    """One op family. Every form is called as ``form(**inputs) -> (output, final_state)``.

    ``make(B, T, H, K, V, generator)`` returns float64 (complex128) inputs; use :meth:`inputs`.
    ``choose(inputs, table)`` names the form to run for these inputs under the tuning table
    ``table`` of their device: "reference", "step" or one of ``fast``.
    """

    name: str
    doc: str  # the recurrence, in one line
    reference: Callable
    fast: dict[str, Callable]
    make: Callable[..., dict]
    differentiable: tuple[str, ...]
    choose: Callable[[dict, dict], str]
    step: Callable | None = None  # the one-token form, on inputs with T = 1
    dispatch: Callable | None = None  # the public dispatcher (None: the family has none)
    backends: dict[str, Backend] = field(default_factory=dict)  # beyond "torch"
    # The fast forms that take ``cu_seqlens`` (packed rows; :mod:`rnnlab.ops.bounds`). Not empty:
    # the reference and the dispatcher take it too.
    packed: tuple[str, ...] = ()
    # Forms in which a non-finite input can reach earlier tokens of its own sequence (FFT
    # convolutions mix a whole sequence); with cu_seqlens they still keep it out of other sequences.
    not_causal_in_nonfinite: tuple[str, ...] = ()

    def form(self, name: str) -> Callable:
        """The torch implementation of a form: "reference", "step" or a fast form's name."""
        forms = {"reference": self.reference, **self.fast, **({"step": self.step} if self.step else {})}
        if name not in forms:
            raise ValueError(f"family {self.name!r} has no form {name!r}; it has {sorted(forms)}")
        return forms[name]

    def inputs(self, B: int = 2, T: int = 37, H: int = 2, K: int = 4, V: int | None = None,
               dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
        """Random inputs of batch B, length T, H heads of key size K and value size V (default K),
        initial state included, in ``dtype`` (complex tensors in the matching complex dtype).
        The same seed gives the same values in every dtype (drawn in float64, then rounded)."""
        g = torch.Generator().manual_seed(seed)
        return cast(self.make(B, T, H, K, K if V is None else V, g), dtype)

    def packed_inputs(self, lengths: list[int], H: int = 2, K: int = 4, V: int | None = None,
                      dtype: torch.dtype = torch.float32, seed: int = 0) -> dict[str, Any]:
        """Random inputs of one packed row (B = 1, T = sum(lengths)) holding N = len(lengths)
        sequences, ``cu_seqlens`` (int64 (N + 1,)) included and the initial state with N rows.
        The inputs along time are those whose dim 1 follows T; the others (parameters) are shared."""
        T, N = sum(lengths), len(lengths)
        x = self.inputs(B=N, T=T, H=H, K=K, V=V, dtype=dtype, seed=seed)
        longer = self.inputs(B=N, T=T + 1, H=H, K=K, V=V, dtype=dtype, seed=seed)
        cu = [0]
        for n in lengths:
            cu.append(cu[-1] + n)
        out = {}
        for name, a in x.items():
            b = longer[name]
            if isinstance(a, torch.Tensor) and a.dim() >= 2 and b.shape[1] == T + 1 and a.shape[0] == N:
                a = torch.cat([a[i:i + 1, cu[i]:cu[i + 1]] for i in range(N)], dim=1)  # (1, T, ...)
            out[name] = a
        out["cu_seqlens"] = torch.tensor(cu, dtype=torch.int64)
        return out


# -- nested inputs and outputs (tuples / NamedTuples of tensors) --------------------------------------
def _map(fn, x):
    if isinstance(x, torch.Tensor):
        return fn(x)
    if isinstance(x, tuple):
        items = [_map(fn, a) for a in x]
        return type(x)(*items) if hasattr(x, "_fields") else tuple(items)
    return x


def cast(inputs: dict, dtype: torch.dtype) -> dict:
    """``inputs`` with every real floating tensor (nested ones included) in ``dtype`` and every
    complex one in the matching complex dtype (complex128 for float64, else complex64); integer
    tensors unchanged."""
    cplx = torch.complex128 if dtype == torch.float64 else torch.complex64
    return {n: _map(lambda t: t if _is_int(t) else t.to(cplx if t.is_complex() else dtype), a)
            for n, a in inputs.items()}


def _is_int(t: torch.Tensor) -> bool:
    """An integer tensor (a position, a count): never cast, never differentiated."""
    return not (t.is_floating_point() or t.is_complex())


def tensors(x) -> list[torch.Tensor]:
    """The tensors in a (nested) output, state or inputs dict, in order (ints and None dropped)."""
    if isinstance(x, torch.Tensor):
        return [x]
    if isinstance(x, dict):
        x = tuple(x.values())
    return [t for a in x for t in tensors(a)] if isinstance(x, tuple) else []


def unpack_inputs(inputs: dict) -> list[dict]:
    """The inputs of each sequence of a packed row (``inputs`` with ``cu_seqlens``) run alone:
    B = 1, the sequence's slice of every (1, T, ...) input, row n of the initial state, shared
    parameters, no ``cu_seqlens``. Slices and views, so gradients flow back to ``inputs``."""
    cu = inputs["cu_seqlens"].tolist()
    T = cu[-1]
    alone = []
    for n, (a, b) in enumerate(zip(cu, cu[1:])):
        x = {}
        for name, t in inputs.items():
            if name == "cu_seqlens":
                continue
            if name == "initial_state":
                t = None if t is None else _map(lambda s: s[n:n + 1], t)
            elif isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (1, T):
                t = t[:, a:b]
            x[name] = t
        alone.append(x)
    return alone


def with_grad(family: "Family | str", inputs: dict) -> tuple[dict, list[torch.Tensor]]:
    """A copy of ``inputs`` whose differentiable entries (nested floating tensors included; integer
    tensors such as positions stay as they are) are fresh leaves requiring grad, and the list of
    those leaves."""
    fam = get_family(family) if isinstance(family, str) else family
    leaves = []

    def leaf(t):
        if _is_int(t):
            return t
        t = t.detach().clone().requires_grad_()
        leaves.append(t)
        return t
    out = {n: (_map(leaf, a) if n in fam.differentiable else a) for n, a in inputs.items()}
    return out, leaves


# -- the choice of form and backend ------------------------------------------------------------------
_preferred = "torch"
_reported: set[tuple[str, str, str]] = set()


class use_backend:
    """Prefer a backend ("torch", "compile" or "fla") in every dispatcher. Takes effect at once;
    as a context manager the previous preference comes back on leaving the block. Where the
    backend cannot run a call it is reported (one warning per family and reason) and "torch" runs."""

    def __init__(self, name: str):
        global _preferred
        if name not in BACKENDS:
            raise ValueError(f"unknown backend {name!r}; choose from {BACKENDS}")
        self._saved, _preferred = _preferred, name

    def __enter__(self) -> "use_backend":
        return self

    def __exit__(self, *exc) -> None:
        global _preferred
        _preferred = self._saved


def fused(fn: Callable) -> Callable:
    """``fn``, a layer's loop-free elementwise step (a norm and its gate, a normalisation), compiled
    when the preferred backend is "compile" (outside a region ``torch.compile`` is tracing already),
    else ``fn`` itself. Eagerly each op is a pass over memory, forward and backward; compiled they
    fuse (Gated DeltaNet's gated output norm, fwd+bwd at T=16384, 8 heads of 128: 122 -> 52 ms;
    the L2 normalisation of its queries: 34 -> 13 ms)."""
    if _preferred != "compile" or torch.compiler.is_compiling():
        return fn
    from .backends import compiled
    return compiled(fn)


def _device(inputs: dict) -> torch.device:
    found = tensors(inputs)
    if not found:
        raise ValueError("select() needs at least one tensor among the inputs")
    return found[0].device


def _reason(fam: Family, backend: str, form: str, inputs: dict) -> str | None:
    """None if ``backend`` can run ``form`` of ``fam`` on these inputs, else why not."""
    if backend == "torch":
        return None
    b = fam.backends.get(backend)
    if b is None:
        return f"family {fam.name!r} has no {backend!r} backend"
    if form not in b.forms:
        return f"the {backend!r} backend of {fam.name!r} has no {form!r} form (it has {sorted(b.forms)})"
    return b.check(inputs)


def select(family: str, **inputs) -> tuple[str, str]:
    """The form and backend to run ``family`` on these inputs: ``(form, backend)``.

    The form comes from the family's rule and the tuning table of the inputs' device; the backend
    is the preferred one (:func:`use_backend`) when it can run that form on these inputs, else
    "torch". A preferred backend that cannot run is reported once per family and reason, except
    when it only lacks a decoding step (backends replace the long-sequence forms)."""
    fam = get_family(family)
    form = fam.choose(inputs, tuning.table(_device(inputs)))
    if _preferred == "torch":
        return form, "torch"
    reason = _reason(fam, _preferred, form, inputs)
    if reason is None:
        return form, _preferred
    if form not in ("step", "reference") and (family, _preferred, reason) not in _reported:
        _reported.add((family, _preferred, reason))
        warnings.warn(f"rnnlab.ops: backend {_preferred!r} is unavailable for {family!r} ({reason}); "
                      "running 'torch'", RuntimeWarning, stacklevel=3)
    return form, "torch"


def implementation(family: str, form: str, backend: str = "torch") -> Callable:
    """The callable running ``form`` of ``family`` on ``backend`` (as returned by :func:`select`),
    run with autocast off (:func:`outside_autocast`)."""
    fam = get_family(family)
    if backend == "torch":
        return outside_autocast(fam.form(form))
    if backend not in fam.backends or form not in fam.backends[backend].forms:
        raise ValueError(f"family {family!r} has no {backend!r} implementation of form {form!r}")
    return outside_autocast(fam.backends[backend].forms[form])


@functools.lru_cache(maxsize=None)
def outside_autocast(fn: Callable) -> Callable:
    """``fn`` run with autocast off on its inputs' device. An op's precision is its own: it
    computes in its accumulation dtype (float32 for lower-precision inputs) and returns the input
    dtype. Autocast would instead run each of its matmuls in bfloat16 and cast operands to and fro
    around every small per-chunk product. Measured on a quiet machine (GLA layer, d_model 512,
    T = 2048, fwd+bwd under bfloat16 autocast, one thread): 99-103 ms with the op under autocast,
    87-88 ms with it outside."""

    @functools.wraps(fn)
    def run(*args, **kwargs):
        device = next((a.device.type for a in args if isinstance(a, torch.Tensor)), "cpu")
        if not torch.is_autocast_enabled(device):
            return fn(*args, **kwargs)
        with torch.autocast(device, enabled=False):
            return fn(*args, **kwargs)

    return run


def backend_status(family: str, form: str, **inputs) -> dict[str, str | None]:
    """Every backend name -> None if it can run ``form`` of ``family`` on these inputs, else why not."""
    fam = get_family(family)
    return {b: _reason(fam, b, form, inputs) for b in BACKENDS}


def families() -> list[str]:
    """The registered family names."""
    return list(_table())


def get_family(name: str) -> Family:
    """The family entry of ``name``; a ValueError naming the families for an unknown one."""
    table = _table()
    if name not in table:
        raise ValueError(f"unknown op family {name!r}; choose from {sorted(table)}")
    return table[name]


# -- random inputs -------------------------------------------------------------------------------------
def _gen(g):
    r = lambda *s: torch.randn(*s, generator=g, dtype=torch.float64)  # noqa: E731
    u = lambda *s: torch.rand(*s, generator=g, dtype=torch.float64)  # noqa: E731
    return r, u


def _delta_inputs(B, T, H, K, V, g):  # Gated DeltaNet: scalar decay per head, beta in (0, 2)
    r, u = _gen(g)
    return dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
                log_g=F.logsigmoid(r(B, T, H) + 4), beta=2 * u(B, T, H), initial_state=r(B, H, K, V))


def _gla_inputs(B, T, H, K, V, g):  # GLA: vector decay over K, no delta term
    r, _ = _gen(g)
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), log_g=F.logsigmoid(r(B, T, H, K) + 4) / 16,
                initial_state=r(B, H, K, V))


def _ssd_inputs(B, T, H, K, V, g):  # Mamba-2's SSD as gated linear attention: scalar decay per head
    r, _ = _gen(g)
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), log_g=F.logsigmoid(r(B, T, H) + 4),
                initial_state=r(B, H, K, V))


def _rwkv6_inputs(B, T, H, K, V, g):  # RWKV-6: vector decay exp(-exp(w)) over K, bonus u
    r, _ = _gen(g)
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), log_g=-torch.exp(r(B, T, H, K) - 1), u=r(H, K),
                initial_state=r(B, H, K, V))


def _dplr_inputs(B, T, H, K, V, g):  # RWKV-7: a = -kappa, b = alpha * kappa for unit kappa, alpha in (0, 1)
    r, u = _gen(g)
    kappa = F.normalize(r(B, T, H, K), dim=-1)
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), log_g=-torch.exp(r(B, T, H, K) - 1),
                a=-kappa, b=kappa * u(B, T, H, K), initial_state=r(B, H, K, V))


def _mlstm_inputs(B, T, H, K, V, g):  # xLSTM's mLSTM: exponential input gate, sigmoid forget gate
    r, _ = _gen(g)
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), log_f=F.logsigmoid(r(B, T, H) + 3),
                log_i=r(B, T, H), initial_state=(r(B, H, K, V), r(B, H, K), r(B, H)))


def _scan_inputs(B, T, H, K, V, g):  # an LRU / minGRU-sized elementwise scan over D = H·K channels
    r, u = _gen(g)
    return dict(a=2 * u(B, T, H * K) - 1, b=r(B, T, H * K), initial_state=r(B, H * K))


def _selective_scan_inputs(B, T, H, K, V, g):  # Mamba-1 with D = H·K channels and N = 16
    r, _ = _gen(g)
    D = H * K
    return dict(u=r(B, T, D), dt=F.softplus(r(B, T, D) - 3), A=-torch.exp(r(D, 16)), B=r(B, T, 16), C=r(B, T, 16),
                D=r(D), z=r(B, T, D), initial_state=r(B, D, 16))


def _longhorn_inputs(B, T, H, K, V, g):  # Longhorn with D = H·K channels and N = 16
    r, u = _gen(g)
    D = H * K
    return dict(q=r(B, T, 16), k=r(B, T, 16) / 4, v=r(B, T, D), beta=u(B, T, D), initial_state=r(B, D, 16))


def _gsa_inputs(B, T, H, K, V, g):  # gated slot attention with M = K slots per head (64 at K = 64)
    r, _ = _gen(g)
    log_g = F.logsigmoid(r(B, T, H, K)) / 8
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, V), s=-torch.expm1(log_g), log_g=log_g,
                initial_state=(r(B, H, K, K), r(B, H, K, V)))


def _memory_inputs(B, T, H, K, V, g):  # Titans' 2-layer MLP memory (F = 2K), mini-batches of 16
    from .memory import MemoryState
    r, u = _gen(g)
    w = lambda: (r(B, H, 2 * K, K) * K ** -0.5, r(B, H, V, 2 * K) * (2 * K) ** -0.5)  # noqa: E731
    momentum = tuple(0.1 * m for m in w())
    pos = torch.randint(0, 16, (B,), generator=g)  # (B,) int64: each row at its own place in its mini-batch
    return dict(q=F.normalize(r(B, T, H, K), dim=-1), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, V),
                log_g=F.logsigmoid(r(B, T, H) + 5), log_eta=F.logsigmoid(r(B, T, H) + 2), theta=0.05 * u(B, T, H),
                initial_state=MemoryState(w(), momentum, w(), pos), chunk_size=16)


def _ttt_inputs(B, T, H, K, V, g):  # TTT-MLP (F = 4K, biases), mini-batches of 8; V = K (the residual)
    from .ttt import TTTState
    r, u = _gen(g)
    b = 8
    w = lambda s: (r(B, H, 4 * K, K) * K ** -0.5, s * r(B, H, 4 * K), r(B, H, K, 4 * K) * (4 * K) ** -0.5,  # noqa: E731
                   s * r(B, H, K))
    pos = torch.randint(0, b, (B,), generator=g)  # (B,) int64: each row at its own place in its mini-batch
    return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, K), eta=0.5 * u(B, T, H) / K,
                ln_w=1 + r(H, K) / 4, ln_b=r(H, K) / 4, token_eta=1 / torch.arange(1, b + 1) + u(b) / 4,
                initial_state=TTTState(w(0.1), tuple(0.1 * x for x in w(0.1)), pos), chunk_size=b)


def _dt(D, g):
    return torch.exp(torch.rand(D, generator=g, dtype=torch.float64) * 4.6 - 6.9)  # in [1e-3, 0.1]


def _lssl_inputs(B, T, H, K, V, g):  # dense HiPPO-LegS over D = H·K channels, N = K (64 at K = 64)
    from .lti import bilinear, hippo_legs
    r, _ = _gen(g)
    D = H * K
    dA, dB = bilinear(*hippo_legs(K, torch.float64), _dt(D, g))
    return dict(u=r(B, T, D), dA=dA, dB=dB, C=r(D, K) / 8, initial_state=r(B, D, K))


def _s4d_inputs(B, T, H, K, V, g):  # S4D-Lin over D = H·K channels: K/2 complex modes (32 at K = 64)
    r, _ = _gen(g)
    D, N = H * K, max(1, K // 2)
    A = torch.complex(torch.full((D, N), -0.5, dtype=torch.float64),
                      torch.pi * torch.arange(N, dtype=torch.float64).repeat(D, 1))
    dA = torch.exp(_dt(D, g)[:, None] * A)
    c = lambda *s: torch.complex(r(*s), r(*s))  # noqa: E731
    return dict(u=r(B, T, D), dA=dA, dB=(dA - 1) / A, C=c(D, N), initial_state=c(B, D, N))


def _block_size(K):  # units per block of the nonlinear / matrix-scan families: 8 at K = 64
    return max(2, K // 8)


def _newton_inputs(B, T, H, K, V, g):  # H blocks of a block-diagonal LSTM with u units each
    r, _ = _gen(g)
    n = _block_size(K)
    return dict(x=r(B, T, H, 4, n), R=r(H, n, 4, n) / math.sqrt(n), initial_state=r(B, H, 2 * n))


def _matrix_scan_inputs(B, T, H, K, V, g):  # H blocks of S x S transitions, spectral radius ~0.5
    r, _ = _gen(g)
    S = _block_size(K)
    return dict(J=0.5 * r(B, T, H, S, S) / math.sqrt(S), r=r(B, T, H, S), h0=r(B, H, S))


# -- adapters for families whose ops do not take tensors only -----------------------------------------
def _lstm_cell(R):
    """A block-diagonal LSTM cell: state s = [h, c] (..., H, 2n), input x (..., H, 4, n) holding
    the input-side pre-activations of the i, f, g, o gates, recurrent weights R (H, n, 4, n)."""
    def cell(s, x):
        n = R.shape[1]
        h, c = s[..., :n], s[..., n:]
        i, f, g, o = (x + torch.einsum("...hk,hkzj->...hzj", h, R)).unbind(-2)
        c = torch.sigmoid(f) * c + torch.sigmoid(i) * torch.tanh(g)
        return torch.cat([torch.sigmoid(o) * torch.tanh(c), c], dim=-1)
    return cell


def _with_cell(form):
    @functools.wraps(form)
    def run(x, R, initial_state, cu_seqlens=None):
        return form(_lstm_cell(R), x, initial_state, cu_seqlens=cu_seqlens)
    return run


def _no_state(form):
    """matrix_scan's forms return h only (h's last step is the final state): (h, None)."""
    @functools.wraps(form)
    def run(J, r, h0):
        return form(J, r, h0), None
    return run


# -- the rules choosing a form -------------------------------------------------------------------------
def _one_token_or(fast: str, main: str, one: str = "step"):
    def choose(inputs, table):  # packed rows (cu_seqlens) always take the fast form
        return one if inputs[main].shape[1] == 1 and inputs.get("cu_seqlens") is None else fast
    return choose


def _choose_scan(inputs, table):
    a, b = inputs["a"], inputs["b"]
    if a.shape[1] == 1 and inputs.get("cu_seqlens") is None:
        return "step"
    lanes = b[:, 0].numel()
    least = table["scan.loop_min_lanes"]
    return "loop" if least is not None and lanes >= least else "chunked"


def _choose_matrix_scan(inputs, table):
    least = table["matrix_scan.loop_min_entries"]
    return "loop" if least is not None and inputs["J"][:, 0].numel() >= least else "chunked"


def _choose_s4d(inputs, table):
    u = inputs["u"]
    if u.shape[1] == 1:
        return "reference"
    return "scan" if u.shape[0] <= table["lti.scan_max_batch"] else "conv"


def _compile_check_delta(inputs):
    """The delta rule's compiled core, for no decay or a scalar decay: with a vector decay the
    sub-chunked scores took over 10 minutes to compile here (fwd+bwd, T=37 in float64 then T=100
    in float32; 34 s for the scalar decay), so that case is not offered."""
    from .backends import compile_check
    log_g = inputs.get("log_g")
    if log_g is not None and log_g.dim() == 4:
        return "compiling the vector-decay core takes over 10 minutes here"
    return compile_check(inputs)


def _compile_check_unpacked(inputs):
    """Compiled forms whose unrolled chunks have no sequence resets: not for packed rows."""
    from .backends import compile_check
    if inputs.get("cu_seqlens") is not None:
        return "its compiled chunks take no cu_seqlens (packed rows)"
    return compile_check(inputs)


def _compile_check_lti(inputs):
    """The compiled diagonal LTI scan: as :func:`_compile_check_unpacked`, and it reads out y = C h
    (C=None, the LMU's states, stays on torch)."""
    if inputs.get("C") is None:
        return "its compiled chunks read out C h (C=None returns the states)"
    return _compile_check_unpacked(inputs)


# -- the table ------------------------------------------------------------------------------------------
_TABLE: dict[str, "Family"] = {}


def _table() -> dict[str, Family]:
    """The registered families, built on first use (a plain dict read afterwards, which
    ``torch.compile`` traces as a constant)."""
    if not _TABLE:
        _TABLE.update(_build())
    return _TABLE


def _build() -> dict[str, Family]:
    from . import backends as bk
    # by module path: rnnlab.ops.mlstm (and gsa, lti, ...) as attributes of the package are the
    # dispatch functions of the same name, not the modules
    delta, dplr, gsa, longhorn, lti, memory, mlstm, newton, rwkv6, scan, selective_scan, ttt = (
        importlib.import_module(f"{__package__}.{m}")
        for m in ("delta", "dplr", "gsa", "longhorn", "lti", "memory", "mlstm", "newton", "rwkv6", "scan",
                  "selective_scan", "ttt"))

    compile_delta = Backend("compile", {"chunked": delta.gated_delta_rule_chunked_compiled}, _compile_check_delta)
    qkv = ("q", "k", "v")
    fams = [
        Family("delta", "S_t = (I - b_t k_t k_t^T) g_t S_{t-1} + b_t k_t v_t^T, o_t = S_t^T q_t (Gated DeltaNet)",
               delta.gated_delta_rule_recurrent, {"chunked": delta.gated_delta_rule_chunked}, _delta_inputs,
               qkv + ("log_g", "beta", "initial_state"), _one_token_or("chunked", "q"), delta.one_token,
               delta.gated_delta_rule,
               {"compile": compile_delta, "fla": Backend("fla", {"chunked": bk.fla_gated_delta_rule}, bk.fla_check)},
               packed=("chunked",)),
        Family("gla", "S_t = Diag(g_t) S_{t-1} + k_t v_t^T with a decay vector g_t over K (GLA, HGRN2)",
               delta.gated_delta_rule_recurrent, {"chunked": delta.gated_delta_rule_chunked}, _gla_inputs,
               qkv + ("log_g", "initial_state"), _one_token_or("chunked", "q"), delta.one_token,
               delta.gated_delta_rule,
               {"fla": Backend("fla", {"chunked": bk.fla_gla}, bk.fla_check)},  # no compile: see _compile_check_delta
               packed=("chunked",)),
        Family("ssd", "S_t = g_t S_{t-1} + k_t v_t^T with a scalar decay per head (Mamba-2, RetNet)",
               delta.gated_delta_rule_recurrent, {"chunked": delta.gated_delta_rule_chunked}, _ssd_inputs,
               qkv + ("log_g", "initial_state"), _one_token_or("chunked", "q"), delta.one_token,
               delta.gated_delta_rule,
               {"compile": compile_delta, "fla": Backend("fla", {"chunked": bk.fla_simple_gla}, bk.fla_check)},
               packed=("chunked",)),
        Family("rwkv6", "o_t = S_{t-1}^T q_t + (q_t . u k_t) v_t, S_t = Diag(g_t) S_{t-1} + k_t v_t^T (RWKV-6)",
               rwkv6.rwkv6_recurrent, {"chunked": rwkv6.rwkv6_chunked}, _rwkv6_inputs,
               qkv + ("log_g", "u", "initial_state"), _one_token_or("chunked", "q", "reference"),
               dispatch=rwkv6.rwkv6, packed=("chunked",)),
        Family("dplr", "S_t = (Diag(g_t) + b_t a_t^T) S_{t-1} + k_t v_t^T, o_t = S_t^T q_t (RWKV-7)",
               dplr.dplr_recurrent, {"chunked": dplr.dplr_chunked}, _dplr_inputs,
               qkv + ("log_g", "a", "b", "initial_state"), _one_token_or("chunked", "q", "reference"),
               dispatch=dplr.dplr, packed=("chunked",)),
        Family("mlstm", "C_t = f_t C_{t-1} + i_t k_t v_t^T, n_t = f_t n_{t-1} + i_t k_t, stabilised (xLSTM)",
               mlstm.mlstm_recurrent, {"chunked": mlstm.mlstm_chunked, "parallel": mlstm.mlstm_parallel},
               _mlstm_inputs, qkv + ("log_f", "log_i", "initial_state"), _one_token_or("chunked", "q"),
               mlstm.one_token, mlstm.mlstm,
               {"compile": Backend("compile", {"chunked": mlstm.mlstm_chunked_compiled}, bk.compile_check)},
               packed=("chunked", "parallel")),
        Family("scan", "h_t = a_t * h_{t-1} + b_t elementwise (LRU, minGRU, S4D, Mamba-1 inside)",
               scan.linear_scan_recurrent, {"chunked": scan.linear_scan_chunked, "loop": scan.linear_scan_loop},
               _scan_inputs, ("a", "b", "initial_state"), _choose_scan, scan.one_token, scan.linear_scan,
               packed=("chunked", "loop")),
        Family("selective_scan", "h_t = exp(dt_t A) h_{t-1} + dt_t B_t u_t, y_t = C_t h_t + D u_t (Mamba-1)",
               selective_scan.selective_scan_recurrent, {"chunked": selective_scan.selective_scan_chunked},
               _selective_scan_inputs, ("u", "dt", "A", "B", "C", "D", "z", "initial_state"),
               _one_token_or("chunked", "u"), selective_scan.one_token, selective_scan.selective_scan,
               {"compile": Backend("compile", {"chunked": selective_scan.selective_scan_chunked_compiled},
                                   _compile_check_unpacked)},
               packed=("chunked",)),
        Family("longhorn", "S_t = (1 - eps_t k_t^2) S_{t-1} + eps_t v_t k_t^T (Longhorn's online update)",
               longhorn.longhorn_recurrent, {"chunked": longhorn.longhorn_chunked}, _longhorn_inputs,
               ("q", "k", "v", "beta", "initial_state"), _one_token_or("chunked", "v", "reference"),
               dispatch=longhorn.longhorn,
               backends={"compile": Backend("compile", {"chunked": longhorn.longhorn_chunked_compiled},
                                            _compile_check_unpacked)},
               packed=("chunked",)),
        Family("gsa", "two gated passes over M slots with a softmax between (gated slot attention)",
               gsa.gsa_recurrent, {"chunked": gsa.gsa_chunked}, _gsa_inputs,
               qkv + ("s", "log_g", "initial_state"), _one_token_or("chunked", "q", "reference"), dispatch=gsa.gsa,
               packed=("chunked",)),
        Family("memory", "M_t = g_t M_{t-1} + S_t, S_t = eta_t S_{t-1} - theta_t grad ||M(k_t) - v_t||^2 (Titans)",
               memory.neural_memory_recurrent, {"chunked": memory.neural_memory_chunked}, _memory_inputs,
               qkv + ("log_g", "log_eta", "theta", "initial_state"), _one_token_or("chunked", "q", "reference"),
               dispatch=memory.neural_memory, packed=("chunked",)),
        Family("ttt", "W_t = W_0 - c_i sum_s eta_s grad |LN(f(k_s; W_0)) - v_s + k_s|^2/2, o_t = q_t + LN(f(q_t; W_t))",
               ttt.ttt_recurrent, {"chunked": ttt.ttt_chunked}, _ttt_inputs,
               qkv + ("eta", "ln_w", "ln_b", "token_eta", "initial_state"), _one_token_or("chunked", "q", "reference"),
               dispatch=ttt.ttt, packed=("chunked",)),
        Family("lssl", "h_t = dA h_{t-1} + dB u_t, y_t = C h_t with a dense dA per channel (LSSL)",
               lti.lti_recurrent, {"conv": lti.lti_conv}, _lssl_inputs, ("u", "dA", "dB", "C", "initial_state"),
               _one_token_or("conv", "u", "reference"), dispatch=lti.lti, packed=("conv",),
               not_causal_in_nonfinite=("conv",)),
        Family("s4d", "h_t = dA * h_{t-1} + dB u_t, y_t = C h_t with a complex diagonal dA (S4D)",
               lti.lti_recurrent, {"conv": lti.lti_conv, "scan": lti.lti_scan}, _s4d_inputs,
               ("u", "dA", "dB", "C", "initial_state"), _choose_s4d, dispatch=lti.lti,
               backends={"compile": Backend("compile", {"scan": lti.lti_scan_compiled}, _compile_check_lti)},
               packed=("conv", "scan"), not_causal_in_nonfinite=("conv",)),
        Family("newton", "h_t = f(h_{t-1}, x_t) for a block-diagonal LSTM cell (DEER / ParaRNN)",
               _with_cell(newton.rnn_sequential), {"newton": _with_cell(newton.rnn_newton)}, _newton_inputs,
               ("x", "R", "initial_state"), lambda inputs, table: "newton", packed=("newton",)),
        Family("matrix_scan", "h_t = J_t h_{t-1} + r_t with small dense J_t (Newton iterations)",
               _no_state(newton.matrix_scan_recurrent),
               {"chunked": _no_state(newton.matrix_scan_chunked), "loop": _no_state(newton.matrix_scan_loop)},
               _matrix_scan_inputs, (), _choose_matrix_scan, dispatch=_no_state(newton.matrix_scan)),
    ]
    return {f.name: f for f in fams}
