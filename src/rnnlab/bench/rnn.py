"""Sequential vs Newton-parallel LSTM / GRU: wall time, Newton iterations and residuals vs T.

For each mixer (``lstm``, ``gru``) and sequence length T, one layer (float32, batch 1) is run in
both forms on the same input:

* ``fwd``: the forward pass (no autograd), ``fwd+bwd``: forward and backward of a random linear
  loss of the outputs (gradients of all parameters);
* the Newton solve's iteration count and final residual ``max |h_t - f(h_{t-1}, x_t)|``
  (``rnnlab.ops.newton_solve`` on the layer's own cell), and the largest difference between the
  two forms' outputs.

The two forms are timed alternately (the host is shared; compare within one run only). The
default is the diagonal recurrence of ParaRNN (``num_heads = d_hidden``: 2x2 Jacobian blocks for
the LSTM, 1x1 for the GRU); ``--heads`` picks block-diagonal recurrences instead.

``python -m rnnlab.bench.rnn [--T 512 1024 ...] [--mixers lstm gru] [--d-model 128] [--heads H]
[--threads N] [--quick] [--json out.json]``. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from . import report
from ..configs import Parser, int_at_least
from ..models.registry import build_mixer
from ..ops import newton_solve

_DEFAULT_T = [512, 1024, 2048, 4096, 8192, 16384]


def _fwd(layer, x) -> tuple[float, torch.Tensor]:
    t0 = time.perf_counter()
    with torch.no_grad():
        y = layer(x)[0]
    return time.perf_counter() - t0, y


def _fwd_bwd(layer, x, w) -> float:
    layer.zero_grad(set_to_none=True)
    t0 = time.perf_counter()
    y, _ = layer(x)
    (y * w).sum().backward()
    return time.perf_counter() - t0


def run(name: str, T: int, d_model: int, heads: int | None, repeats: int, seed: int = 0) -> dict:
    """One row: both forms of mixer ``name`` at length T (see the module docstring)."""
    torch.manual_seed(seed)
    layer = build_mixer(name, d_model=d_model, num_heads=heads or d_model)
    x = torch.randn(1, T, d_model)
    w = torch.randn(1, T, d_model)
    # the Newton solve on its own: iterations and residual
    with torch.no_grad():
        u, s0 = layer.recurrence_inputs(x)
        _, info = newton_solve(layer.cell, u, s0)
    for form in ("seq", "newton"):  # warm-up on a short sequence (first calls of torch.func are slow)
        layer.config.parallel = form == "newton"
        _fwd_bwd(layer, x[:, :64], w[:, :64])
    times = {("seq", "fwd"): [], ("newton", "fwd"): [], ("seq", "fwd+bwd"): [], ("newton", "fwd+bwd"): []}
    outs = {}
    for rep in range(repeats):  # the forms alternate, and so does their order
        for form in ("seq", "newton") if rep % 2 == 0 else ("newton", "seq"):
            layer.config.parallel = form == "newton"
            t_f, outs[form] = _fwd(layer, x)
            times[(form, "fwd")].append(t_f)
            times[(form, "fwd+bwd")].append(_fwd_bwd(layer, x, w))
    med = {k: statistics.median(v) for k, v in times.items()}
    return dict(mixer=name, T=T, d_model=d_model, num_heads=heads or d_model,
                seq_fwd_s=med[("seq", "fwd")], newton_fwd_s=med[("newton", "fwd")],
                seq_fwd_bwd_s=med[("seq", "fwd+bwd")], newton_fwd_bwd_s=med[("newton", "fwd+bwd")],
                speedup_fwd=med[("seq", "fwd")] / med[("newton", "fwd")],
                speedup_fwd_bwd=med[("seq", "fwd+bwd")] / med[("newton", "fwd+bwd")],
                newton_iters=info.iterations, newton_residual=info.residual, converged=info.converged,
                picard_steps=info.picard_steps, sequential_from=info.sequential_from,
                max_abs_diff=(outs["seq"] - outs["newton"]).abs().max().item())


def build_parser() -> Parser:
    p = Parser(prog="rnnlab bench rnn", description=__doc__.split("\n\n")[0])
    p.add_argument("--T", nargs="+", type=int_at_least(1), default=_DEFAULT_T, help="sequence lengths")
    p.add_argument("--mixers", nargs="+", default=["lstm", "gru"], choices=["lstm", "gru"])
    p.add_argument("--d-model", type=int_at_least(1), default=128, help="model width = hidden width")
    p.add_argument("--heads", type=int_at_least(1), default=None, help="recurrence blocks (default: d_model, diagonal)")
    p.add_argument("--repeats", type=int_at_least(1), default=2, help="timed rounds per form")
    p.add_argument("--threads", type=int_at_least(1), default=None, help="torch threads (default: torch's choice)")
    p.add_argument("--quick", action="store_true", help="T = 512 1024, d_model 32, one timed round")
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.d_model, a.repeats = [512, 1024], 32, 1
    if a.threads:
        torch.set_num_threads(a.threads)
    rows = []
    for name in a.mixers:
        for T in a.T:
            rows.append(run(name, T, a.d_model, a.heads, a.repeats))
            r = rows[-1]
            print(f"  {name} T={T}: seq {r['seq_fwd_s']:.3f}s / newton {r['newton_fwd_s']:.3f}s fwd, "
                  f"{r['newton_iters']} iterations", flush=True)
    print(f"{'mixer':6} {'T':>6} {'seq fwd':>9} {'newton fwd':>11} {'x':>6} {'seq f+b':>9} {'newton f+b':>11} "
          f"{'x':>6} {'iters':>6} {'residual':>9} {'max|dy|':>9}")
    for r in rows:
        print(f"{r['mixer']:6} {r['T']:6d} {r['seq_fwd_s']:8.3f}s {r['newton_fwd_s']:10.3f}s {r['speedup_fwd']:5.2f}x "
              f"{r['seq_fwd_bwd_s']:8.3f}s {r['newton_fwd_bwd_s']:10.3f}s {r['speedup_fwd_bwd']:5.2f}x "
              f"{r['newton_iters']:6d} {r['newton_residual']:9.1e} {r['max_abs_diff']:9.1e}")
    report("rnn", rows, a.json, device="cpu")
    return rows


if __name__ == "__main__":
    main()
