"""Kernel speed: reference loops vs fast forms, and fast forms vs causal softmax attention (SDPA).

Families, their inputs (initial state included) and their forms come from
:mod:`rnnlab.ops.registry`, so a new family or backend is benchmarked at once. For each family and
each T: forward and forward+backward wall time (median of repeats, after a warm-up) of the
reference loop (up to ``--ref-max-T``) and of the form the dispatcher would choose, on the backend
``--backend`` (where the family has it; otherwise "torch", reported), and of
``scaled_dot_product_attention(is_causal=True)`` at the same B, H and head dim.

``python -m rnnlab.bench.ops [--T 512 1024 ...] [--families delta gla scan] [--backend compile] [--quick]
[--json F]``. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from . import report
from ..configs import Parser, int_at_least
from ..ops import registry


def _timeit(fn, repeats: int) -> float:
    fn()
    ts = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def _fwd(fn, inputs):
    def run():
        with torch.no_grad():
            fn(**inputs)
    return run


def _fwd_bwd(fn, family, inputs):
    leaves, _ = registry.with_grad(family, inputs)

    def run():
        loss = sum((o.real if o.is_complex() else o).float().sum() for o in registry.tensors(fn(**leaves)))
        loss.backward()
    return run


def _sdpa_inputs(B, T, H, K):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(B, H, T, K, generator=g) for n in "qkv"}


def _sdpa(**kw):
    return F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True)


def _sdpa_fwd_bwd(inputs):
    leaves = {n: t.detach().clone().requires_grad_() for n, t in inputs.items()}

    def run():
        _sdpa(**leaves).sum().backward()
    return run


def run(families, Ts, B, H, K, repeats, ref_max_T, backend="torch") -> list[dict]:
    """Time every family at every T; returns one row per (family, T) and prints it."""
    rows = []
    with registry.use_backend(backend):
        for name in families:
            fam = registry.get_family(name)
            for T in Ts:
                x = fam.inputs(B, T, H, K)
                form, used = registry.select(name, **x)
                fast = registry.implementation(name, form, used)
                s = _sdpa_inputs(B, T, H, K)
                row = dict(family=name, form=form, backend=used, T=T, B=B, H=H, K=K)
                grads = bool(fam.differentiable)  # matrix_scan runs without autograd: forward only
                row["fast_fwd_s"] = _timeit(_fwd(fast, x), repeats)
                row["fast_fwdbwd_s"] = _timeit(_fwd_bwd(fast, fam, x), repeats) if grads else None
                row["sdpa_fwd_s"] = _timeit(_fwd(_sdpa, s), repeats)
                row["sdpa_fwdbwd_s"] = _timeit(_sdpa_fwd_bwd(s), repeats)
                if T <= ref_max_T:
                    row["ref_fwd_s"] = _timeit(_fwd(fam.reference, x), 1)
                    row["ref_fwdbwd_s"] = _timeit(_fwd_bwd(fam.reference, fam, x), 1) if grads else None
                rows.append(row)
                _print_row(row)
    return rows


def _fmt(v):
    return f"{v * 1e3:9.1f}" if v is not None else "        -"


def _print_header():
    print(f"{'family':14} {'form':>9} {'backend':>7} {'T':>6} | {'ref fwd':>9} {'fast fwd':>9} {'sdpa fwd':>9} | "
          f"{'ref f+b':>9} {'fast f+b':>9} {'sdpa f+b':>9} | {'ref/fast':>8} {'sdpa/fast':>9}   "
          "(ms; ratios on fwd+bwd, on fwd where there is no backward)")


def _print_row(r):
    step = "fwdbwd" if r["fast_fwdbwd_s"] is not None else "fwd"
    ref, fast, sdpa = r.get(f"ref_{step}_s"), r[f"fast_{step}_s"], r[f"sdpa_{step}_s"]
    speedup = f"{ref / fast:7.1f}x" if ref else "       -"
    print(f"{r['family']:14} {r['form']:>9} {r['backend']:>7} {r['T']:6d} | "
          f"{_fmt(r.get('ref_fwd_s'))} {_fmt(r['fast_fwd_s'])} {_fmt(r['sdpa_fwd_s'])} | "
          f"{_fmt(r.get('ref_fwdbwd_s'))} {_fmt(r['fast_fwdbwd_s'])} {_fmt(r['sdpa_fwdbwd_s'])} | "
          f"{speedup} {sdpa / fast:8.2f}x", flush=True)


def build_parser() -> Parser:
    p = Parser(prog="rnnlab bench ops", description=__doc__.split("\n\n")[0])
    names = registry.families()
    p.add_argument("--families", nargs="+", default=names, choices=names, help="op families to time")
    p.add_argument("--backend", default="torch", choices=registry.BACKENDS,
                   help="backend to prefer for the fast forms (where a family lacks it: torch, reported)")
    p.add_argument("--T", nargs="+", type=int_at_least(1), default=[512, 1024, 2048, 4096, 8192, 16384], help="sequence lengths")
    p.add_argument("--B", type=int_at_least(1), default=1, help="batch size")
    p.add_argument("--H", type=int_at_least(1), default=8, help="heads")
    p.add_argument("--K", type=int_at_least(1), default=64, help="head dimension (keys and values)")
    p.add_argument("--repeats", type=int_at_least(1), default=3, help="timed calls; the median is reported")
    p.add_argument("--ref-max-T", type=int_at_least(1), default=4096, help="time reference loops only up to this T")
    p.add_argument("--quick", action="store_true", help="T = 256, 512; reference up to 512; 1 repeat")
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.ref_max_T, a.repeats = [256, 512], 512, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.B} H={a.H} K=V={a.K}, float32, "
          f"backend {a.backend}")
    for name in a.families:
        print(f"  {name}: {registry.get_family(name).doc}")
    _print_header()
    rows = run(a.families, a.T, a.B, a.H, a.K, a.repeats, a.ref_max_T, a.backend)
    report("ops", rows, a.json, backend=a.backend)
    return rows


if __name__ == "__main__":
    main()
