"""``rnnlab bench speed peers``: rnnlab beside other implementations that run on this machine.

Every peer is first checked against rnnlab on the same weights or inputs (max abs difference of
the outputs at a short length; outputs that differ by more than a tolerance are reported and not
timed), then both are timed at each ``--T``: forward without autograd and forward + backward.

* ``transformers:mamba``, ``transformers:mamba2``: ``transformers``' Mamba / Mamba-2 language
  models (their pure-torch paths; their CUDA kernels are not installed here) of ``--n-layers`` x
  ``--d-model``, randomly initialised, saved and loaded into rnnlab with :func:`rnnlab.from_hf`
  (as ``rnnlab bench hf`` does); logits compared, cross-entropy backward timed;
* ``fla:gated_delta_rule``, ``fla:simple_gla``, ``fla:gla``: flash-linear-attention's pure-torch
  ``naive`` references (chunked for the first two, a loop for GLA) against rnnlab's chunked
  kernels on the op registry's inputs (H = d_model / head_dim heads of head_dim);
* ``mamba_ssm:selective_scan``: mamba-ssm's ``selective_scan_ref`` against rnnlab's selective scan.

A peer that cannot be imported (fla and mamba-ssm are not installed here, and need Triton / CUDA)
is a row saying so; it never stops the run.
"""
from __future__ import annotations

import importlib
import tempfile

import torch
import torch.nn.functional as F

from .measure import timeit
from ..ops import registry

__all__ = ["run_peers", "PEERS"]


class Missing(Exception):
    """A peer that cannot run here; the message says why."""


def _import(module: str, install: str):
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as e:
        if e.name and (module == e.name or module.startswith(e.name + ".")):
            raise Missing(f"{e.name} is not installed ({install})") from None
        raise Missing(f"import {module} failed: {type(e).__name__}: {e}") from None
    except Exception as e:  # noqa: BLE001 -- e.g. fla without triton, mamba_ssm without its CUDA extension
        raise Missing(f"import {module} failed: {type(e).__name__}: {str(e).splitlines()[0][:160]}") from None


# -- model peers (transformers) ---------------------------------------------------------------------------
def _hf_pair(arch: str, ctx):
    """(rnnlab model, transformers model) with the same weights, both on the run's device/dtype."""
    transformers = _import("transformers", "pip install transformers")
    from .hf import _CLASSES, _SIZES
    from ..models.hf import from_hf
    a = ctx.a
    torch.manual_seed(0)
    hf = getattr(transformers, _CLASSES[arch])(_SIZES[arch](transformers, a.d_model, a.n_layers))
    log = transformers.utils.logging
    bar = log.is_progress_bar_enabled()
    log.disable_progress_bar()  # no "Writing model shards" bar per model
    try:
        with tempfile.TemporaryDirectory() as d:
            hf.save_pretrained(d)
            ours = from_hf(d)
    finally:
        if bar:
            log.enable_progress_bar()
    return ours.to(ctx.device, ctx.dtype), hf.to(ctx.device, ctx.dtype)


def _model_calls(model, is_hf: bool, tokens):
    x, y = tokens[:, :-1], tokens[:, 1:]

    def logits():
        return model(x, use_cache=False).logits if is_hf else model(x)[0]

    def fwd():
        with torch.no_grad():
            logits()

    def fwd_bwd():
        model.zero_grad(set_to_none=True)
        F.cross_entropy(logits().float().flatten(0, 1), y.flatten()).backward()

    return logits, fwd, fwd_bwd


def _model_peer(arch: str):
    def prepare(ctx):
        ours, hf = _hf_pair(arch, ctx)  # once per run; then per T only the tokens change

        def make(T: int):
            tokens = torch.randint(0, ours.config.vocab_size, (ctx.a.batch, T + 1), device=ctx.device)
            return _model_calls(ours, False, tokens), _model_calls(hf, True, tokens)
        return make
    return prepare


# -- kernel peers (fla naive references, mamba_ssm's reference scan) --------------------------------------
def _kernel_peer(family: str, module: str, install: str, call):
    """``call(mod, inputs) -> output`` runs the peer on rnnlab's inputs of ``family``."""
    def prepare(ctx):
        mod = _import(module, install)
        return lambda T: _kernel_calls(ctx, family, T, lambda inp: call(mod, inp))
    return prepare


def _kernel_calls(ctx, family: str, T: int, peer):
    """(rnnlab's calls, the peer's calls) on the registry's inputs of ``family`` at length T."""
    a = ctx.a
    fam = registry.get_family(family)
    x = fam.inputs(a.batch, T, a.d_model // a.head_dim, a.head_dim, dtype=ctx.dtype)
    if family == "selective_scan":  # the reference scan starts from zeros
        x["initial_state"] = None
    x = {n: v.to(ctx.device) if isinstance(v, torch.Tensor) else v for n, v in x.items()}
    ours_fn = fam.form("chunked")

    def calls(fn):
        def out():
            return fn(x)

        def fwd():
            with torch.no_grad():
                fn(x)

        def fwd_bwd():
            leaves, _ = registry.with_grad(fam, x)
            fn(leaves).float().sum().backward()
        return out, fwd, fwd_bwd
    return calls(lambda inp: ours_fn(**inp)[0]), calls(peer)


def _fla_delta(mod, x):
    return mod.naive_chunk_gated_delta_rule(q=x["q"], k=x["k"], v=x["v"], g=x["log_g"], beta=x["beta"],
                                            chunk_size=64, initial_state=x["initial_state"],
                                            output_final_state=True)[0]


def _fla_simple_gla(mod, x):
    return mod.naive_chunk_simple_gla(q=x["q"], k=x["k"], v=x["v"], g=x["log_g"], initial_state=x["initial_state"],
                                      output_final_state=True, chunk_size=64)[0]


def _fla_gla(mod, x):
    return mod.naive_recurrent_gla(q=x["q"], k=x["k"], v=x["v"], gk=x["log_g"], initial_state=x["initial_state"],
                                   output_final_state=True)[0]


def _mamba_ref(mod, x):
    t = lambda z: z.transpose(1, 2)  # noqa: E731  (B, T, ...) -> (B, ..., T)
    y = mod.selective_scan_ref(t(x["u"]), t(x["dt"]), x["A"], t(x["B"]), t(x["C"]), D=x["D"], z=t(x["z"]),
                               delta_softplus=False)
    return t(y)


_FLA = "pip install flash-linear-attention (with triton) in a separate environment"
PEERS = {
    "transformers:mamba": ("model", _model_peer("mamba")),
    "transformers:mamba2": ("model", _model_peer("mamba2")),
    "fla:gated_delta_rule": ("kernel", _kernel_peer("delta", "fla.ops.gated_delta_rule.naive", _FLA, _fla_delta)),
    "fla:simple_gla": ("kernel", _kernel_peer("ssd", "fla.ops.simple_gla.naive", _FLA, _fla_simple_gla)),
    "fla:gla": ("kernel", _kernel_peer("gla", "fla.ops.gla.naive", _FLA, _fla_gla)),
    "mamba_ssm:selective_scan": ("kernel", _kernel_peer("selective_scan", "mamba_ssm.ops.selective_scan_interface",
                                                        "pip install mamba-ssm; needs CUDA", _mamba_ref)),
}


def _tolerance(dtype: torch.dtype) -> float:
    return 2e-2 if dtype == torch.bfloat16 else 1e-3


def run_peers(ctx):
    """Rows (peer, T): agreement, and forward / forward+backward times of rnnlab and the peer."""
    a = ctx.a
    names = a.peers or list(PEERS)
    unknown = sorted(set(names) - set(PEERS))
    if unknown:
        raise ValueError(f"--peers: unknown peer(s) {unknown}; choose from {list(PEERS)}")
    print(f"{'peer':25} {'level':6} {'T':>6} | {'rnnlab fwd':>10} {'peer fwd':>10} | {'rnnlab f+b':>10} "
          f"{'peer f+b':>10} | {'peer/rnnlab':>11} | {'max|diff|':>9} | status   (ms; ratio on fwd+bwd)")
    rows = []
    for name in names:
        level, prepare = PEERS[name]
        check_T = min(a.T + [256])
        try:  # does the peer run here, and does it agree?
            make = prepare(ctx)
            (mine, _, _), (theirs, _, _) = make(check_T)
            with torch.no_grad():
                ref, other = mine().float(), theirs().float()
            diff = (ref - other).abs().max().item()
            scale = ref.abs().max().item() or 1.0
            status = "ok" if diff <= _tolerance(ctx.dtype) * scale else \
                f"outputs differ (max |diff| {diff:.3g} vs max |out| {scale:.3g}): not timed"
        except Missing as e:
            diff, status = None, f"missing: {e}"
        except Exception as e:  # noqa: BLE001 -- a peer failing is reported, never fatal
            diff, status = None, f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
        if status != "ok":
            rows.append(dict(peer=name, level=level, T=None, max_abs_diff=diff, status=status))
            _print(rows[-1])
            continue
        for T in a.T:
            row = dict(peer=name, level=level, T=T, max_abs_diff=diff, check_T=check_T, status="ok")
            rows.append(row)
            try:
                _time_pair(ctx, name, T, make(T), row)
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory at a large T: reported, the run goes on
                row["status"] = f"failed: {type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            mine_t, theirs_t = row.get("rnnlab_fwdbwd_s"), row.get("peer_fwdbwd_s")
            row["peer_vs_rnnlab"] = theirs_t / mine_t if mine_t and theirs_t else None
            _print(row)
    series: dict[str, dict] = {"forward (no autograd)": {}, "forward + backward": {}}
    for r in rows:
        if r["T"] is None:
            continue
        for panel, step in (("forward (no autograd)", "fwd"), ("forward + backward", "fwdbwd")):
            for side, label in (("rnnlab", f"rnnlab vs {r['peer']}"), ("peer", r["peer"])):
                series[panel].setdefault(label, []).append((r["T"], r.get(f"{side}_{step}_s")))
    return rows, list(series.items()), "T (tokens)", "seconds per call", None


def _time_pair(ctx, name: str, T: int, calls, row: dict) -> None:
    """Time rnnlab's and the peer's forward and forward+backward at T into ``row``, under the budget."""
    (_, my_fwd, my_fb), (_, their_fwd, their_fb) = calls
    for side, fwd, fb in (("rnnlab", my_fwd, my_fb), ("peer", their_fwd, their_fb)):
        key = (name, side)
        if ctx.budget.stopped(key):
            row["status"] = ctx.budget.stopped(key)
            continue
        for step, fn in (("fwd", fwd), ("fwdbwd", fb)):
            t = timeit(fn, ctx.device, ctx.a.repeats, ctx.budget.seconds, ctx.a.warmup)
            row[f"{side}_{step}_s"] = t.seconds
            why = ctx.budget.passed(key, T, seconds=t.seconds)
            if why:
                row["status"] = f"{side}: {why}"
                break


def _print(r: dict) -> None:
    def ms(key):
        v = r.get(key)
        return f"{v * 1e3:10.1f}" if v is not None else f"{'-':>10}"
    ratio = f"{r['peer_vs_rnnlab']:10.2f}x" if r.get("peer_vs_rnnlab") else f"{'-':>11}"
    diff = f"{r['max_abs_diff']:9.2e}" if r.get("max_abs_diff") is not None else f"{'-':>9}"
    T = f"{r['T']:6d}" if r["T"] is not None else f"{'-':>6}"
    print(f"{r['peer']:25} {r['level']:6} {T} | {ms('rnnlab_fwd_s')} {ms('peer_fwd_s')} | {ms('rnnlab_fwdbwd_s')} "
          f"{ms('peer_fwdbwd_s')} | {ratio} | {diff} | {r['status']}", flush=True)
