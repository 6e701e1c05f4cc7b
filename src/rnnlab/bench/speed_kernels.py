"""``rnnlab bench speed efficiency``: achieved FLOP/s of the chunked kernels of the op registry.

Each case runs one kernel form of :mod:`rnnlab.ops.registry` on the registry's random inputs
(batch ``--batch``, H = d_model / head_dim heads of K = V = head_dim, the run's dtype) and is timed
forward, without autograd. Its FLOPs are those of the algorithm actually run, counted from the
shapes and the chunk size of the tuning table (formulas in :mod:`rnnlab.bench.flops`); achieved
FLOP/s = FLOPs / time, shown as a fraction of the ``torch.mm`` peak measured in the same run.

Cases: ``delta`` (gated delta rule, scalar decay), ``delta_vector`` (gated delta rule, decay
vector over K), ``ssd`` (scalar decay, no delta term: Mamba-2, RetNet), ``gla`` (vector decay, no
delta term), ``mlstm``, ``scan`` (the elementwise linear scan, Hillis-Steele chunks), ``scan_loop``
(the same scan as a loop over time, the CPU's choice from 1024 lanes) and ``sdpa`` (causal
``scaled_dot_product_attention`` at the same B, H, K: the reference). Backward passes are not
counted (autograd's work is not the algorithm's to count).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from .flops import FORMULAS, KERNEL_CASES, kernel_flops
from .measure import timeit
from ..ops import registry, tuning

__all__ = ["run_efficiency", "CASES"]

# case -> (registry family, form, chunk-size key, sub-chunk key or None)
CASES = {
    "delta": ("delta", "chunked", "delta.chunk_size", None),
    "delta_vector": ("delta", "chunked", "gla.chunk_size", "gla.sub_chunk"),
    "ssd": ("ssd", "chunked", "delta.chunk_size", None),
    "gla": ("gla", "chunked", "gla.chunk_size", "gla.sub_chunk"),
    "mlstm": ("mlstm", "chunked", "mlstm.chunk_size", None),
    "scan": ("scan", "chunked", "scan.chunk_size", None),
    "scan_loop": ("scan", "loop", None, None),
    "sdpa": (None, "causal", None, None),
}
assert set(CASES) == set(KERNEL_CASES)


def _inputs(case: str, B: int, T: int, H: int, K: int, dtype: torch.dtype, device: torch.device) -> dict:
    family = CASES[case][0]
    if family is None:  # SDPA: (B, H, T, K)
        g = torch.Generator().manual_seed(0)
        return {n: torch.randn(B, H, T, K, generator=g).to(device, dtype) for n in "qkv"}
    x = registry.get_family(family).inputs(B, T, H, K, dtype=dtype)
    if case == "delta_vector":  # the delta family's inputs with a decay vector over K
        g = torch.Generator().manual_seed(1)
        x["log_g"] = F.logsigmoid(torch.randn(B, T, H, K, generator=g) + 4).to(dtype)
    return {n: (v.to(device) if isinstance(v, torch.Tensor) else
                tuple(t.to(device) for t in v) if isinstance(v, tuple) else v) for n, v in x.items()}


def _factored(x: dict, chunk: int) -> bool:
    """Whether a vector-decay case's scores run factored on these inputs: finite CPU inputs whose
    cumulative log-decays, counted from each chunk's middle, pass ``decay_factors_fit``."""
    from ..ops.bounds import chunk_middle, decay_factors_fit, known_finite
    log_g = x["log_g"]
    if not known_finite(*(t for t in x.values() if isinstance(t, torch.Tensor))):
        return False
    cum = F.pad(log_g.float(), (0, 0, 0, 0, 0, -log_g.shape[1] % chunk)).unflatten(1, (-1, chunk)).cumsum(2)
    return decay_factors_fit(cum - chunk_middle(cum, dim=2))  # (B, N, C, H, K)


def _kernel(case: str):
    family, form, _, _ = CASES[case]
    if family is None:
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True)
    return registry.get_family(family).form(form)


def run_efficiency(ctx):
    """Rows (case, T): forward time, FLOPs, FLOP/s, fraction of the mm peak; and plot panels."""
    a = ctx.a
    cases = a.families or list(CASES)
    unknown = sorted(set(cases) - set(CASES))
    if unknown:
        raise ValueError(f"--families: unknown kernel case(s) {unknown}; choose from {list(CASES)}")
    H, K = a.d_model // a.head_dim, a.head_dim
    peak = ctx.mm_peak()
    print(f"B={a.batch}, H={H}, K=V={K}; forward only, no autograd. FLOPs counted (x B·H sequences; the scan "
          "x B·H·K lanes; N chunks of C, sub-chunks of c, m = C/c):")
    for case in cases:
        print(f"  {case:13} {FORMULAS[case]}")
    print(f"{'case':13} {'form':>8} {'chunk':>5} {'T':>6} | {'fwd ms':>10} {'GFLOP':>9} {'GFLOP/s':>9} "
          f"{'of peak':>8} | status")
    rows = []
    for T in a.T:
        for case in cases:
            family, form, chunk_key, sub_key = CASES[case]
            chunk = tuning.get(chunk_key, ctx.device) if chunk_key else None  # None: no chunks
            sub = tuning.get(sub_key, ctx.device) if sub_key else None
            x = _inputs(case, a.batch, T, H, K, ctx.dtype, ctx.device)
            if chunk_key == "delta.chunk_size":  # as the op picks it: no longer than the key size
                from ..ops.delta import _chunk_size
                chunk = _chunk_size(x["q"], vector=False)
            if sub_key and _factored(x, chunk):
                sub = None  # the scores are two matmuls: no sub-chunks
            row = dict(case=case, family=family or "sdpa", form=form, chunk=chunk, sub_chunk=sub, T=T, B=a.batch,
                       H=H, K=K, V=K, flop_formula=FORMULAS[case],
                       flops=kernel_flops(case, a.batch, T, H, K, K, chunk or 1, sub if sub_key else 8),
                       fwd_s=None, flop_s=None, fraction_of_peak=None, status="ok")
            rows.append(row)
            stopped = ctx.budget.stopped(case)
            if stopped:
                row["status"] = stopped
            else:
                fn = _kernel(case)

                def run():
                    with torch.no_grad():
                        fn(**x)

                t = timeit(run, ctx.device, a.repeats, ctx.budget.seconds, a.warmup)
                row.update(fwd_s=t.seconds, flop_s=row["flops"] / t.seconds,
                           fraction_of_peak=row["flops"] / t.seconds / peak)
                row["status"] = ctx.budget.passed(case, T, seconds=t.seconds) or (
                    "ok (scores factored)" if sub_key and sub is None else "ok")
                del x
            _print(row)
    series = lambda key: {c: [(r["T"], r[key]) for r in rows if r["case"] == c] for c in cases}  # noqa: E731
    panels = [(f"forward time (B={a.batch}, H={H}, K=V={K})", series("fwd_s")),
              ("fraction of the torch.mm peak", series("fraction_of_peak"))]
    return rows, panels, "T (tokens)", "seconds  |  fraction of peak", "sdpa"


def _print(r: dict) -> None:
    def num(v, fmt, width):
        return format(v, fmt) if v is not None else "-".rjust(width)
    print(f"{r['case']:13} {r['form']:>8} {num(r['chunk'], '5d', 5)} {r['T']:6d} | "
          f"{num(r['fwd_s'] and r['fwd_s'] * 1e3, '10.2f', 10)} {r['flops'] / 1e9:9.4g} "
          f"{num(r['flop_s'] and r['flop_s'] / 1e9, '9.2f', 9)} {num(r['fraction_of_peak'], '8.1%', 8)} | "
          f"{r['status']}", flush=True)
