"""Softmax attention against a direct transcription of its definition (StreamingLLM cache)."""
import collections
import contextlib
import dataclasses
import math
import os
import sys
import traceback

import pytest
import torch
from einops import rearrange

import rnnlab

from rnnlab.layers.attention import Attention, AttentionConfig
from rnnlab.layers.common import apply_rope
from rnnlab.layers.state import StateError
from rnnlab.ops.attention import merge_attention, softmax_attention


def _rope(x, pos, theta=10000.0, rotated=None):
    """x (K,) at integer position pos, rotate-half convention over its first ``rotated`` dims (None:
    all; the rest pass unchanged), written out element by element."""
    K = rotated or x.shape[0]
    out = x.clone()
    for i in range(K // 2):
        ang = pos * theta ** (-2 * i / K)
        a, b = x[i], x[i + K // 2]
        out[i] = a * math.cos(ang) - b * math.sin(ang)
        out[i + K // 2] = b * math.cos(ang) + a * math.sin(ang)
    return out


def reference_attention(m: Attention, x: torch.Tensor) -> torch.Tensor:
    """For each token t, build the StreamingLLM cache (sinks + window), give each entry its index in
    the cache as position, and attend with a plain softmax."""
    c = m.config
    B, T, _ = x.shape
    q = rearrange(m.q_proj(x), "b t (h k) -> b t h k", k=c.head_dim)
    k = rearrange(m.k_proj(x), "b t (g k) -> b t g k", k=c.head_dim)
    v = rearrange(m.v_proj(x), "b t (g k) -> b t g k", k=c.head_dim)
    rep = c.num_heads // c.num_kv_heads
    out = torch.zeros(B, T, c.num_heads, c.head_dim, dtype=x.dtype)
    for t in range(T):
        w = c.window or T
        sinks = list(range(min(c.sinks, t + 1)))
        window = [j for j in range(max(c.sinks, t - w + 1), t + 1)]
        cache = sinks + window
        for b in range(B):
            for h in range(c.num_heads):
                g = h // rep
                qt = _rope(q[b, t, h], len(cache) - 1, rotated=c.rope_dim)
                scores = torch.stack([_rope(k[b, j, g], p, rotated=c.rope_dim) @ qt
                                      for p, j in enumerate(cache)]) / math.sqrt(c.head_dim)
                p = torch.softmax(scores, 0)
                out[b, t, h] = sum(p[i] * v[b, j, g] for i, j in enumerate(cache))
    return m.o_proj(rearrange(out, "b t h k -> b t (h k)"))


@pytest.mark.parametrize("opts", [dict(), dict(window=4), dict(window=4, sinks=2), dict(window=1, sinks=3),
                                  dict(num_kv_heads=1, window=5, sinks=1), dict(num_kv_heads=1),
                                  dict(rope_fraction=0.5, out_bias=True), dict(window=4, sinks=2, rope_fraction=0.25)])
def test_attention_matches_definition(opts):
    torch.manual_seed(0)
    m = Attention(AttentionConfig(d_model=16, num_heads=2, **opts)).double()
    assert (m.o_proj.bias is not None) == opts.get("out_bias", False)
    if m.o_proj.bias is not None:
        torch.nn.init.normal_(m.o_proj.bias)
    x = torch.randn(2, 13, 16, dtype=torch.float64)
    y, _ = m(x)
    torch.testing.assert_close(y, reference_attention(m, x), atol=1e-10, rtol=1e-10)
    # and streaming after a prefix gives the same outputs
    y1, s = m(x[:, :6])
    y2, _ = m(x[:, 6:], s)
    torch.testing.assert_close(torch.cat([y1, y2], 1), y, atol=1e-10, rtol=1e-10)


def test_windowed_state_is_bounded_and_positions_stay_small():
    m = Attention(AttentionConfig(d_model=16, num_heads=2, window=8, sinks=2)).double()
    s = None
    with torch.no_grad():
        for _ in range(5):
            _, s = m(torch.randn(1, 50, 16, dtype=torch.float64), s)
    assert s.k.shape[2] == 7 and s.sink_k.shape[2] == 2 and s.seen.tolist() == [250]


def test_long_prefill_uses_blocks_and_matches_small_blocks():
    torch.manual_seed(0)
    q, k, v = (torch.randn(1, 2, 700, 8, dtype=torch.float64) for _ in range(3))
    idx = torch.arange(700)
    o1, l1 = softmax_attention(q, k, v, idx, idx, window=100)
    o2, l2 = softmax_attention(q, k, v, idx, idx, window=100, block_size=7)
    torch.testing.assert_close(o1, o2)
    torch.testing.assert_close(l1, l2)


def test_merge_attention_equals_attention_over_the_union():
    torch.manual_seed(0)
    q, k, v = torch.randn(1, 1, 5, 4), torch.randn(1, 1, 9, 4), torch.randn(1, 1, 9, 3)
    qi, ki = torch.arange(20, 25), torch.arange(9) * 2 + 7
    full, lse = softmax_attention(q, k, v, qi, ki)
    a, la = softmax_attention(q, k[:, :, :4], v[:, :, :4], qi, ki[:4])
    b, lb = softmax_attention(q, k[:, :, 4:], v[:, :, 4:], qi, ki[4:])
    merged, lm = merge_attention(a, la, b, lb)
    torch.testing.assert_close(merged, full)
    torch.testing.assert_close(lm, lse)


def test_config_errors_name_the_field():
    with pytest.raises(ValueError, match="sinks"):
        AttentionConfig(d_model=16, num_heads=2, sinks=2)
    with pytest.raises(ValueError, match="num_kv_heads"):
        AttentionConfig(d_model=16, num_heads=3, num_kv_heads=2, head_dim=4)
    with pytest.raises(ValueError, match="window"):
        AttentionConfig(d_model=16, num_heads=2, window=0)


@pytest.mark.parametrize("opts", [dict(), dict(window=4, sinks=2), dict(num_kv_heads=1, window=3)])
def test_ragged_batch_decodes_each_row_alone(opts):
    """States after prompts of different lengths, concatenated (each row at its own position):
    prefill and decode steps of the batch equal each row run alone."""
    torch.manual_seed(0)
    m = Attention(AttentionConfig(d_model=16, num_heads=2, **opts)).double()
    prompts = [torch.randn(1, n, 16, dtype=torch.float64) for n in (1, 9, 4)]
    alone = [m(p)[1] for p in prompts]
    batch = type(alone[0]).cat(alone)
    assert batch.seen.tolist() == [1, 9, 4]
    x = torch.randn(3, 6, 16, dtype=torch.float64)
    for piece in (x[:, :3], x[:, 3:4], x[:, 4:5], x[:, 5:]):
        y, batch = m(piece, batch)
        for b in range(3):
            y_b, alone[b] = m(piece[b:b + 1], alone[b])
            torch.testing.assert_close(y[b:b + 1], y_b, atol=1e-12, rtol=1e-12)
    assert batch.seen.tolist() == [7, 15, 10]
    for b in range(3):
        for name, t in alone[b].tensors().items():
            got = batch.tensors()[name][b:b + 1]
            torch.testing.assert_close(got[:, :, :t.shape[2]] if got.dim() == 4 else got, t)


def test_decode_writes_the_cache_in_place_and_a_reused_state_still_continues_alike():
    """Without gradients a decode step writes its key into the full-attention buffer in place (no
    copy of the cache); continuing an older state again copies it and gives the same answer."""
    torch.manual_seed(0)
    m = Attention(AttentionConfig(d_model=16, num_heads=2)).double()
    x = torch.randn(1, 12, 16, dtype=torch.float64)
    with torch.no_grad():
        _, s = m(x[:, :5])
        assert s.k.shape[2] == 8  # capacity: the power of two above 5
        y1, s1 = m(x[:, 5:6], s)
        assert s1.k.data_ptr() == s.k.data_ptr()  # in place
        y2, s2 = m(x[:, 6:7], s1)
        y_other, _ = m(x[:, 7:8], s)  # the older state again: a copy, without s1's keys
        y1_again, _ = m(x[:, 5:6], s)
        _, s9 = m(x[:, 7:9], s2)  # grows past the capacity: doubled
    ref, _ = m(x[:, :7])
    torch.testing.assert_close(torch.cat([y1, y2], 1), ref[:, 5:7])
    torch.testing.assert_close(y1_again, y1)
    torch.testing.assert_close(y_other, m(torch.cat([x[:, :5], x[:, 7:8]], 1))[0][:, 5:])
    assert s9.k.shape[2] == 16 and s9.seen.tolist() == [9]


def test_rotated_keys_stay_exact_at_large_positions():
    """A windowed stream far from its start (position ~1e7) attends as one near the start: the
    sink and window keys are rotated once, with float64 angles, so only distances matter."""
    torch.manual_seed(0)
    m = Attention(AttentionConfig(d_model=16, num_heads=2, window=4, sinks=1)).double()
    x = torch.randn(1, 9, 16, dtype=torch.float64)
    _, s = m(x[:, :5])
    far = dataclasses.replace(s, seen=s.seen + 10_000_000)  # same cache, 1e7 tokens later
    far_k = apply_rope(apply_rope(s.k, -torch.arange(2, 5), 10000.0), torch.arange(2, 5) + 10_000_000, 10000.0)
    far = dataclasses.replace(far, k=far_k)
    torch.testing.assert_close(m(x[:, 5:], far)[0], m(x[:, 5:], s)[0], atol=1e-9, rtol=1e-9)


def test_state_rows_and_cat_round_trip_and_name_their_arguments():
    """rows() takes rows out, cat() puts caches of different lengths back (padded with zeros);
    bad arguments raise errors naming them."""
    m = Attention(AttentionConfig(d_model=16, num_heads=2))
    _, s = m(torch.randn(3, 5, 16))
    _, longer = m(torch.randn(1, 11, 16))
    both = type(s).cat([s.select(slice(1, 2)), longer])
    assert both.k.shape[2] == 16 and both.seen.tolist() == [5, 11]
    torch.testing.assert_close(both.k[:1, :, :8], s.k[1:2])
    assert both.k[:1, :, 8:].abs().sum() == 0
    torch.testing.assert_close(both.select(torch.tensor([1])).k, longer.k)
    with pytest.raises(TypeError, match="index must be a slice or an index tensor"):
        s.select(0)
    with pytest.raises(StateError, match="states must be a non-empty list of one state type"):
        type(s).cat([])


def test_partial_rope_rotates_only_the_first_dims():
    """With rope_fraction f only the first int(K·f) dims of each head are rotated, by RoPE over those
    dims; a fraction giving an odd or zero count is refused."""
    m = Attention(AttentionConfig(d_model=16, num_heads=2, rope_fraction=0.5)).double()
    assert m.config.rope_dim == 4 and m.o_proj.bias is None
    x = torch.randn(1, 3, 2, 6, 8, dtype=torch.float64)[0]  # (B, H, T, K)
    pos = torch.arange(6)[None].expand(3, 6)
    r = m._rope(x, pos)
    assert torch.equal(r[..., 4:], x[..., 4:]) and not torch.allclose(r[..., :4], x[..., :4])
    torch.testing.assert_close(r[..., :4], apply_rope(x[..., :4], pos))
    for bad, match in ((dict(rope_fraction=0.0), "rope_fraction"), (dict(rope_fraction=0.375), "even number"),
                       (dict(rope_fraction=1.5), "rope_fraction")):
        with pytest.raises(ValueError, match=match):
            AttentionConfig(d_model=16, num_heads=2, **bad)


def test_packed_attention_computes_each_sequence_alone_without_padding(monkeypatch):
    """Packed prompts (one long, many short; some continuing cached rows) equal each run alone, and
    the attention computes sum_n l_n (s_n + l_n) scores: no sequence is padded to the longest."""
    torch.manual_seed(0)
    m = Attention(AttentionConfig(d_model=16, num_heads=4, num_kv_heads=2)).double()
    lengths, cached = [40, 1, 3, 2, 1, 5, 2], [0, 6, 0, 3, 0, 1, 0]
    states = [m(torch.randn(1, s, 16, dtype=torch.float64))[1] if s else m.init_state(1, dtype=torch.float64)
              for s in cached]
    x = torch.randn(1, sum(lengths), 16, dtype=torch.float64)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    scores = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention",
                        lambda q, k, v, **kw: scores.append(q.shape[0] * q.shape[2] * k.shape[2]) or sdpa(q, k, v, **kw))
    y, s = m(x, type(states[0]).cat(states), cu_seqlens=cu)
    assert sum(scores) == sum(n * (c + n) for n, c in zip(lengths, cached))  # padded: 7 * 40 * (6 + 40)
    monkeypatch.undo()
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        y_n, s_n = m(x[:, a:b], states[n])
        assert (y[:, a:b] - y_n).abs().max() < 1e-12, f"sequence {n}"
        assert s.seen[n] == s_n.seen[0] == cached[n] + lengths[n]
        torch.testing.assert_close(s.k[n:n + 1, :, :s_n.seen[0]], s_n.k[:, :, :s_n.seen[0]], rtol=0, atol=1e-12)


@contextlib.contextmanager
def _host_reads():
    """Count the calls that read a tensor back to the host (``item``, ``int()``, ``bool()``,
    ``tolist``, ``nonzero``, boolean-mask indexing, ...: each a device -> host sync on an
    accelerator), by the rnnlab function that made them."""
    calls = collections.Counter()
    saved = []

    def wrap(owner, name, when=lambda *a, **k: True):
        orig = getattr(owner, name)
        saved.append((owner, name, orig))

        def counted(*a, **k):
            if when(*a, **k):
                ours = [f for f in traceback.extract_stack()[:-1] if f"{os.sep}rnnlab{os.sep}" in f.filename]
                calls[f"{name} in {ours[-1].name}" if ours else f"{name} outside rnnlab"] += 1
            return orig(*a, **k)
        setattr(owner, name, counted)

    boolean = lambda i: any(isinstance(t, torch.Tensor) and t.dtype == torch.bool  # noqa: E731
                            for t in (i if isinstance(i, tuple) else (i,)))
    for name in ("item", "__int__", "__float__", "__bool__", "__index__", "tolist", "numpy", "nonzero", "masked_select"):
        wrap(torch.Tensor, name)
    wrap(torch.Tensor, "__getitem__", lambda self, i: boolean(i))
    wrap(torch.Tensor, "__setitem__", lambda self, i, v: boolean(i))
    wrap(torch, "nonzero")
    wrap(torch, "masked_select")
    try:
        yield calls
    finally:
        for owner, name, orig in saved:
            setattr(owner, name, orig)


@pytest.mark.parametrize("layout", ["attention", "swa(window=4)", "swa(window=4,sinks=3)", "gated_deltanet,attention"])
def test_decoding_reads_nothing_back_from_the_device(layout, monkeypatch):
    """Decoding a ragged batch (rows at different positions, one still filling its sinks) reads no
    tensor back to the host in the attention layers: positions and capacities are kept as Python
    ints beside the tensors. What remains per token is the model's check of the token ids on CPU
    (two reads; on an accelerator it asserts on the device). The ops' CPU-only finiteness checks
    (``known_finite``, which never reads on other devices) are left out of the count."""
    monkeypatch.setattr(sys.modules["rnnlab.ops.attention"], "known_finite", lambda *xs: False)
    torch.manual_seed(0)
    model = rnnlab.build_model(layout=layout, n_layers=2, d_model=32, vocab_size=64).eval()
    stream = rnnlab.Stream(model)
    stream.feed([torch.randint(0, 64, (n,)) for n in (7, 1, 12)])
    n = 6
    with _host_reads() as calls:
        tokens = list(stream.sample(n, temperature=0))
    assert len(tokens) == n
    assert dict(calls) == {"__int__ in check_tokens_input": 2 * n}, dict(calls)
