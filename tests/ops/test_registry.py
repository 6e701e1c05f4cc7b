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
from rnnlab.ops.registry import Backend

# Small chunks so that T = 37 spans several chunks, blocks and time-chunks in every family.
SMALL = {"delta.chunk_size": 8, "gla.chunk_size": 16, "gla.sub_chunk": 8, "dplr.chunk_size": 16, "dplr.sub_chunk": 8, "mlstm.chunk_size": 8,
         "scan.chunk_size": 8, "matrix_scan.chunk_size": 8, "selective_scan.time_chunk": 16,
         "selective_scan.compile_chunk": 8, "longhorn.compile_chunk": 8, "lti.compile_chunk": 8,
         "longhorn.time_chunk": 16, "gsa.chunk_size": 4, "gsa.block_size": 16, "lti.conv_chunk": 16,
         "lti.scan_time_chunk": 16}
# torch.compile takes 20-45 s per family on these machines (cold cache), so the suite compiles four
# families: ssd (Mamba-2's case), selective_scan (Mamba-1's), longhorn and s4d (unrolled chunks like
# Mamba-1's), against the reference and the torch form. delta and mlstm have a "compile" backend too.
COMPILE_TESTED = ("ssd", "selective_scan", "longhorn", "s4d")
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
                if reason is None and (backend != "compile" or name in COMPILE_TESTED):
                    yield pytest.param(name, form, backend, id=f"{name}-{form}-{backend}")


def _floating(ts):
    """The floating (and complex) tensors among ts: integer ones (positions) have no gradient."""
    return [t for t in ts if t.is_floating_point() or t.is_complex()]


def _names(fam, inputs):
    """Names of the differentiable leaves, in the order registry.with_grad returns them."""
    return [f"{n}[{i}]" for n, a in inputs.items() if n in fam.differentiable
            for i, _ in enumerate(_floating(registry.tensors(a)))]


def _dot(out, cot):
    return (out * cot).real.sum() if out.is_complex() else (out * cot).sum()


def _run(fam, fn, inputs):
    """fn(**inputs) with fresh leaves: (output tensors, gradients of a fixed random projection)."""
    x, leaves = registry.with_grad(fam, inputs)
    out, state = fn(**x)
    outs = [out, *([] if state is None else registry.tensors(state))]
    g = torch.Generator().manual_seed(1)
    cots = [torch.randn(o.shape, generator=g, dtype=o.dtype) for o in _floating(outs)]
    grads = []
    if leaves:
        grads = torch.autograd.grad(sum(_dot(o, c) for o, c in zip(_floating(outs), cots)), leaves,
                                    allow_unused=True)
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
        sel = fam.inputs(B=1, T=37, H=2, K=4, V=3, dtype=F64) if name == "s4d" else x  # s4d: scan for one row
        with registry.use_backend(backend):
            assert registry.select(name, **sel) == (form, backend)
        assert registry.select(name, **sel) == (form, "torch")  # the preference is restored


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
    for s, r in zip(_floating(registry.tensors(state)), _floating(registry.tensors(ref_state))):
        assert s.dtype in (torch.float32, torch.complex64), f"{name}: state in {s.dtype}, not accumulated in float32"
        assert _rel(s, r) < 1e-5, f"{name}: final state off by {_rel(s, r):.1e}"


@pytest.mark.parametrize("name", [n for n in registry.families() if registry.get_family(n).dispatch is not None])
def test_dispatcher_ignores_autocast(name, small_chunks):
    """Under bfloat16 autocast a dispatcher computes exactly as without it (ops keep their own
    precision): float32 inputs give the same float32 output and state, bit for bit."""
    fam = registry.get_family(name)
    x = fam.inputs(B=2, T=40, H=2, K=4, V=3, dtype=torch.float32)
    want, want_state = fam.dispatch(**x)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, got_state = fam.dispatch(**x)
    assert got.dtype == want.dtype and torch.equal(got, want), f"{name}: autocast changed the output"
    for g, w in zip(registry.tensors(got_state), registry.tensors(want_state)):
        assert g.dtype == w.dtype and torch.equal(g, w), f"{name}: autocast changed the state"


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
    packed = registry.get_family("selective_scan").packed_inputs([3, 5], H=1, K=2, V=2)  # unrolled chunks: no resets
    assert "cu_seqlens" in registry.backend_status("selective_scan", "chunked", **packed)["compile"]
    with registry.use_backend("compile"), pytest.warns(RuntimeWarning, match="'compile' is unavailable"):
        assert registry.select("selective_scan", **packed) == ("chunked", "torch")
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

    def chunk_gated_delta_rule(q, k, v, g, beta, scale=None, initial_state=None, output_final_state=False,
                               cu_seqlens=None):
        return ref(q, k, v, g, beta, scale, initial_state, cu_seqlens)

    def chunk_gla(q, k, v, g, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        return ref(q, k, v, g, None, scale, initial_state, cu_seqlens)

    def chunk_simple_gla(q, k, v, g=None, scale=None, initial_state=None, output_final_state=False, cu_seqlens=None):
        return ref(q, k, v, g, None, scale, initial_state, cu_seqlens)

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


# -- sequence boundaries (cu_seqlens): packed equals separate ----------------------------------------
# With SMALL chunks (8 or 16 tokens): shorter than a chunk, exactly one chunk (8; 16), several chunks and
# not aligned (37), length 1, an empty sequence, and boundaries that fall inside chunks.
LENGTHS = [3, 16, 1, 37, 8, 0, 5]
NAN_SEQ, NAN_AT = 3, 21  # a NaN at token 21 of the sequence of 37 tokens: inside a chunk of every family


def _packed_cases():
    for name in registry.families():
        fam = registry.get_family(name)
        if fam.packed:
            for form in ("reference", *fam.packed, *(["dispatch"] if fam.dispatch is not None else [])):
                yield pytest.param(name, form, id=f"{name}-{form}")


def _packed_fn(fam, form):
    if form == "dispatch":
        return fam.dispatch
    if "@" in form:  # a form on another backend: "chunked@compile"
        form, backend = form.split("@")
        return registry.implementation(fam.name, form, backend)
    return fam.form(form)


def _alone(fam, x):
    """Each sequence of the packed inputs x run alone through the reference: (outputs concatenated
    along time, final states concatenated along rows); differentiable through x."""
    outs, finals = [], []
    for xs in registry.unpack_inputs(x):
        if registry.tensors(xs)[0].shape[1] == 0:  # an empty sequence keeps its initial state
            finals.append(registry.tensors(xs["initial_state"]))
            continue
        o, st = fam.reference(**xs)
        outs.append(o)
        finals.append(registry.tensors(st))
    return torch.cat(outs, dim=1), [torch.cat(parts, dim=0) for parts in zip(*finals)]


def test_families_taking_cu_seqlens():
    assert {"delta", "gla", "ssd", "scan", "mlstm", "selective_scan", "longhorn", "gsa", "memory", "lssl", "s4d",
            "newton"} <= {n for n in registry.families() if registry.get_family(n).packed}


def _packed_backend_cases():  # the compiled backend, on the families the suite compiles (compiling is slow)
    for name in COMPILE_TESTED:
        fam = registry.get_family(name)
        x = fam.packed_inputs(LENGTHS, H=2, K=4, V=3, dtype=F64, seed=5)
        for form in fam.packed:
            if registry.backend_status(name, form, **x).get("compile", "none") is None:
                yield pytest.param(name, f"{form}@compile", id=f"{name}-{form}-compile")


@pytest.mark.parametrize("name,form", list(_packed_cases()) + list(_packed_backend_cases()))
def test_packed_equals_each_sequence_alone(name, form, small_chunks):
    """Outputs, final states (N rows) and the gradients of every input, initial states included."""
    fam = registry.get_family(name)
    x = fam.packed_inputs(LENGTHS, H=2, K=4, V=3, dtype=F64, seed=5)
    xg, leaves = registry.with_grad(fam, x)
    out, state = _packed_fn(fam, form)(**xg)
    want_out, want_state = _alone(fam, xg)
    got = [out, *registry.tensors(state)]
    want = [want_out, *want_state]
    assert [t.shape for t in got] == [t.shape for t in want]
    assert registry.tensors(state)[0].shape[0] == len(LENGTHS), "one final state per sequence"
    g = torch.Generator().manual_seed(2)
    cots = [torch.randn(t.shape, generator=g, dtype=t.dtype) for t in _floating(got)]
    grads = torch.autograd.grad(sum(_dot(o, c) for o, c in zip(_floating(got), cots)), leaves)
    want_grads = torch.autograd.grad(sum(_dot(o, c) for o, c in zip(_floating(want), cots)), leaves)
    for i, (a, b) in enumerate(zip(got, want)):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}/{form}: output {i} (0: o, then the state): {m}")
    for n, a, b in zip(_names(fam, x), grads, want_grads):
        torch.testing.assert_close(a, b, msg=lambda m: f"{name}/{form}: gradient of {n}: {m}")
    # the sequences' initial states matter (the test above would pass with a shared zero state otherwise)
    assert all(gr.abs().sum() > 0 for gr in registry.tensors(grads[len(grads) - len(_floating(want_state)):]))


@pytest.mark.parametrize("name,form", list(_packed_cases()))
def test_a_nan_stays_in_its_sequence(name, form, small_chunks):
    """A NaN in any input along time, at one token of one sequence: every other sequence's outputs
    and final state are finite and equal to running it alone; its own earlier tokens too (except
    in the forms the registry lists as not causal for non-finite values: FFT convolutions)."""
    fam = registry.get_family(name)
    x = fam.packed_inputs(LENGTHS, H=2, K=4, V=3, dtype=F64, seed=6)
    cu = x["cu_seqlens"].tolist()
    T, p = cu[-1], cu[NAN_SEQ] + NAN_AT
    with torch.no_grad():
        want_out, want_state = _alone(fam, x)
        timed = [n for n, t in x.items() if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (1, T)]
        assert timed
        for input_name in timed:
            y = dict(x)
            y[input_name] = x[input_name].clone()
            y[input_name][:, p] = float("nan")
            out, state = _packed_fn(fam, form)(**y)
            keep = torch.ones(T, dtype=torch.bool)
            keep[p:cu[NAN_SEQ + 1]] = False  # the NaN's own sequence from the NaN on
            ran = registry.select(name, **y)[0] if form == "dispatch" else form
            if ran in fam.not_causal_in_nonfinite:  # an FFT convolution: the whole sequence is reached
                keep[cu[NAN_SEQ]:p] = False
            where = f"{name}/{form}, NaN in {input_name}"
            assert torch.isfinite(out[:, keep]).all(), f"{where}: a NaN reached another sequence or an earlier token"
            torch.testing.assert_close(out[:, keep], want_out[:, keep], msg=lambda m: f"{where}: {m}")
            rows = [n for n in range(len(LENGTHS)) if n != NAN_SEQ]
            for s, w in zip(registry.tensors(state), want_state):
                assert torch.isfinite(s[rows]).all(), f"{where}: a NaN reached another sequence's final state"
                torch.testing.assert_close(s[rows], w[rows], msg=lambda m: f"{where}: final state: {m}")
            hit = not torch.isfinite(out[:, ~keep]).all() or not all(
                torch.isfinite(s[NAN_SEQ]).all() for s in registry.tensors(state))
            assert hit, f"{where}: the NaN had no effect at all on its own sequence"


@pytest.mark.parametrize("name,form", list(_packed_cases()))
def test_bad_cu_seqlens_name_the_argument(name, form):
    fam = registry.get_family(name)
    x = fam.packed_inputs([3, 4], H=2, K=4, V=3, dtype=F64)
    fn = _packed_fn(fam, form)
    bad = {"int64": torch.tensor([0, 3, 7], dtype=torch.int32), "start at 0": torch.tensor([1, 3, 7]),
           "non-decreasing": torch.tensor([0, 5, 3, 7]), "end at T = 7": torch.tensor([0, 3, 6]),
           "1-D": torch.tensor([[0, 3, 7]])}
    for why, cu in bad.items():
        with pytest.raises(ValueError, match=f"cu_seqlens must .*{why}"):
            fn(**{**x, "cu_seqlens": cu})
    two_rows = {n: (torch.cat([t, t]) if isinstance(t, torch.Tensor) and t.dim() >= 2 and t.shape[:2] == (1, 7)
                    else t) for n, t in x.items()}
    with pytest.raises(ValueError, match="cu_seqlens needs one packed row \\(B = 1\\), got B = 2"):
        fn(**two_rows)
    one_state = {**x, "initial_state": registry._map(lambda t: t[:1], x["initial_state"])}
    with pytest.raises(ValueError, match="initial_state"):  # N = 2 sequences need 2 initial states
        fn(**one_state)


def test_fused_layer_steps_equal_eager_on_the_compile_backend():
    """registry.fused: the layers' norms and normalisations run compiled on the compile backend,
    with the eager results and gradients (float64); on the torch backend they are the plain
    functions."""
    from rnnlab.layers.common import GatedRMSNorm, RMSNorm, l2_normalize
    from rnnlab.layers.mamba2 import _group_gated_norm
    g = torch.Generator().manual_seed(0)
    x, z = (torch.randn(2, 5, 3, 8, generator=g, dtype=F64) for _ in range(2))
    w = torch.randn(8, generator=g, dtype=F64)
    norm, gated = RMSNorm(8, plus_one=True).double(), GatedRMSNorm(8).double()
    with torch.no_grad():
        norm.weight.copy_(w), gated.weight.copy_(w)
    cases = [lambda x, z: norm(x), lambda x, z: gated(x, z), lambda x, z: l2_normalize(x),
             lambda x, z: _group_gated_norm(x.flatten(2), z.flatten(2), w.repeat(3), 1e-5, 3)]
    for i, fn in enumerate(cases):
        results = []
        for backend in ("torch", "compile"):
            a, b = x.clone().requires_grad_(), z.clone().requires_grad_()
            with registry.use_backend(backend):
                out = fn(a, b)
            grads = torch.autograd.grad((out * out.detach().cos()).sum(), (a, b), allow_unused=True)
            results.append((out.detach(), [torch.zeros_like(x) if gr is None else gr for gr in grads]))
        (o1, g1), (o2, g2) = results
        torch.testing.assert_close(o2, o1, rtol=1e-12, atol=1e-12, msg=f"case {i}")
        for a, b in zip(g2, g1):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12, msg=f"case {i}")
    from rnnlab.layers.common import _rms_norm
    assert registry.fused(_rms_norm) is _rms_norm  # the torch backend: the function itself
    with registry.use_backend("compile"):
        assert registry.fused(_rms_norm) is not _rms_norm


def test_compiled_lti_scan_takes_real_systems_too(small_chunks):
    """The s4d family's inputs are complex; Mega's EMA runs the same scan with a real system."""
    from rnnlab.ops.lti import lti_recurrent, lti_scan_compiled
    g = torch.Generator().manual_seed(2)
    u, h0 = torch.randn(1, 21, 3, generator=g, dtype=F64), torch.randn(1, 3, 4, generator=g, dtype=F64)
    dA, dB, C = torch.rand(3, 4, generator=g, dtype=F64), *(torch.randn(3, 4, generator=g, dtype=F64) for _ in range(2))
    results = []
    for fn in (lti_scan_compiled, lti_recurrent):
        a = [t.clone().requires_grad_() for t in (u, dA, dB, C, h0)]
        y, h = fn(a[0], a[1], a[2], a[3], a[4])
        grads = torch.autograd.grad((y * y.detach().sin()).sum() + (h * h.detach().cos()).sum(), a)
        results.append([y, h, *grads])
    for got, want in zip(*results):
        torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)
