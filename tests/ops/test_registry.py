"""Every op family in the registry: fast forms (on every backend that runs here) and step forms equal
the reference loop in float64 with random inputs and random initial states — outputs, final
states and the gradients of every differentiable input, initial state included; dispatchers keep
the input dtype; the tuning table moves the choice of form; missing backends are reported."""
import sys
import types

import pytest
import torch

import rnnlab
from rnnlab.ops import backends, registry, tuning

# Small chunks so that T = 37 spans several chunks, blocks and time-chunks in every family.
SMALL = {"delta.chunk_size": 8, "gla.chunk_size": 16, "gla.sub_chunk": 8, "mlstm.chunk_size": 8,
         "scan.chunk_size": 8, "matrix_scan.chunk_size": 8, "selective_scan.time_chunk": 16,
         "longhorn.time_chunk": 16, "gsa.chunk_size": 4, "gsa.block_size": 16, "lti.conv_chunk": 16,
         "lti.scan_time_chunk": 16}
# torch.compile takes 20-45 s per family on these machines (cold cache), so the suite compiles one
# family: ssd (Mamba-2's case), against the reference and the torch form. delta and mlstm have a
# "compile" backend too.
COMPILE_TESTED = "ssd"
F64 = torch.float64


@pytest.fixture
def small_chunks():
    with tuning.override(cpu=SMALL):
        yield


def _fast_cases():
    for name in registry.families():
        fam = registry.get_family(name)
        x = fam.inputs(T=4, dtype=F64)
        for form in fam.fast:
            for backend, reason in registry.backend_status(name, form, **x).items():
                if reason is None and (backend != "compile" or name == COMPILE_TESTED):
                    yield pytest.param(name, form, backend, id=f"{name}-{form}-{backend}")


def _names(fam, inputs):
    """Names of the differentiable leaves, in the order registry.with_grad returns them."""
    return [f"{n}[{i}]" for n, a in inputs.items() if n in fam.differentiable
            for i, _ in enumerate(registry.tensors(a))]


def _dot(out, cot):
    return (out * cot).real.sum() if out.is_complex() else (out * cot).sum()


def _run(fam, fn, inputs):
    """fn(**inputs) with fresh leaves: (output tensors, gradients of a fixed random projection)."""
    x, leaves = registry.with_grad(fam, inputs)
    out, state = fn(**x)
    outs = [out, *([] if state is None else registry.tensors(state))]
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in outs]
    grads = []
    if leaves:
        grads = torch.autograd.grad(sum(_dot(o, c) for o, c in zip(outs, cots)), leaves, allow_unused=True)
        grads = [torch.zeros_like(a) if gr is None else gr for a, gr in zip(leaves, grads)]
    return outs, grads


def _assert_same(fam, inputs, got, want, **tol):
    (o1, g1), (o2, g2) = got, want
    assert len(o1) == len(o2), f"{fam.name}: {len(o1)} output tensors vs {len(o2)} from the reference"
    for i, (a, b) in enumerate(zip(o1, o2)):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{fam.name}: output {i} (0: o, then the state): {m}")
    for name, a, b in zip(_names(fam, inputs), g1, g2):
        torch.testing.assert_close(a, b, **tol, msg=lambda m: f"{fam.name}: gradient of {name}: {m}")


@pytest.mark.parametrize("name,form,backend", list(_fast_cases()))
def test_fast_form_equals_reference(name, form, backend, small_chunks):
    fam = registry.get_family(name)
    x = fam.inputs(B=2, T=37, H=2, K=4, V=3, dtype=F64)
    if fam.differentiable:
        assert "initial_state" in fam.differentiable or name == "matrix_scan"
    got = _run(fam, registry.implementation(name, form, backend), x)
    _assert_same(fam, x, got, _run(fam, fam.reference, x))
    if backend != "torch":  # the same as the torch form, and chosen by the dispatchers when preferred
        _assert_same(fam, x, got, _run(fam, fam.form(form), x), atol=1e-12, rtol=1e-12)
        with registry.use_backend(backend):
            assert registry.select(name, **x) == (form, backend)
        assert registry.select(name, **x) == (form, "torch")  # the preference is restored


@pytest.mark.parametrize("name", [n for n in registry.families() if registry.get_family(n).step is not None])
def test_step_form_equals_reference(name):
    fam = registry.get_family(name)
    x = fam.inputs(B=2, T=1, H=2, K=4, V=3, dtype=F64, seed=3)
    _assert_same(fam, x, _run(fam, fam.step, x), _run(fam, fam.reference, x))


def _rel(a, b):
    a, b = a.to(b.dtype), b
    return ((a - b).abs().norm() / b.abs().norm().clamp_min(1e-30)).item()


@pytest.mark.parametrize("name", [n for n in registry.families() if registry.get_family(n).dispatch is not None])
def test_dispatcher_keeps_the_input_dtype(name, small_chunks):
    """float32 in -> float32 out; bfloat16 in -> bfloat16 out, accumulated in float32 inside: the
    state is float32 and as close to the float64 reference (same rounded inputs) as float32 allows."""
    fam = registry.get_family(name)
    x32 = fam.inputs(B=2, T=40, H=2, K=4, V=3, dtype=torch.float32)
    out, _ = fam.dispatch(**x32)
    assert out.dtype == (torch.complex64 if out.is_complex() else torch.float32)
    xb = fam.inputs(B=2, T=40, H=2, K=4, V=3, dtype=torch.bfloat16)
    out, state = fam.dispatch(**xb)
    ref_out, ref_state = fam.reference(**registry.cast(xb, F64))  # the same (rounded) values
    assert out.dtype == (torch.complex64 if out.is_complex() else torch.bfloat16), f"{name}: output {out.dtype}"
    assert _rel(out, ref_out) < 5e-3, f"{name}: bfloat16 output off by {_rel(out, ref_out):.1e}"
    for s, r in zip(registry.tensors(state), registry.tensors(ref_state)):
        assert s.dtype in (torch.float32, torch.complex64), f"{name}: state in {s.dtype}, not accumulated in float32"
        assert _rel(s, r) < 1e-5, f"{name}: final state off by {_rel(s, r):.1e}"


def test_families_and_bad_names():
    assert {"delta", "gla", "ssd", "scan", "lssl", "s4d", "newton"} <= set(registry.families())
    with pytest.raises(ValueError, match="unknown op family 'nope'"):
        registry.get_family("nope")
    with pytest.raises(ValueError, match="no form 'conv'"):
        registry.get_family("delta").form("conv")
    with pytest.raises(ValueError, match="unknown backend 'cuda'"):
        registry.use_backend("cuda")


def test_tuning_overrides_change_the_form_chosen():
    scan_x = registry.get_family("scan").inputs(B=1, T=8, H=4, K=512)  # 2048 lanes
    assert registry.select("scan", **scan_x) == ("loop", "torch")
    with tuning.override(cpu={"scan.loop_min_lanes": 4096}):
        assert tuning.get("scan.loop_min_lanes", "cpu") == 4096
        assert registry.select("scan", **scan_x) == ("chunked", "torch")
        h, _ = rnnlab.ops.linear_scan(**scan_x)  # the dispatcher follows
        torch.testing.assert_close(h, rnnlab.ops.linear_scan_recurrent(**scan_x)[0])
    assert registry.select("scan", **scan_x) == ("loop", "torch")  # restored on leaving the block
    s4d_x = registry.get_family("s4d").inputs(B=1, T=8)
    assert registry.select("s4d", **s4d_x)[0] == "scan"
    with tuning.override(cpu={"lti.scan_max_batch": 0}):
        assert registry.select("s4d", **s4d_x)[0] == "conv"
    ms_x = registry.get_family("matrix_scan").inputs(B=2, T=8, H=2, K=64)  # 2·2·8·8 = 256 entries per step
    assert registry.select("matrix_scan", **ms_x)[0] == "loop"
    with tuning.override(cpu={"matrix_scan.loop_min_entries": None}):
        assert registry.select("matrix_scan", **ms_x)[0] == "chunked"


def test_tuning_overrides_are_per_device_and_checked():
    with tuning.override(cuda={"scan.loop_min_lanes": 8}):
        assert tuning.get("scan.loop_min_lanes", torch.device("cuda", 0)) == 8
        assert tuning.get("scan.loop_min_lanes", "cpu") == 1024
    assert tuning.get("scan.loop_min_lanes", "cuda") is None
    plain = tuning.override(default={"delta.chunk_size": 16})  # a plain call stays in force
    assert tuning.get("delta.chunk_size", "cpu") == 16 and tuning.get("delta.chunk_size", "mps") == 16
    plain.__exit__(None, None, None)
    assert tuning.get("delta.chunk_size", "cpu") == 64
    with pytest.raises(ValueError, match="unknown tuning key 'scan.min_lanes'"):
        tuning.override(cpu={"scan.min_lanes": 4})
    with pytest.raises(ValueError, match="'delta.chunk_size'.*an int >= 1, got 0"):
        tuning.override(cpu={"delta.chunk_size": 0})
    with pytest.raises(ValueError, match="'gsa.block_size'.*an int >= 1, got None"):
        tuning.override(cpu={"gsa.block_size": None})
    with pytest.raises(ValueError, match="'lti.scan_max_batch'.*an int >= 0, got -1"):
        tuning.override(cpu={"lti.scan_max_batch": -1})
    with pytest.raises(ValueError, match="unknown tuning key"):
        tuning.get("nope")
    assert tuning.get("delta.chunk_size", "cpu") == 64  # a refused override changes nothing


def test_missing_backends_are_reported_not_fatal(monkeypatch):
    monkeypatch.setattr(registry, "_reported", set())
    x = registry.get_family("delta").inputs(T=5)
    status = registry.backend_status("delta", "chunked", **x)
    assert status["torch"] is None and "CUDA" in status["fla"]
    scan_status = registry.backend_status("scan", "chunked", **registry.get_family("scan").inputs())
    assert "no 'compile' backend" in scan_status["compile"]
    vector = dict(x, log_g=registry.get_family("gla").inputs(T=5)["log_g"])  # the delta rule with a vector decay
    assert "10 minutes" in registry.backend_status("delta", "chunked", **vector)["compile"]
    with registry.use_backend("fla"):
        with pytest.warns(RuntimeWarning, match="'fla' is unavailable for 'delta'.*CUDA"):
            assert registry.select("delta", **x) == ("chunked", "torch")
        o, S = rnnlab.ops.gated_delta_rule(**x)  # runs on torch, reported once only
        torch.testing.assert_close(o, rnnlab.ops.gated_delta_rule_recurrent(**x)[0], atol=1e-5, rtol=1e-5)
        one = registry.get_family("delta").inputs(T=1)
        assert registry.select("delta", **one) == ("step", "torch")  # fla has no step: torch, quietly


def _fake_fla(monkeypatch):
    """A stand-in ``fla`` package with fla's documented signatures, computed by our reference loop."""
    ref = rnnlab.ops.gated_delta_rule_recurrent

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False):
        return ref(q, k, v, g, beta, scale, initial_state)

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False):
        return ref(q, k, v, g, None, scale, initial_state)

    def chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False):
        return ref(q, k, v, g, None, scale, initial_state)

    for mod, fn in (("gated_delta_rule", chunk_gated_delta_rule), ("gla", chunk_gla), ("simple_gla", chunk_simple_gla)):
        m = types.ModuleType(f"fla.ops.{mod}")
        setattr(m, fn.__name__, fn)
        monkeypatch.setitem(sys.modules, f"fla.ops.{mod}", m)
    monkeypatch.setitem(sys.modules, "fla", types.ModuleType("fla"))
    monkeypatch.setitem(sys.modules, "fla.ops", types.ModuleType("fla.ops"))


@pytest.mark.parametrize("name", ["delta", "gla", "ssd"])
def test_fla_adapters_map_arguments_onto_fla_signatures(name, monkeypatch):
    """The fla kernels cannot run here; a stand-in with fla's signatures checks the argument mapping."""
    _fake_fla(monkeypatch)
    fam = registry.get_family(name)
    x = fam.inputs(T=9, V=3)
    o, S = fam.backends["fla"].forms["chunked"](**x)
    o_ref, S_ref = fam.reference(**x)
    torch.testing.assert_close(o, o_ref)
    assert S.dtype == torch.float32
    torch.testing.assert_close(S, S_ref.float())
    assert "CUDA" in backends.fla_check(x)  # CPU tensors: fla is never selected here
