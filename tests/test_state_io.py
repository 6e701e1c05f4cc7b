"""Saving and loading states: round trips, and clear errors for files that do not fit."""
import pytest
import torch

import rnnlab
from rnnlab.layers.state import StateError


def _model(**kw):
    torch.manual_seed(0)
    return rnnlab.build_model(layout="attention,swa(window=4,sinks=1)", n_layers=2, d_model=32, **kw)


def test_model_state_round_trip(tmp_path):
    model = _model()
    tokens = torch.randint(0, 256, (2, 12))
    _, state = model(tokens[:, :7])
    rnnlab.save_state(state, tmp_path / "s.safetensors", model=model)
    loaded = rnnlab.load_state(tmp_path / "s.safetensors", model=model)
    assert loaded.seen.tolist() == [7, 7] and loaded.nbytes == state.nbytes
    a, _ = model(tokens[:, 7:], state)
    b, _ = model(tokens[:, 7:], loaded)
    torch.testing.assert_close(a, b)


def test_mixer_state_round_trip_and_dtype_move(tmp_path):
    layer = rnnlab.build_mixer("swa", d_model=32, num_heads=2, window=4, sinks=1)
    _, s = layer(torch.randn(1, 9, 32))
    rnnlab.save_state(s, tmp_path / "m.safetensors", model=layer)
    s2 = rnnlab.load_state(tmp_path / "m.safetensors", model=layer)
    assert type(s2) is type(s) and s2.seen.tolist() == [9]
    torch.testing.assert_close(s2.k, s.k)
    half = s.to(dtype=torch.bfloat16)
    assert half.k.dtype == torch.bfloat16 and half.seen.tolist() == [9] and half.seen.dtype == torch.int64
    assert _float_bytes(half) == _float_bytes(s) // 2


def _float_bytes(state):
    """Bytes of the floating tensors of a mixer or model state (counters such as ``seen`` left out)."""
    layers = getattr(state, "layers", (state,))
    return sum(t.nbytes for s in layers if s is not None for t in s.tensors().values() if t.is_floating_point())


def test_state_from_another_model_is_refused(tmp_path):
    model = _model()
    _, state = model(torch.randint(0, 256, (1, 5)))
    rnnlab.save_state(state, tmp_path / "s.safetensors", model=model)
    other = _model(d_ff=192)
    with pytest.raises(StateError, match="another config"):
        rnnlab.load_state(tmp_path / "s.safetensors", model=other)
    layer = rnnlab.build_mixer("attention", d_model=32)
    with pytest.raises(StateError, match="whole model"):
        rnnlab.load_state(tmp_path / "s.safetensors", model=layer)


def test_corrupted_and_missing_files(tmp_path):
    model = _model()
    with pytest.raises(FileNotFoundError):
        rnnlab.load_state(tmp_path / "nope.safetensors", model=model)
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(StateError, match="not a readable state file"):
        rnnlab.load_state(bad, model=model)
    _, state = model(torch.randint(0, 256, (1, 5)))
    good = tmp_path / "good.safetensors"
    rnnlab.save_state(state, good, model=model)
    data = good.read_bytes()
    good.write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(StateError, match="not a readable state file"):
        rnnlab.load_state(good, model=model)


def test_wrong_shape_in_file_is_refused(tmp_path):
    from safetensors.torch import load_file, save_file
    from safetensors import safe_open
    model = _model()
    _, state = model(torch.randint(0, 256, (1, 5)))
    p = tmp_path / "s.safetensors"
    rnnlab.save_state(state, p, model=model)
    with safe_open(str(p), framework="pt") as f:
        meta = f.metadata()
    t = load_file(str(p))
    t["layers.0.k"] = torch.zeros(1, 2, 5, 3)  # wrong head dim
    save_file(t, str(p), metadata=meta)
    with pytest.raises(StateError, match="layer 0"):
        rnnlab.load_state(p, model=model)


def test_save_is_atomic_when_writing_fails(tmp_path, monkeypatch):
    model = _model()
    _, state = model(torch.randint(0, 256, (1, 5)))
    p = tmp_path / "s.safetensors"
    rnnlab.save_state(state, p, model=model)
    before = p.read_bytes()
    import rnnlab.inference.state_io as io

    def boom(*a, **k):
        raise OSError("disk full")
    monkeypatch.setattr(io, "save_file", boom)
    with pytest.raises(OSError):
        rnnlab.save_state(state, p, model=model)
    assert p.read_bytes() == before and not list(tmp_path.glob(".tmp*"))


@pytest.mark.parametrize("name", rnnlab.mixers())
def test_every_mixer_state_survives_a_file(name, tmp_path):
    """Save after 7 tokens, load, continue: the same outputs as continuing from the live state
    (covers scalar fields such as attention's token count, integer tensors such as Titans' per-row
    position in its mini-batch, and None fields)."""
    from rnnlab.models.registry import REGISTRY
    torch.manual_seed(0)
    layer = rnnlab.build_mixer(name, d_model=32, **REGISTRY[name].tiny)
    x = torch.randn(2, 12, 32)
    _, s = layer(x[:, :7])
    rnnlab.save_state(s, tmp_path / "m.safetensors", model=layer)
    s2 = rnnlab.load_state(tmp_path / "m.safetensors", model=layer)
    assert type(s2) is type(s) and s2.scalars() == s.scalars() and s2.tensors().keys() == s.tensors().keys()
    y, _ = layer(x[:, 7:], s)
    y2, _ = layer(x[:, 7:], s2)
    torch.testing.assert_close(y2, y)


def test_state_refuses_other_weights_of_the_same_config(tmp_path):
    model = _model()
    _, state = model(torch.randint(0, 256, (1, 5)))
    rnnlab.save_state(state, tmp_path / "s.safetensors", model=model)
    twin = _model()  # same config, same seed: same weights -> accepted
    assert rnnlab.load_state(tmp_path / "s.safetensors", model=twin).seen.tolist() == [5]
    with torch.no_grad():
        next(twin.parameters()).add_(1e-3)  # one weight nudged: refused
    with pytest.raises(StateError, match="other weights"):
        rnnlab.load_state(tmp_path / "s.safetensors", model=twin)
    layer = rnnlab.build_mixer("gla", d_model=32)
    _, s = layer(torch.randn(1, 4, 32))
    rnnlab.save_state(s, tmp_path / "m.safetensors", model=layer)
    with pytest.raises(StateError, match="other weights"):
        rnnlab.load_state(tmp_path / "m.safetensors", model=rnnlab.build_mixer("gla", d_model=32))


def test_states_round_trip_through_bfloat16_on_request(tmp_path):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="gated_deltanet,swa(window=4)", n_layers=2, d_model=32)
    tokens = torch.randint(0, 256, (1, 12))
    _, state = model(tokens[:, :8])
    rnnlab.save_state(state, tmp_path / "h.safetensors", model=model, dtype=torch.bfloat16)
    rnnlab.save_state(state, tmp_path / "f.safetensors", model=model)
    as_saved = rnnlab.load_state(tmp_path / "h.safetensors", model=model)
    assert _float_bytes(as_saved) * 2 == _float_bytes(state)
    assert {t.dtype for s in as_saved.layers for t in s.tensors().values() if t.is_floating_point()} == {torch.bfloat16}
    back = rnnlab.load_state(tmp_path / "h.safetensors", model=model, dtype=torch.float32)
    for s0, s1 in zip(state.layers, back.layers):
        for k, t in s0.tensors().items():
            assert s1.tensors()[k].dtype == t.dtype
            torch.testing.assert_close(s1.tensors()[k], t, rtol=1e-2, atol=1e-2)
    a, _ = model(tokens[:, 8:], state)
    b, _ = model(tokens[:, 8:], back)
    torch.testing.assert_close(a, b, rtol=0.05, atol=0.05)


def test_forks_are_independent_and_equal_the_original():
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="gated_deltanet,attention", n_layers=2, d_model=32).eval()
    s = rnnlab.Stream(model)
    s.feed(torch.randint(0, 256, (1, 9)))
    f = s.fork()
    g1, g2 = torch.Generator().manual_seed(3), torch.Generator().manual_seed(3)
    from_fork = torch.stack(list(f.sample(6, temperature=1.0, generator=g1)))
    assert s.state.seen.tolist() == [9]  # sampling the fork left the original where it was
    from_orig = torch.stack(list(s.sample(6, temperature=1.0, generator=g2)))
    assert torch.equal(from_fork, from_orig) and f.state.seen.tolist() == s.state.seen.tolist() == [15]
    other = s.fork()
    other.feed(torch.tensor([[1, 2, 3]]))
    assert s.state.seen.tolist() == [15] and other.state.seen.tolist() == [18]
    for a, b in zip(s.state.layers, other.state.layers):
        assert all(t.data_ptr() != other_t.data_ptr() for t, other_t in zip(a.tensors().values(), b.tensors().values())
                   if t.numel())


def test_prefix_cache_reads_a_prefix_once(tmp_path):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="gated_deltanet,swa(window=8)", n_layers=2, d_model=32).eval()
    prefix, question = torch.randint(0, 256, (1, 40)), torch.randint(0, 256, (1, 5))
    cache = rnnlab.PrefixCache(tmp_path / "cache", model)
    first = cache.stream(prefix)
    calls = []
    model.register_forward_pre_hook(lambda m, args: calls.append(args[0].shape[1]))
    second = cache.stream(prefix)
    assert first.hit is False and second.hit is True and calls == []  # loaded, not recomputed
    first.feed(question)
    second.feed(question)
    whole = rnnlab.Stream(model)
    whole.feed(torch.cat([prefix, question], 1))
    assert torch.equal(second.logits, first.logits)  # the cached state is the computed one, bit for bit
    torch.testing.assert_close(second.logits, whole.logits)
    other = rnnlab.build_model(layout="gated_deltanet,swa(window=8)", n_layers=2, d_model=32)
    assert rnnlab.PrefixCache(tmp_path / "cache", other).path(prefix) != cache.path(prefix)


def test_jrt_prompt_layout():
    from rnnlab.inference import jrt_prompt
    ctx, q, sep = torch.tensor([5, 6, 7]), torch.tensor([1, 2]), torch.tensor([0])
    assert jrt_prompt(ctx, q).tolist() == [5, 6, 7, 5, 6, 7, 1, 2]
    assert jrt_prompt(ctx, q, repeats=3, separator=sep).tolist() == [5, 6, 7, 0, 5, 6, 7, 0, 5, 6, 7, 1, 2]
    assert jrt_prompt(ctx, q, repeats=1).tolist() == [5, 6, 7, 1, 2]
    batch = jrt_prompt(torch.tensor([[5, 6], [7, 8]]), torch.tensor([[1], [2]]), separator=sep)
    assert batch.tolist() == [[5, 6, 0, 5, 6, 1], [7, 8, 0, 7, 8, 2]]
    with pytest.raises(ValueError, match="repeats"):
        jrt_prompt(ctx, q, repeats=0)


def test_a_loaded_kv_cache_decodes_like_the_saved_one(tmp_path):
    """A full-attention cache is saved with its capacity (zeros past `seen`); the loaded state
    decodes token by token (in place, without gradients) exactly as the original."""
    model = _model()
    tokens = torch.randint(0, 256, (2, 16))
    with torch.no_grad():
        _, state = model(tokens[:, :5])
        assert state.layers[0].k.shape[2] == 8  # capacity 8 for 5 tokens
        rnnlab.save_state(state, tmp_path / "s.safetensors", model=model)
        loaded = rnnlab.load_state(tmp_path / "s.safetensors", model=model)
        assert loaded.layers[0].seen.tolist() == [5, 5]
        outs = {}
        for name, s in (("saved", state), ("loaded", loaded)):
            ys = []
            for t in range(5, 16):  # past the capacity: the buffer doubles on the way
                y, s = model(tokens[:, t:t + 1], s)
                ys.append(y)
            outs[name] = torch.cat(ys, 1)
    torch.testing.assert_close(outs["loaded"], outs["saved"], atol=0, rtol=0)
    torch.testing.assert_close(outs["saved"], model(tokens)[0][:, 5:], atol=1e-5, rtol=1e-5)


def test_a_ragged_model_state_keeps_each_rows_position_in_a_file(tmp_path):
    model = _model()
    s = rnnlab.Stream(model)
    s.feed([torch.randint(0, 256, (n,)) for n in (3, 9)])
    rnnlab.save_state(s.state, tmp_path / "s.safetensors", model=model)
    loaded = rnnlab.load_state(tmp_path / "s.safetensors", model=model)
    assert loaded.seen.tolist() == [3, 9] and loaded.seen.dtype == torch.int64
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(tmp_path / "s.safetensors"), framework="pt") as f:
        meta = f.metadata()
    tensors = load_file(str(tmp_path / "s.safetensors"))
    tensors["seen"] = torch.tensor([3])  # one position for two rows: refused
    save_file(tensors, str(tmp_path / "s.safetensors"), metadata=meta)
    with pytest.raises(StateError, match="'seen' must be an int64 tensor of 2 rows"):
        rnnlab.load_state(tmp_path / "s.safetensors", model=model)


def _as_format_2(path, tokens_seen):
    """Rewrite a state file as rnnlab wrote it in state format 2: one token count, no 'seen' tensor."""
    import json
    from safetensors import safe_open
    from safetensors.torch import load_file, save_file
    with safe_open(str(path), framework="pt") as f:
        meta = json.loads(f.metadata()["rnnlab_state"])
    tensors = load_file(str(path))
    del tensors["seen"]
    meta.update(format_version=2, tokens_seen=tokens_seen)
    save_file(tensors, str(path), metadata={"rnnlab_state": json.dumps(meta)})


def test_files_of_format_2_load_where_their_count_is_exact(tmp_path):
    """Format 2 kept one count (the longest row's): a one-row state, or rows whose attention layers
    kept their own positions, load exactly; other rows are refused, naming the format."""
    model = _model()
    p = tmp_path / "s.safetensors"
    _, one = model(torch.randint(0, 256, (1, 6)))
    rnnlab.save_state(one, p, model=model)
    _as_format_2(p, 6)
    assert rnnlab.load_state(p, model=model).seen.tolist() == [6]
    ragged = rnnlab.Stream(model)
    ragged.feed([torch.randint(0, 256, (n,)) for n in (3, 9)])
    rnnlab.save_state(ragged.state, p, model=model)
    _as_format_2(p, 9)
    assert rnnlab.load_state(p, model=model).seen.tolist() == [3, 9]  # from the attention layers
    torch.manual_seed(0)
    recurrent = rnnlab.build_model(layout="gated_deltanet", n_layers=1, d_model=32)
    _, two = recurrent(torch.randint(0, 256, (2, 4)))
    rnnlab.save_state(two, p, model=recurrent)
    _as_format_2(p, 4)
    with pytest.raises(StateError, match="state format 2: one token count for its 2 rows"):
        rnnlab.load_state(p, model=recurrent)
