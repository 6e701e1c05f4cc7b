"""Kernel speed: reference loops vs fast forms, and fast forms vs causal softmax attention (SDPA).

For each family and each T: forward and forward+backward wall time (median of repeats, after a
warm-up) of the reference loop (up to ``--ref-max-T``) and of the fast form, and of
``scaled_dot_product_attention(is_causal=True)`` at the same B, H and head dim.

``python -m rnnlab.bench.ops [--T 512 1024 ...] [--families delta gla scan] [--quick] [--json F]``
Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from . import report
from .. import ops

FAMILIES = ("delta", "gla", "mlstm", "scan", "selective_scan", "longhorn", "gsa", "memory", "lssl", "s4d")


def _inputs(family: str, B: int, T: int, H: int, K: int, dtype=torch.float32):
    g = torch.Generator().manual_seed(0)
    r = lambda *s: torch.randn(*s, generator=g, dtype=dtype)  # noqa: E731
    if family == "delta":  # Gated DeltaNet's case: scalar decay per head, beta in (0, 1)
        return dict(q=r(B, T, H, K), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, K),
                    log_g=F.logsigmoid(r(B, T, H) + 4), beta=torch.rand(B, T, H, generator=g))
    if family == "gla":  # GLA's case: vector decay over K, no delta term
        return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, K),
                    log_g=F.logsigmoid(r(B, T, H, K) + 4) / 16)
    if family == "mlstm":  # xLSTM's mLSTM: exponential input gate, sigmoid forget gate
        return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, K), log_f=F.logsigmoid(r(B, T, H) + 3),
                    log_i=r(B, T, H))
    if family == "scan":  # an LRU / minGRU-sized elementwise scan: (B, T, H·K) channels
        return dict(a=torch.rand(B, T, H * K, generator=g), b=r(B, T, H * K))
    if family == "selective_scan":  # Mamba-1 with D = H·K channels and N = 16
        D = H * K
        return dict(u=r(B, T, D), dt=F.softplus(r(B, T, D) - 3), A=-torch.exp(r(D, 16)), B=r(B, T, 16),
                    C=r(B, T, 16))
    if family == "longhorn":  # Longhorn with D = H·K channels and N = 16
        D = H * K
        return dict(q=r(B, T, 16), k=r(B, T, 16) / 4, v=r(B, T, D), beta=torch.rand(B, T, D, generator=g))
    if family == "gsa":  # gated slot attention with 64 slots per head
        log_g = F.logsigmoid(r(B, T, H, 64)) / 8
        return dict(q=r(B, T, H, K), k=r(B, T, H, K), v=r(B, T, H, K), s=-torch.expm1(log_g), log_g=log_g)
    if family == "memory":  # Titans' 2-layer MLP memory (F = 2K), mini-batches of 16
        return dict(q=F.normalize(r(B, T, H, K), dim=-1), k=F.normalize(r(B, T, H, K), dim=-1), v=r(B, T, H, K),
                    log_g=F.logsigmoid(r(B, T, H) + 5), log_eta=F.logsigmoid(r(B, T, H) + 2),
                    theta=0.05 * torch.rand(B, T, H, generator=g),
                    w1=r(B, H, 2 * K, K) * K ** -0.5, w2=r(B, H, K, 2 * K) * (2 * K) ** -0.5)
    if family in ("lssl", "s4d"):  # LTI state spaces over D = H·K channels: dense LegS N=64 / complex diagonal N/2=32
        D = H * K
        dt = torch.exp(torch.rand(D, generator=g) * 4.6 - 6.9)
        if family == "lssl":
            dA, dB = ops.bilinear(*ops.hippo_legs(64), dt)
            return dict(u=r(B, T, D), dA=dA, dB=dB, C=r(D, 64) / 8)
        A = torch.complex(torch.full((D, 32), -0.5), torch.pi * torch.arange(32.0).repeat(D, 1))
        dA = torch.exp(dt[:, None] * A)
        return dict(u=r(B, T, D), dA=dA, dB=(dA - 1) / A, C=torch.complex(r(D, 32), r(D, 32)))
    raise ValueError(f"unknown family {family!r}; choose from {FAMILIES}")


def _mlp_memory(form):
    """A neural-memory form taking the MLP memory's starting weights as tensors (momentum zero)."""
    def run(q, k, v, log_g, log_eta, theta, w1, w2):
        zeros = (torch.zeros_like(w1), torch.zeros_like(w2))
        return form(q, k, v, log_g, log_eta, theta, ops.MemoryState((w1, w2), zeros, (w1, w2), 0))
    return run


_FORMS = {
    "delta": (ops.gated_delta_rule_recurrent, ops.gated_delta_rule),
    "gla": (ops.gated_delta_rule_recurrent, ops.gated_delta_rule),
    "mlstm": (ops.mlstm_recurrent, ops.mlstm),
    "scan": (ops.linear_scan_recurrent, ops.linear_scan),
    "selective_scan": (ops.selective_scan_recurrent, ops.selective_scan),
    "longhorn": (ops.longhorn_recurrent, ops.longhorn),
    "gsa": (ops.gsa_recurrent, ops.gsa),
    "memory": (_mlp_memory(ops.neural_memory_recurrent), _mlp_memory(ops.neural_memory)),
    "lssl": (ops.lti_recurrent, ops.lti),
    "s4d": (ops.lti_recurrent, ops.lti),
}


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


def _fwd_bwd(fn, inputs):
    leaves = {k: v.detach().clone().requires_grad_(v.is_floating_point() or v.is_complex()) for k, v in inputs.items()}

    def run():
        out = fn(**leaves)
        loss = sum((o.real if o.is_complex() else o).float().sum()
                   for o in (out if isinstance(out, tuple) else (out,)) if isinstance(o, torch.Tensor))
        loss.backward()
    return run


def _sdpa_inputs(B, T, H, K):
    g = torch.Generator().manual_seed(0)
    return {n: torch.randn(B, H, T, K, generator=g) for n in "qkv"}


def _sdpa(**kw):
    return F.scaled_dot_product_attention(kw["q"], kw["k"], kw["v"], is_causal=True)


def run(families, Ts, B, H, K, repeats, ref_max_T) -> list[dict]:
    rows = []
    for fam in families:
        ref, fast = _FORMS[fam]
        for T in Ts:
            x = _inputs(fam, B, T, H, K)
            s = _sdpa_inputs(B, T, H, K)
            row = dict(family=fam, T=T, B=B, H=H, K=K)
            row["fast_fwd_s"] = _timeit(_fwd(fast, x), repeats)
            row["fast_fwdbwd_s"] = _timeit(_fwd_bwd(fast, x), repeats)
            row["sdpa_fwd_s"] = _timeit(_fwd(_sdpa, s), repeats)
            row["sdpa_fwdbwd_s"] = _timeit(_fwd_bwd(_sdpa, s), repeats)
            if T <= ref_max_T:
                row["ref_fwd_s"] = _timeit(_fwd(ref, x), 1)
                row["ref_fwdbwd_s"] = _timeit(_fwd_bwd(ref, x), 1)
            rows.append(row)
            _print_row(row)
    return rows


def _fmt(v):
    return f"{v * 1e3:9.1f}" if v is not None else "        -"


def _print_header():
    print(f"{'family':15} {'T':>6} | {'ref fwd':>9} {'fast fwd':>9} {'sdpa fwd':>9} | {'ref f+b':>9} {'fast f+b':>9} "
          f"{'sdpa f+b':>9} | {'ref/fast':>8} {'sdpa/fast':>9}   (ms; ratios on fwd+bwd)")


def _print_row(r):
    ref = r.get("ref_fwdbwd_s")
    speedup = f"{ref / r['fast_fwdbwd_s']:7.1f}x" if ref else "       -"
    print(f"{r['family']:15} {r['T']:6d} | {_fmt(r.get('ref_fwd_s'))} {_fmt(r['fast_fwd_s'])} {_fmt(r['sdpa_fwd_s'])} | "
          f"{_fmt(ref)} {_fmt(r['fast_fwdbwd_s'])} {_fmt(r['sdpa_fwdbwd_s'])} | "
          f"{speedup} {r['sdpa_fwdbwd_s'] / r['fast_fwdbwd_s']:8.2f}x",
          flush=True)


def main(argv: list[str] | None = None) -> list[dict]:
    p = argparse.ArgumentParser(prog="rnnlab bench ops", description=__doc__.split("\n\n")[0])
    p.add_argument("--families", nargs="+", default=list(FAMILIES), choices=FAMILIES)
    p.add_argument("--T", nargs="+", type=int, default=[512, 1024, 2048, 4096, 8192, 16384])
    p.add_argument("--B", type=int, default=1)
    p.add_argument("--H", type=int, default=8)
    p.add_argument("--K", type=int, default=64)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--ref-max-T", type=int, default=4096, help="time reference loops only up to this T")
    p.add_argument("--quick", action="store_true", help="T = 256, 512; reference up to 512; 1 repeat")
    p.add_argument("--json", help="also write the results to this file")
    a = p.parse_args(argv)
    if a.quick:
        a.T, a.ref_max_T, a.repeats = [256, 512], 512, 1
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, B={a.B} H={a.H} K=V={a.K}, float32")
    _print_header()
    rows = run(a.families, a.T, a.B, a.H, a.K, a.repeats, a.ref_max_T)
    report("ops", rows, a.json)
    return rows


if __name__ == "__main__":
    main()
