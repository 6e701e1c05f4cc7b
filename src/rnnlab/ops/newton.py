"""Kernel family D: nonlinear recurrences ``h_t = f(h_{t-1}, x_t)``, sequential and Newton-parallel.

Cell convention: ``cell(h, x) -> h_new`` works for any leading dimensions, with the state
``h (..., S)`` and the input ``x (..., *)``; every index before the last of h is an independent
block (for instance heads), so the Jacobian ``df/dh`` is block-diagonal with dense S x S blocks
(S = 1: a diagonal recurrence as in ParaRNN's diagonal variants). Parameters live in the cell's
closure (e.g. a module's weights); gradients reach them through autograd.

* :func:`rnn_sequential` — the definition, a loop over time.
* :func:`rnn_newton` — DEER / ParaRNN (Lim et al. 2024; Danieli et al. 2025): Newton's method on
  the whole trajectory. Each iteration linearises f around the current guess and solves the linear
  recurrence ``h_t = J_t h_{t-1} + (f_t - J_t h^k_{t-1})`` with a parallel scan (family A for
  S = 1, a small-matrix scan otherwise). The backward pass solves the adjoint recurrence
  ``l_t = g_t + J_{t+1}^T l_{t+1}`` in reverse with the same scan and sends ``l`` through one
  vector-Jacobian product of the cell — it never differentiates through the iterations.
* :func:`newton_solve` — the iterations alone (no autograd), with a :class:`NewtonInfo` report.

Shapes: x (B, T, ...), initial_state (B, ..., S); h (B, T, ..., S).

``cu_seqlens`` (:mod:`rnnlab.ops.bounds`; :func:`rnn_sequential` and :func:`rnn_newton`): N
sequences packed in one row (B = 1), initial_state (N, ..., S), final state (N, ..., S). In the
Newton form a sequence's first step is ``f(h0_n, x_t)`` exactly: its Jacobian is zero and its
previous state is h0_n by selection, so the linear recurrence and its adjoint restart there.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable

import torch

from . import tuning
from .bounds import check_cu_seqlens, token_carry
from .registry import outside_autocast, select
from .scan import linear_scan

__all__ = ["rnn_sequential", "rnn_newton", "newton_solve", "NewtonInfo", "matrix_scan", "matrix_scan_recurrent",
           "matrix_scan_chunked", "matrix_scan_loop", "check_newton_block", "MAX_NEWTON_BLOCK"]

Cell = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]

MAX_NEWTON_BLOCK = 64  # largest state block S the Newton form accepts: it keeps S x S entries per block and token


def check_newton_block(S: int, d_hidden: int, num_heads: int) -> None:
    """A ValueError unless a Newton state block of S entries (per head) is at most MAX_NEWTON_BLOCK."""
    if S > MAX_NEWTON_BLOCK:
        per_unit = S // (d_hidden // num_heads)
        need = -(-d_hidden * per_unit // MAX_NEWTON_BLOCK)
        raise ValueError(f"parallel=True keeps an S x S Jacobian per head and token; num_heads={num_heads} gives "
                         f"S={S} ({S * S * 4 * 4096 * num_heads / 2**30:.1f} GiB at T=4096 in float32). "
                         f"Use num_heads >= {need} (block-diagonal or diagonal recurrence, as in ParaRNN) "
                         f"or parallel=False")


@dataclass(frozen=True)
class NewtonInfo:
    """How a Newton solve ended."""

    iterations: int  # Newton iterations run
    residual: float  # max |h_t - f(h_{t-1}, x_t)| over the trajectory at the end
    converged: bool  # residual <= tol
    picard_steps: int = 0  # iterations where the Newton step was rejected for a fixed-point step
    sequential_from: int | None = None  # steps from here on were finished by the sequential loop


def _check_packed(x: torch.Tensor, initial_state: torch.Tensor, cu_seqlens) -> list[int] | None:
    cu = check_cu_seqlens(cu_seqlens, x.shape[0], x.shape[1])
    if cu is not None and initial_state.shape[0] != len(cu) - 1:
        raise ValueError(f"initial_state must have one row per sequence (N = {len(cu) - 1}) with cu_seqlens, "
                         f"got {tuple(initial_state.shape)}")
    return cu


def rnn_sequential(cell: Cell, x: torch.Tensor, initial_state: torch.Tensor,
                   cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The definition: ``h_t = cell(h_{t-1}, x_t)`` in a loop. Returns (h (B, T, ..., S), h_last);
    with ``cu_seqlens`` h is reset to sequence n's initial state (row n) at its first token and
    h_last has N rows."""
    cu = _check_packed(x, initial_state, cu_seqlens)
    carry = token_carry(cu, initial_state, None, x.shape[0], x.shape[1])
    h, hs = None, []
    for t, x_t in enumerate(x.unbind(1)):  # unbind: each step's backward stays O(1) (indexing would be O(T))
        h = cell(carry.enter(t, h), x_t)
        carry.leave(t, h)
        hs.append(h)
    return torch.stack(hs, dim=1), carry.final()


class _Starts:
    """The first tokens of the non-empty sequences of a packed row and their initial states."""

    def __init__(self, cu: list[int], initial_state: torch.Tensor):
        seqs = [(n, a) for n, (a, b) in enumerate(zip(cu, cu[1:])) if b > a]
        self.pos = torch.tensor([a for _, a in seqs], dtype=torch.long, device=initial_state.device)
        self.init = initial_state[[n for n, _ in seqs]]  # (k, ..., S)
        self.rows = {a: self.init[i:i + 1] for i, (_, a) in enumerate(seqs)}
        lengths = torch.tensor([b - a for a, b in zip(cu, cu[1:]) if b > a], device=initial_state.device)
        self.guess = self.init.repeat_interleave(lengths, dim=0).unsqueeze(0)  # (1, T, ..., S)

    def zero_at_starts(self, J: torch.Tensor) -> torch.Tensor:
        return J.index_fill(1, self.pos, 0.0)


def _jacobians(cell: Cell, h_prev: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
    """Blocks ``J[..., i, j] = d f_i / d h_j`` at every step: (B, T, ..., S, S), by S forward-mode
    products (one per column, all blocks at once)."""
    S = h_prev.shape[-1]
    eye = torch.eye(S, dtype=h_prev.dtype, device=h_prev.device)
    f = lambda h: cell(h, x)  # noqa: E731
    column = lambda e: torch.func.jvp(f, (h_prev,), (e.expand_as(h_prev),))[1]  # noqa: E731
    return torch.func.vmap(column)(eye).movedim(0, -1)  # (B, T, ..., S, S)


def matrix_scan_recurrent(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """The definition of ``h_t = J_t h_{t-1} + r_t``: a loop over time. J (B, T, ..., S, S),
    r (B, T, ..., S), h0 (B, ..., S) -> h (B, T, ..., S) in r's dtype."""
    acc = _acc(J, r)
    h, hs = h0.to(acc), []
    for t in range(J.shape[1]):
        h = (J[:, t].to(acc) @ h.unsqueeze(-1)).squeeze(-1) + r[:, t].to(acc)
        hs.append(h)
    return torch.stack(hs, dim=1).to(r.dtype)


def _acc(J, r) -> torch.dtype:
    return torch.promote_types(torch.promote_types(J.dtype, r.dtype), torch.float32)


def matrix_scan_chunked(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor,
                        chunk_size: int | None = None) -> torch.Tensor:
    """``h_t = J_t h_{t-1} + r_t`` by a Hillis–Steele scan of (matrix, vector) pairs inside chunks
    of ``chunk_size`` (None: the tuning table's ``matrix_scan.chunk_size``), then a carry pass
    across chunks. Same arguments and result as :func:`matrix_scan_recurrent`; in-place updates,
    so not differentiable by autograd (Newton solves run it without grad)."""
    acc = _acc(J, r)
    J, out_dtype, r, h0 = J.to(acc), r.dtype, r.to(acc), h0.to(acc)
    B, T = r.shape[:2]
    C = min(chunk_size or tuning.get("matrix_scan.chunk_size", J.device), T)
    N = -(-T // C)
    pad = N * C - T
    if pad:  # identity steps leave the carry unchanged
        eye = torch.eye(J.shape[-1], dtype=J.dtype, device=J.device).expand(B, pad, *J.shape[2:])
        J = torch.cat([J, eye], dim=1)
        r = torch.cat([r, r.new_zeros(B, pad, *r.shape[2:])], dim=1)
    A = J.reshape(B, N, C, *J.shape[2:]).clone()  # (B, N, C, ..., S, S) running products
    H = r.reshape(B, N, C, *r.shape[2:]).clone()  # (B, N, C, ..., S) running sums
    d = 1
    while d < C:  # 1. within chunks: (A, H)_t <- (A_t A_{t-d}, A_t H_{t-d} + H_t)
        H[:, :, d:] = (A[:, :, d:] @ H[:, :, :-d].unsqueeze(-1)).squeeze(-1) + H[:, :, d:]
        A[:, :, d:] = A[:, :, d:] @ A[:, :, :-d]
        d *= 2
    carry = [h0]  # 2. across chunks
    for n in range(N - 1):
        carry.append((A[:, n, -1] @ carry[-1].unsqueeze(-1)).squeeze(-1) + H[:, n, -1])
    carry = torch.stack(carry, dim=1).unsqueeze(2)  # (B, N, 1, ..., S)
    h = (A @ carry.unsqueeze(-1)).squeeze(-1) + H  # (B, N, C, ..., S)
    return h.reshape(B, N * C, *h.shape[3:])[:, :T].to(out_dtype)


def matrix_scan_loop(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor) -> torch.Tensor:
    """``h_t = J_t h_{t-1} + r_t`` as a loop over time of batched small matmuls written into one
    preallocated tensor (on CPU 2-3x faster than the log-depth scan with many entries per step).
    Same arguments and result as :func:`matrix_scan_recurrent`."""
    acc = _acc(J, r)
    S = J.shape[-1]
    out = torch.empty(r.shape, dtype=acc, device=r.device)
    h = h0.to(acc).reshape(-1, S, 1)
    for t in range(J.shape[1]):
        h = torch.baddbmm(r[:, t].to(acc).reshape(-1, S, 1), J[:, t].to(acc).reshape(-1, S, S), h)  # (B·..., S, 1)
        out[:, t] = h.view(h0.shape)
    return out.to(r.dtype)


def matrix_scan(J: torch.Tensor, r: torch.Tensor, h0: torch.Tensor, chunk_size: int | None = None) -> torch.Tensor:
    """``h_t = J_t h_{t-1} + r_t``: J (B, T, ..., S, S), r (B, T, ..., S), h0 (B, ..., S) -> h (B, T, ..., S)
    in r's dtype (accumulated in float32 or wider).

    S = 1 goes to the elementwise scan of family A; otherwise the form comes from
    :func:`rnnlab.ops.registry.select`: on CPU with at least the tuning table's
    ``matrix_scan.loop_min_entries`` matrix entries per step, :func:`matrix_scan_loop`; else
    :func:`matrix_scan_chunked` (``chunk_size`` None: the tuning table's).
    """
    if J.shape[-1] == 1:
        return linear_scan(J[..., 0], r, h0)[0]
    form, _ = select("matrix_scan", J=J, r=r, h0=h0)  # torch is its only backend
    if form == "loop":
        return outside_autocast(matrix_scan_loop)(J, r, h0)
    return outside_autocast(matrix_scan_chunked)(J, r, h0, chunk_size)


def _shift(h: torch.Tensor, h0: torch.Tensor, starts: _Starts | None = None) -> torch.Tensor:
    """h_{t-1} for every t; packed (``starts``): the sequence's initial state at its first token."""
    if starts is None:
        return torch.cat([h0.unsqueeze(1), h[:, :-1]], dim=1)
    prev = torch.cat([starts.init[:1].unsqueeze(1), h[:, :-1]], dim=1)
    return prev.index_copy(1, starts.pos, starts.init.unsqueeze(0))  # by selection


def _residual(cell: Cell, h: torch.Tensor, h0: torch.Tensor, x: torch.Tensor, starts: _Starts | None = None):
    """f = cell(h_{t-1}, x_t) for every t, and max |f - h| (inf when not finite)."""
    h_prev = _shift(h, h0, starts)
    f = cell(h_prev, x)
    res = (f - h).abs().max().item()
    return h_prev, f, res if res == res else float("inf")


@torch.no_grad()
def newton_solve(cell: Cell, x: torch.Tensor, initial_state: torch.Tensor, tol: float | None = None,
                 max_iters: int = 100, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, NewtonInfo]:
    """Newton iterations from the guess ``h = h0`` at every step until ``max |h - f(h_prev)| <=
    tol`` (default: 1e-12 in float64, 1e-5 in float32 and below), plus one polishing iteration
    (with quadratic convergence it removes what a long memory would amplify).

    Safeguards, so the result always equals the sequential loop: a Newton step that blows up (the
    residual overflows or grows over 1000-fold) is replaced by a fixed-point step ``h <- f(h_prev)``, which
    makes at least one more leading step exact; if ``max_iters`` pass without convergence (or two
    Newton steps in a row are rejected), the steps from the first unconverged one on are finished
    by the sequential loop. ``cu_seqlens``: packed rows (see the module docstring).
    """
    cu = _check_packed(x, initial_state, cu_seqlens)
    starts = None if cu is None else _Starts(cu, initial_state)
    h0 = initial_state if cu is None else torch.zeros_like(initial_state[:1])  # packed: the starts hold h0
    tol = (1e-12 if h0.dtype == torch.float64 else 1e-5) if tol is None else tol
    if starts is None:
        h = h0.unsqueeze(1).expand(-1, x.shape[1], *h0.shape[1:]).clone()  # (B, T, ..., S)
    else:
        h = starts.guess.clone()
    h_prev, f, res = _residual(cell, h, h0, x, starts)
    polished, picard, streak, it = False, 0, 0, 0
    while it < max_iters and not polished and streak < 2:  # two rejected Newton steps in a row: give up
        polished = res <= tol  # once within tol, one more step (quadratic convergence) and stop
        J = _jacobians(cell, h_prev, x)
        if starts is not None:  # a first step is f(h0_n, x_t): no dependence on the step before
            J = starts.zero_at_starts(J)
        r = f - (J @ h_prev.unsqueeze(-1)).squeeze(-1)
        h_new = matrix_scan(J, r, h0)
        new = _residual(cell, h_new, h0, x, starts)
        it += 1
        if new[2] > 1e3 * max(res, 1.0):  # 1. the Newton step blew up (overflow): fixed-point step instead
            h_new, picard, streak = f, picard + 1, streak + 1
            new = _residual(cell, h_new, h0, x, starts)
        else:
            streak = 0
        h, (h_prev, f, res) = h_new, new
    seq_from = None
    if res > tol:  # 2. finish the unconverged tail exactly, step by step
        bad = (~((f - h).abs() <= tol)).flatten(2).any(-1).any(0)  # (T,), NaN counts as unconverged
        seq_from = int(bad.nonzero()[0, 0])
        start = h0 if seq_from == 0 else h[:, seq_from - 1]
        if starts is None:
            tail = rnn_sequential(cell, x[:, seq_from:], start)[0]
        else:  # the same loop, restarting at each sequence's first token
            tail = []
            for t in range(seq_from, x.shape[1]):
                start = cell(starts.rows.get(t, start), x[:, t])
                tail.append(start)
            tail = torch.stack(tail, dim=1)
        h = torch.cat([h[:, :seq_from], tail], dim=1)
        _, _, res = _residual(cell, h, h0, x, starts)
    return h, NewtonInfo(iterations=it, residual=res, converged=res <= tol, picard_steps=picard,
                         sequential_from=seq_from)


class _Adjoint(torch.autograd.Function):
    """Identity forward; backward replaces the output gradient g by the adjoint l, with
    ``l_t = g_t + J_{t+1}^T l_{t+1}`` solved in reverse by the same scan."""

    @staticmethod
    def forward(ctx, out, J):
        ctx.save_for_backward(J)
        return out.clone()

    @staticmethod
    def backward(ctx, g):
        (J,) = ctx.saved_tensors
        Jt_next = torch.cat([J[:, 1:], torch.zeros_like(J[:, :1])], dim=1).transpose(-1, -2)  # J_{t+1}^T
        lam = matrix_scan(Jt_next.flip(1), g.flip(1), torch.zeros_like(g[:, 0])).flip(1)
        return lam, None


def rnn_newton(cell: Cell, x: torch.Tensor, initial_state: torch.Tensor, tol: float | None = None,
               max_iters: int = 100, cu_seqlens: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """The Newton-parallel form of :func:`rnn_sequential` (same results to the tolerance).

    The converged trajectory is re-evaluated once with autograd on (``f(h*_{t-1}, x_t)``, with
    ``h_0`` attached), and the adjoint recurrence is used as its output gradient, so gradients
    reach x, the initial state and the cell's parameters at the cost of one reverse scan.
    ``cu_seqlens``: packed rows (see the module docstring); h_last then has N rows.
    Returns (h (B, T, ..., S), h_last (B|N, ..., S)).
    """
    cu = _check_packed(x, initial_state, cu_seqlens)
    if cu is not None:
        return _rnn_newton_packed(cell, x, initial_state, tol, max_iters, cu)
    if x.shape[1] == 1:  # one token (decoding): a single cell call is exact
        h = cell(initial_state, x[:, 0]).unsqueeze(1)
        return h, h[:, -1]
    h, info = newton_solve(cell, x.detach(), initial_state.detach(), tol, max_iters)
    if info.sequential_from is not None:
        warnings.warn(f"rnn_newton did not converge in {info.iterations} iterations; steps "
                      f"{info.sequential_from}..{x.shape[1] - 1} were finished sequentially (exact, but slow: "
                      "use the sequential form for this model, or raise max_iters)", RuntimeWarning)
    h_prev = torch.cat([initial_state.unsqueeze(1), h[:, :-1]], dim=1)  # h0 keeps its graph
    out = cell(h_prev, x)
    if torch.is_grad_enabled() and out.requires_grad:
        with torch.no_grad():
            J = _jacobians(cell, h_prev.detach(), x.detach())
        out = _Adjoint.apply(out, J)
    return out, out[:, -1]


def _rnn_newton_packed(cell: Cell, x, initial_state, tol, max_iters, cu: list[int]):
    """:func:`rnn_newton` on a packed row: the solve restarts at each sequence's first token, the
    re-evaluation takes h0_n there (with its graph), the adjoint stops there (J = 0)."""
    h, info = newton_solve(cell, x.detach(), initial_state.detach(), tol, max_iters,
                           torch.tensor(cu, dtype=torch.int64))
    if info.sequential_from is not None:
        warnings.warn(f"rnn_newton did not converge in {info.iterations} iterations; steps "
                      f"{info.sequential_from}..{x.shape[1] - 1} were finished sequentially", RuntimeWarning)
    starts = _Starts(cu, initial_state)  # initial_state keeps its graph
    h_prev = _shift(h, None, starts)
    out = cell(h_prev, x)
    if torch.is_grad_enabled() and out.requires_grad:
        with torch.no_grad():
            J = starts.zero_at_starts(_jacobians(cell, h_prev.detach(), x.detach()))
        out = _Adjoint.apply(out, J)
    carry = token_carry(cu, initial_state, None, 1, x.shape[1])
    for a, b in zip(cu, cu[1:]):
        if b > a:
            carry.leave(b - 1, out[:, b - 1])
    return out, carry.final()
