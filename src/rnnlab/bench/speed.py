"""``rnnlab bench speed MODE``: every form, mixer and peer side by side with softmax attention.

Modes (each prints a table, writes JSON to ``--json`` — default ``runs/bench/speed_<mode>.json`` —
and a log-log PNG of time against T to ``--png`` — default beside the JSON —, then ends with one
JSON line):

* ``models``: training tokens/s (forward + backward + AdamW step) with the training step's peak
  memory (measured as in ``layers``), and prefill tokens/s (forward without autograd) of whole
  models (``--n-layers`` 6, ``--d-model`` 512, head dim 64, batch 1) of every mixer against the
  same-size Transformer (``attention``, same width and depth), at each ``--T``; with
  ``--same-params`` also against the Transformer with as many parameters (its MLP widened or
  narrowed to match the mixer's model); with ``--recompute`` every model (the Transformer too)
  runs with ``LM.recompute = True``, as ``rnnlab train --recompute`` does; ``--backend compile``
  (models and layers) runs the ops on that backend, as ``rnnlab train --ops-backend compile``;
* ``layers``: one layer of every mixer, forward and forward + backward time and peak memory over
  T, beside causal SDPA (the ``attention`` mixer), each time next to the layer's floor (FLOPs it
  must do / the matmul peak measured in the same run; :mod:`rnnlab.bench.flops`). Peak memory is
  the tensor memory one call allocates beyond its inputs and parameters: the CUDA allocator's
  peak, on CPU the CPU allocator's events seen by ``torch.profiler`` (measured on an extra, untimed
  call; :func:`rnnlab.bench.measure.peak_memory`);
* ``decode``: per-token latency and memory of models at growing contexts (prefilled in chunks),
  next to the weight-streaming floor (weight bytes / measured bandwidth)
  (:mod:`rnnlab.bench.speed_decode`);
* ``efficiency``: achieved FLOP/s of the chunked kernels of the op registry as a fraction of the
  matmul peak (:mod:`rnnlab.bench.speed_kernels`);
* ``peers``: rnnlab beside other implementations that run here, outputs checked first
  (:mod:`rnnlab.bench.speed_peers`);
* ``ragged``: prefill of N prompts of different lengths packed in one row, padded, and one by one
  (:mod:`rnnlab.bench.speed_ragged`).

Width: mixers get ``num_heads = d_model / head_dim`` and ``head_dim`` wherever their config has
those options (Mamba-2: ``head_dim``); other options keep their defaults. Timing: ``--warmup`` untimed
calls (default 1), then the median of ``--repeats`` calls (``time.perf_counter``, the device synchronised).
A mixer whose call passes ``--budget-s`` (or whose measured peak passes ``--budget-gb``) at some T
is not run at larger T: those rows say "over budget". Calls run one after another with every
mixer at one T before the next T, so compare rows of one run only; with another process on the
cores (more than 0.5 other runnable processes on average over a second before the run, from
/proc/stat; the 1-minute load average where there is none: a warning, and ``others_running`` and
``load_avg`` in the JSON) the numbers mean little.

``rnnlab bench speed layers --mixers gated_deltanet mamba2 --T 1024 4096 [--quick] [--json F]``
"""
from __future__ import annotations

import argparse
import json
from dataclasses import dataclass, field
from pathlib import Path

import torch
import torch.nn.functional as F

from . import report
from .flops import layer_flops
from .measure import Budget, bandwidth, load_average, matmul_peak, others_running, peak_memory, timeit
from .plot import loglog
from ..configs import Parser, int_at_least, parse_device
from ..models.registry import build_mixer, make_config, mixers, options_help
from ..ops.registry import BACKENDS, use_backend

MODES = ("models", "layers", "decode", "efficiency", "peers", "ragged")
_POW2 = lambda lo, hi: [2 ** i for i in range(lo, hi + 1)]  # noqa: E731
_DEFAULT_T = {"models": _POW2(9, 14), "layers": _POW2(9, 15), "efficiency": _POW2(9, 14), "peers": _POW2(9, 12)}
LOAD_WARN = 0.5


@dataclass
class Ctx:
    """What every mode needs: the parsed options, device, dtype, budget, and the machine's peaks
    (measured once, on first use, in this run)."""

    a: argparse.Namespace
    device: torch.device
    dtype: torch.dtype
    budget: Budget
    extra: dict = field(default_factory=dict)  # written into the JSON beside the rows

    def autocast(self):
        """The forward's precision context: bfloat16 autocast with ``--autocast bf16``, else none."""
        return torch.autocast(self.device.type, dtype=torch.bfloat16, enabled=self.a.autocast == "bf16")

    def mm_peak(self) -> float:
        """The torch.mm peak in the dtype the projections run in (bfloat16 under autocast)."""
        if "mm_peak_flops" not in self.extra:
            sizes, reps = ((256, 512), 2) if self.a.quick else ((1024, 1536, 2048), 5)
            dtype = torch.bfloat16 if self.a.autocast == "bf16" else self.dtype
            self.extra["mm_peak_flops"] = matmul_peak(self.device, dtype, sizes, reps)
            print(f"torch.mm peak ({str(dtype).removeprefix('torch.')}, best of {reps} at n = "
                  f"{', '.join(map(str, sizes))}): {self.extra['mm_peak_flops'] / 1e9:.1f} GFLOP/s", flush=True)
        return self.extra["mm_peak_flops"]

    def bandwidth(self) -> float:
        if "bandwidth_bytes_s" not in self.extra:
            nbytes = 16 * 2 ** 20 if self.a.quick else 512 * 2 ** 20
            # float32 whatever the run's dtype: a bfloat16 GEMV on CPU may be compute-bound, not memory-bound
            self.extra["bandwidth_bytes_s"] = bandwidth(self.device, torch.float32, nbytes, 2 if self.a.quick else 7)
            print(f"memory bandwidth (torch.mv over {nbytes >> 20} MB of float32 weights, best): "
                  f"{self.extra['bandwidth_bytes_s'] / 1e9:.1f} GB/s", flush=True)
        return self.extra["bandwidth_bytes_s"]


def width_options(name: str, d_model: int, head_dim: int) -> dict:
    """Config options giving mixer ``name`` heads of ``head_dim`` at ``d_model``: ``num_heads =
    d_model / head_dim`` and ``head_dim`` where the config has them; {} where it has neither or the
    combination is refused (then the defaults run)."""
    have = {o for o, _, _ in options_help(name)}
    opts = {}
    if "num_heads" in have:
        opts["num_heads"] = d_model // head_dim
    if "head_dim" in have:
        opts["head_dim"] = head_dim
    for trial in (opts, {k: v for k, v in opts.items() if k == "head_dim"},
                  {k: v for k, v in opts.items() if k == "num_heads"}):
        try:
            make_config(name, d_model, **trial)
            return dict(trial)
        except (ValueError, TypeError):
            continue
    return {}


def layout_item(name: str, options: dict) -> str:
    """``name(k=v,...)`` as a layout item."""
    return f"{name}({','.join(f'{k}={v!r}' for k, v in options.items())})" if options else name


def _ms(s: float | None) -> str:
    return f"{s * 1e3:10.2f}" if s is not None else f"{'-':>10}"


def _mb(b: int | None) -> str:
    return f"{b / 2 ** 20:9.1f}" if b is not None else f"{'-':>9}"


def _ratio(x: float | None) -> str:
    return f"{x:7.2f}x" if x is not None else f"{'-':>8}"


def _names(a) -> list[str]:
    """The mixers to run, attention (the reference) first."""
    rest = [m for m in (a.mixers or mixers()) if m != "attention"]
    return ["attention"] + rest


def _measure(ctx: Ctx, key, T: int, fn, row: dict, field_: str) -> bool:
    """Time ``fn`` into ``row[field_]`` unless ``key`` is stopped; record a passed budget in the
    row's status. Returns False when the key is (now) stopped."""
    if ctx.budget.stopped(key):
        row["status"] = ctx.budget.stopped(key)
        return False
    t = timeit(fn, ctx.device, ctx.a.repeats, ctx.budget.seconds, ctx.a.warmup)
    row[field_] = t.seconds
    why = ctx.budget.passed(key, T, seconds=t.seconds)
    if why:
        row["status"] = why
    return why is None


# -- models ------------------------------------------------------------------------------------------
def run_models(ctx: Ctx):
    """Training and prefill tokens/s of whole models of every mixer vs the Transformer."""
    from .. import build_model
    a = ctx.a
    print(f"{'mixer':17} {'T':>6} {'params':>11} | {'train tok/s':>12} {'vs attn':>8} {'train MB':>9} | "
          f"{'prefill tok/s':>13} {'vs attn':>8} | status" + ("   (blocks recomputed)" if a.recompute else ""))
    rows, ref = [], {}
    tok = lambda v: f"{v:12,.0f}" if v else f"{'-':>12}"  # noqa: E731

    def timed(name: str, model, T: int, key: str, opts: dict) -> dict:
        """Training and prefill of ``model`` at T: a result row."""
        model = model.to(ctx.device, ctx.dtype)
        model.recompute = a.recompute
        opt = torch.optim.AdamW(model.param_groups(0.1), lr=1e-4)
        tokens = torch.randint(0, model.config.vocab_size, (a.batch, T + 1), device=ctx.device)
        x, y = tokens[:, :-1], tokens[:, 1:]

        def train():
            opt.zero_grad(set_to_none=True)
            with ctx.autocast():
                logits, _ = model(x)
            F.cross_entropy(logits.float().flatten(0, 1), y.flatten()).backward()
            opt.step()

        def prefill():
            with torch.no_grad(), ctx.autocast():
                model(x)

        row = dict(mixer=name, T=T, B=a.batch, options=opts, params=model.num_params(), recompute=a.recompute,
                   train_s=None, train_peak_bytes=None, prefill_s=None, status="ok")
        if _measure(ctx, key, T, train, row, "train_s"):
            row["train_peak_bytes"] = peak_memory(train, ctx.device)
            why = ctx.budget.passed(key, T, nbytes=row["train_peak_bytes"])
            if why:
                row["status"] = why
            _measure(ctx, key, T, prefill, row, "prefill_s")
        for what in ("train", "prefill"):
            row[f"{what}_tok_s"] = a.batch * T / row[f"{what}_s"] if row[f"{what}_s"] else None
        return row

    def ratios(row: dict, base: dict | None, suffix: str = "") -> None:
        for what in ("train", "prefill"):
            r = None if base is None else base[f"{what}_tok_s"]
            row[f"{what}_vs_attention{suffix}"] = row[f"{what}_tok_s"] / r if r and row[f"{what}_tok_s"] else None

    def show(row: dict, label: str, suffix: str = "") -> None:
        print(f"{label:17} {row['T']:6d} {row['params']:11,d} | {tok(row['train_tok_s'])} "
              f"{_ratio(row['train_vs_attention' + suffix])} {_mb(row['train_peak_bytes'])} | "
              f"{tok(row['prefill_tok_s']):>13} "
              f"{_ratio(row['prefill_vs_attention' + suffix])} | {row['status']}", flush=True)

    for T in a.T:
        for name in _names(a):
            opts = width_options(name, a.d_model, a.head_dim)
            torch.manual_seed(0)
            row = timed(name, build_model(layout=layout_item(name, opts), n_layers=a.n_layers, d_model=a.d_model),
                        T, name, opts)
            if name == "attention":
                ref[T] = row
            ratios(row, ref.get(T))
            rows.append(row)
            show(row, name)
            if a.same_params and name != "attention" and ref.get(T):
                # the Transformer with as many parameters: its MLP widened (or narrowed) to match
                base = ref[T]
                per_unit = 3 * a.d_model * a.n_layers  # SwiGLU parameters per unit of d_ff
                d_ff = build_model(n_layers=a.n_layers, d_model=a.d_model).config.d_ff
                d_ff = max(8, round((d_ff + (row["params"] - base["params"]) / per_unit) / 8) * 8)
                torch.manual_seed(0)
                twin = timed("attention", build_model(n_layers=a.n_layers, d_model=a.d_model, d_ff=d_ff), T,
                             f"attention(d_ff={d_ff})", {"d_ff": d_ff})
                row["same_params_attention"] = {k: twin[k] for k in ("params", "train_s", "train_peak_bytes",
                                                                     "prefill_s", "status")}
                row["same_params_attention"]["d_ff"] = d_ff
                ratios(row, twin, "_same_params")
                ratios(twin, twin)
                show(twin, f"  attn d_ff={d_ff}")
                print(f"{'  = same params':17} {T:6d} {'':11} | {'':12} {_ratio(row['train_vs_attention_same_params'])}"
                      f" {'':9} | {'':13} {_ratio(row['prefill_vs_attention_same_params'])} | {name} vs the row above",
                      flush=True)
    panels = [(f"training step (fwd+bwd+AdamW), B={a.batch}", _series(rows, "train_s")),
              (f"prefill (forward, no autograd), B={a.batch}", _series(rows, "prefill_s"))]
    return rows, panels, "T (tokens)", "seconds per call", "attention"


def _series(rows: list[dict], key: str, label: str = "mixer", x: str = "T") -> dict:
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r[label], []).append((r[x], r.get(key)))
    return out


# -- layers ------------------------------------------------------------------------------------------
def run_layers(ctx: Ctx):
    """Forward and forward+backward time and peak memory of one layer of every mixer vs SDPA,
    each beside its FLOP floor."""
    a = ctx.a
    peak = ctx.mm_peak()
    print(f"{'mixer':17} {'T':>6} | {'fwd ms':>10} {'floor':>10} | {'f+b ms':>10} {'floor':>10} | "
          f"{'fwd MB':>9} {'f+b MB':>9} | {'attn/this':>9} | status   (floor: FLOPs / mm peak; f+b floor 3x fwd)")
    rows, ref = [], {}
    for T in a.T:
        for name in _names(a):
            opts = width_options(name, a.d_model, a.head_dim)
            torch.manual_seed(0)
            layer = build_mixer(name, a.d_model, **opts).to(ctx.device, ctx.dtype)
            x = torch.randn(a.batch, T, a.d_model, device=ctx.device, dtype=ctx.dtype, requires_grad=True)
            w = torch.randn_like(x)

            def fwd():
                with torch.no_grad(), ctx.autocast():
                    layer(x)

            def fwd_bwd():
                layer.zero_grad(set_to_none=True)
                x.grad = None
                with ctx.autocast():
                    y, _ = layer(x)
                (y.float() * w).sum().backward()

            fl = layer_flops(layer, name, a.batch, T)
            row = dict(mixer=name, T=T, B=a.batch, d_model=a.d_model, options=opts, fwd_s=None, fwdbwd_s=None,
                       fwd_peak_bytes=None, fwdbwd_peak_bytes=None, proj_flops=fl["proj"], mix_flops=fl["mix"],
                       fwd_floor_s=fl["total"] / peak, fwdbwd_floor_s=3 * fl["total"] / peak, status="ok")
            for step, fn in (("fwd", fwd), ("fwdbwd", fwd_bwd)):
                if not _measure(ctx, name, T, fn, row, f"{step}_s"):
                    break
                row[f"{step}_peak_bytes"] = peak_memory(fn, ctx.device)
                why = ctx.budget.passed(name, T, nbytes=row[f"{step}_peak_bytes"])
                if why:
                    row["status"] = why
                    break
            if name == "attention":
                ref[T] = row["fwdbwd_s"]
            row["fwdbwd_vs_attention"] = ref[T] / row["fwdbwd_s"] if ref.get(T) and row["fwdbwd_s"] else None
            rows.append(row)
            print(f"{name:17} {T:6d} | {_ms(row['fwd_s'])} {_ms(row['fwd_floor_s'])} | {_ms(row['fwdbwd_s'])} "
                  f"{_ms(row['fwdbwd_floor_s'])} | {_mb(row['fwd_peak_bytes'])} {_mb(row['fwdbwd_peak_bytes'])} | "
                  f"{_ratio(row['fwdbwd_vs_attention']):>9} | {row['status']}", flush=True)
            del layer, x, w
    panels = [(f"one layer, forward (d_model {a.d_model}, B={a.batch})", _series(rows, "fwd_s")),
              ("one layer, forward + backward", _series(rows, "fwdbwd_s"))]
    return rows, panels, "T (tokens)", "seconds per call", "attention"


# -- the command -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = Parser(prog="rnnlab bench speed", description=__doc__.split("\n\n")[0])
    p.add_argument("mode", choices=MODES, help="what to measure (see below)")
    p.add_argument("--mixers", nargs="+", help="models/layers: the mixers (default: every registered one; "
                                               "attention always runs as the reference)")
    p.add_argument("--T", nargs="+", type=int_at_least(1), help="sequence lengths (default: models/efficiency 512..16384, "
                                                     "layers 512..32768, peers 512..4096)")
    p.add_argument("--contexts", nargs="+", type=int_at_least(1), help="decode: context lengths (default 1024..65536)")
    p.add_argument("--prompts", nargs="+", type=int_at_least(1), help="ragged: numbers of prompts (default 1 2 4 8 16 32)")
    p.add_argument("--layouts", nargs="+", help="decode, ragged: model layouts (default: gated_deltanet, mamba2, "
                                                "gated_deltanet*3,swa(window=1024,sinks=4), attention)")
    p.add_argument("--same-params", action="store_true", help="models: also time, beside each mixer's model, the "
                                                              "Transformer with as many parameters (its MLP widened)")
    p.add_argument("--recompute", action="store_true", help="models: every model (the Transformer too) keeps only "
                                                            "its blocks' inputs and runs each block again in the "
                                                            "backward (LM.recompute), as `rnnlab train --recompute`")
    p.add_argument("--backend", default="torch", choices=BACKENDS,
                   help="models, layers: the ops' backend (rnnlab.ops.registry.use_backend), as `rnnlab train "
                        "--ops-backend` runs them; the warm-up calls compile (default: torch)")
    p.add_argument("--families", nargs="+", help="efficiency: kernel cases (default: all)")
    p.add_argument("--peers", nargs="+", help="peers: which peers (default: all)")
    p.add_argument("--d-model", type=int_at_least(1), default=None, help="model / layer width (default 512; --quick 64)")
    p.add_argument("--n-layers", type=int_at_least(1), default=None, help="layers of a model (default 6; --quick 2)")
    p.add_argument("--head-dim", type=int_at_least(1), default=None, help="head dimension (default 64; --quick 32)")
    p.add_argument("--batch", type=int_at_least(1), default=1, help="batch size B")
    p.add_argument("--steps", type=int_at_least(1), default=None, help="decode: timed single-token steps (default 32)")
    p.add_argument("--compile", action="store_true", help="decode: also run each model with its one-token step "
                                                          "compiled (LM.compile_step), labelled +compile")
    p.add_argument("--prefill-chunk", type=int_at_least(1), default=None, help="decode: prefill chunk length (default 2048)")
    p.add_argument("--threads", type=int_at_least(1), help="torch threads (default: torch's)")
    p.add_argument("--repeats", type=int_at_least(1), default=None, help="timed calls after the warm-up; median (default 3)")
    p.add_argument("--warmup", type=int_at_least(1), default=None,
                   help="models, layers, efficiency, peers: untimed calls before the timed ones, the last of them "
                        "held to --budget-s (default 1, 2 with --backend compile, whose first call compiles; at "
                        "long T a large model's first 2-3 calls still fault in fresh memory pages)")
    p.add_argument("--budget-s", type=float, default=20.0, help="stop a mixer at the T where one call passes "
                                                                "this many seconds (default 20)")
    p.add_argument("--budget-gb", type=float, default=None, help="... or its measured peak memory (models, layers) or "
                                                                 "state (decode) passes this many GB (default: none)")
    p.add_argument("--dtype", default="float32", choices=["float32", "bfloat16"], help="parameter and activation dtype")
    p.add_argument("--autocast", default="none", choices=["none", "bf16"],
                   help="models, layers: run the forward under bfloat16 autocast, as `rnnlab train --autocast bf16` "
                        "does (parameters stay --dtype; the floor uses the bfloat16 mm peak)")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="smoke run: d_model 64, 2 layers, head dim 32, T 128 and "
                                                        "256, 1 repeat, small peak measurements")
    p.add_argument("--json", help="results file (default runs/bench/speed_<mode>.json)")
    p.add_argument("--png", help="plot file (default: the JSON path with .png)")
    return p


def _positive(p, name: str, values) -> None:
    for v in values if isinstance(values, list) else [values]:
        if v is not None and v < 1:
            p.error(f"{name} must be >= 1, got {v}")


def _resolve(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    q = a.quick
    a.d_model = a.d_model or (64 if q else 512)
    a.n_layers = a.n_layers or (2 if q else 6)
    a.head_dim = a.head_dim or (32 if q else 64)
    a.repeats = a.repeats or (1 if q else 3)
    a.warmup = a.warmup or (2 if a.backend == "compile" else 1)
    a.steps = a.steps or (4 if q else 32)
    a.prefill_chunk = a.prefill_chunk or (64 if q else 2048)
    a.T = a.T or ([128, 256] if q else _DEFAULT_T.get(a.mode, _DEFAULT_T["models"]))
    a.contexts = a.contexts or ([128, 256] if q else _POW2(10, 16))
    for name in ("d_model", "n_layers", "head_dim", "batch", "repeats", "steps", "prefill_chunk", "threads",
                 "T", "contexts"):
        _positive(p, "--" + name.replace("_", "-"), getattr(a, name))
    if a.autocast != "none" and a.mode not in ("models", "layers"):
        p.error(f"--autocast applies to the models and layers modes, not {a.mode}")
    if a.backend != "torch" and a.mode not in ("models", "layers"):
        p.error(f"--backend applies to the models and layers modes, not {a.mode}")
    for flag, on in (("--recompute", a.recompute), ("--same-params", a.same_params)):
        if on and a.mode != "models":
            p.error(f"{flag} applies to the models mode, not {a.mode}")
    if a.d_model % a.head_dim:
        p.error(f"--d-model {a.d_model} is not a multiple of --head-dim {a.head_dim}")
    if a.mixers:
        unknown = sorted(set(a.mixers) - set(mixers()))
        if unknown:
            p.error(f"--mixers: unknown mixer(s) {unknown}; known: {', '.join(mixers())}")
    for flag, v in (("--budget-s", a.budget_s), ("--budget-gb", a.budget_gb)):
        if v is not None and v <= 0:
            p.error(f"{flag} must be > 0, got {v}")
    from .speed_kernels import CASES
    from .speed_peers import PEERS
    for flag, given, known in (("--families", a.families, CASES), ("--peers", a.peers, PEERS)):
        unknown = sorted(set(given or ()) - set(known))
        if unknown:
            p.error(f"{flag}: unknown {unknown}; choose from {', '.join(known)}")
    for layout in a.layouts or ():
        from ..models.layout import parse_layout
        try:
            parse_layout(layout, a.n_layers, a.d_model)
        except (ValueError, TypeError, KeyError) as e:
            p.error(f"--layouts: {layout!r}: {e}")


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    _resolve(p, a)
    if a.threads:
        torch.set_num_threads(a.threads)
    device = parse_device(a.device)
    dtype = getattr(torch, a.dtype)
    load, others = load_average(), others_running()
    ctx = Ctx(a, device, dtype, Budget(a.budget_s, a.budget_gb),
              extra=dict(mode=a.mode, device=str(device), dtype=a.dtype, autocast=a.autocast, backend=a.backend,
                         load_avg=load, others_running=others, torch=torch.__version__))
    print(f"rnnlab bench speed {a.mode}: torch {torch.__version__}, {device}, {a.dtype}"
          f"{', bfloat16 autocast' if a.autocast == 'bf16' else ''}"
          f"{', ops on the ' + repr(a.backend) + ' backend' if a.backend != 'torch' else ''}, "
          f"{torch.get_num_threads()} threads, other runnable processes {others if others is None else round(others, 2)}, "
          f"1-minute load average {load if load is None else round(load, 2)}")
    busy = others > LOAD_WARN if others is not None else load is not None and load > LOAD_WARN
    if busy:
        what = (f"{others:.2f} other processes were runnable on average" if others is not None
                else f"the 1-minute load average is {load:.2f}")
        print(f"WARNING: {what} (> {LOAD_WARN}): they share the cores, so these timings are not meaningful; "
              "run again on a quiet machine")
    if a.mode in ("models", "layers"):
        with use_backend(a.backend):
            out = (run_models if a.mode == "models" else run_layers)(ctx)
    elif a.mode == "decode":
        from .speed_decode import run_decode
        out = run_decode(ctx)
    elif a.mode == "efficiency":
        from .speed_kernels import run_efficiency
        out = run_efficiency(ctx)
    elif a.mode == "ragged":
        from .speed_ragged import run_ragged
        out = run_ragged(ctx)
    else:
        from .speed_peers import run_peers
        out = run_peers(ctx)
    rows, panels, xlabel, ylabel, reference = out
    json_path = a.json or f"runs/bench/speed_{a.mode}.json"
    png_path = a.png or str(Path(json_path).with_suffix(".png"))
    ctx.extra.update(json=json_path, png=png_path)
    _write_json(json_path, {"bench": "speed", "threads": torch.get_num_threads(), **ctx.extra, "results": rows})
    precision = a.dtype + (" + bf16 autocast" if a.autocast == "bf16" else "")
    loglog(png_path, panels, xlabel, ylabel, f"rnnlab bench speed {a.mode} ({device}, {precision})", reference)
    report("speed", rows, None, **ctx.extra)
    return rows


def _write_json(path: str, payload: dict) -> None:
    from ..models.lm import atomic_write
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(payload, indent=2, default=str)))


if __name__ == "__main__":
    main()
