"""The language model: layouts, forward contract, save/load, sampling, learning a copy task."""
import json

import pytest
import torch
import torch.nn.functional as F

import rnnlab
from rnnlab.inference.generate import sample_next
from rnnlab.layers.state import StateError
from rnnlab.models.layout import parse_layout


def test_layout_parsing_cycles_and_options():
    blocks = parse_layout("attention*2,swa(window=16,sinks=2),mlp", n_layers=6, d_model=32)
    assert [b.name for b in blocks] == ["attention", "attention", "swa", "mlp", "attention", "attention"]
    assert dict(blocks[2].options) == {"window": 16, "sinks": 2}


@pytest.mark.parametrize("layout, err, match", [
    ("nosuchmixer", KeyError, "known mixers: .*attention"),
    ("attention(nosuchoption=1)", TypeError, "no option"),
    ("attention(window)", ValueError, "key=value"),
    ("attention**2", ValueError, "cannot parse"),
    ("", ValueError, "layout"),
])
def test_layout_errors(layout, err, match):
    with pytest.raises(err, match=match):
        rnnlab.build_model(layout=layout, n_layers=2, d_model=32)


def test_forward_contract_and_hybrid_chunking():
    model = rnnlab.build_model(layout="attention,swa(window=5,sinks=1),mlp", n_layers=3, d_model=32).double()
    tokens = torch.randint(0, 260, (2, 21))
    logits, state = model(tokens)
    assert logits.shape == (2, 21, 260) and state.seen.tolist() == [21, 21] and state.layers[2] is None
    l1, s1 = model(tokens[:, :8])
    l2, s2 = model(tokens[:, 8:], s1)
    torch.testing.assert_close(torch.cat([l1, l2], 1), logits)
    with pytest.raises(ValueError, match="token ids"):
        model(torch.full((1, 3), 260))
    with pytest.raises(TypeError, match="int"):
        model(torch.zeros(1, 3))
    with pytest.raises(StateError, match="layer 0"):
        model(tokens[:1], state)  # batch 2 state with batch 1 tokens


def test_tied_embeddings_and_param_count():
    model = rnnlab.build_model(layout="attention", n_layers=2, d_model=32)
    assert model.lm_head.weight is model.embed.weight
    n = sum(p.numel() for p in model.parameters())  # parameters() yields shared tensors once
    assert model.num_params() == n
    assert model.num_params(non_embedding=True) == n - 260 * 32
    untied = rnnlab.build_model(layout="attention", n_layers=2, d_model=32, tie_embeddings=False)
    assert untied.num_params() == n + 260 * 32


def test_save_and_load_pretrained(tmp_path):
    model = rnnlab.build_model(layout="attention,swa(window=4)", n_layers=2, d_model=32, mlp="gelu")
    tokens = torch.randint(0, 260, (1, 10))
    model.save_pretrained(tmp_path)
    meta = json.loads((tmp_path / "config.json").read_text())
    assert meta["config"]["layout"] == "attention,swa(window=4)" and meta["format_version"] == 1
    loaded = rnnlab.load_model(tmp_path)
    torch.testing.assert_close(loaded(tokens)[0], model(tokens)[0])
    assert loaded.lm_head.weight is loaded.embed.weight
    assert not list(tmp_path.glob(".tmp*")), "temporary files left behind"
    with pytest.raises(FileNotFoundError, match="config.json"):
        rnnlab.load_model(tmp_path / "missing")


def test_build_model_rejects_unknown_options():
    with pytest.raises(TypeError, match="nosuch"):
        rnnlab.build_model(layout="attention", nosuch=1)


def test_sampling_rules():
    logits = torch.tensor([[0.0, 1.0, 3.0, 2.0]])
    assert sample_next(logits, temperature=0).item() == 2
    g = torch.Generator().manual_seed(0)
    draws = {sample_next(logits, 1.0, top_k=2, generator=g).item() for _ in range(200)}
    assert draws == {2, 3}
    # top_p: probabilities ~[.03, .09, .64, .24]: p=0.5 keeps only the top token, 0.8 the top two
    assert {sample_next(logits, 1.0, top_p=0.5, generator=g).item() for _ in range(100)} == {2}
    assert {sample_next(logits, 1.0, top_p=0.8, generator=g).item() for _ in range(300)} == {2, 3}
    with pytest.raises(ValueError, match="top_p"):
        sample_next(logits, 1.0, top_p=0.0)


def test_generation_uses_the_state_and_equals_reencoding():
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="attention,swa(window=6,sinks=1)", n_layers=2, d_model=32).double()
    prompt = torch.randint(0, 256, (2, 7))
    out = model.generate(prompt, 12, temperature=0)
    seq = prompt
    for _ in range(12):  # greedy by re-encoding the whole prefix each time
        nxt = model(seq)[0][:, -1].argmax(-1, keepdim=True)
        seq = torch.cat([seq, nxt], 1)
    assert torch.equal(out, seq[:, 7:])


def test_stream_save_and_resume(tmp_path):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="attention,swa(window=6)", n_layers=2, d_model=32)
    prompt = torch.randint(0, 256, (1, 9))
    whole = rnnlab.Stream(model)
    whole.feed(prompt)
    ref = torch.stack(list(whole.sample(10, temperature=0)), 1)
    s = rnnlab.Stream(model)
    s.feed(prompt)
    first = torch.stack(list(s.sample(4, temperature=0)), 1)
    s.save(tmp_path / "conv.safetensors")
    resumed = rnnlab.Stream.load(model, tmp_path / "conv.safetensors")
    assert resumed.state.seen.tolist() == [13]
    rest = torch.stack(list(resumed.sample(6, temperature=0)), 1)
    torch.testing.assert_close(torch.cat([first, rest], 1), ref)
    with pytest.raises(RuntimeError, match="feed"):
        next(rnnlab.Stream(model).sample(1))


def test_copy_task_is_learned():
    """A 2-layer attention model learns to copy 8 tokens after a separator: loss on the copied half
    falls below 0.1 nats (chance is ln 16 = 2.77) within 300 steps."""
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="attention", n_layers=2, d_model=64)
    opt = torch.optim.AdamW(model.parameters(), lr=3e-3)
    for step in range(300):
        src = torch.randint(0, 16, (32, 8))
        seq = torch.cat([src, torch.full((32, 1), 259), src], 1)  # (B, 17)
        logits, _ = model(seq[:, :-1])
        loss = F.cross_entropy(logits[:, 8:].reshape(-1, 260), seq[:, 9:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.1:
            break
    assert loss.item() < 0.1, f"copy task loss {loss.item():.3f} after {step + 1} steps"


def test_hybrid_model_obeys_the_chunking_law():
    """Samba-like and mixed layouts: pieces with the state passed equal one call (float64)."""
    torch.manual_seed(0)
    layout = ("gated_deltanet(num_heads=2),mamba(d_state=4),swa(window=8,sinks=2),mlp,"
              "mlstm(num_heads=2),lru(d_state=8),mamba2(d_state=8,head_dim=16)")
    model = rnnlab.build_model(layout=layout, n_layers=7, d_model=32).double()
    tokens = torch.randint(0, 260, (2, 90))
    logits, state = model(tokens)
    outs, st = [], None
    for a, b in [(0, 1), (1, 30), (30, 31), (31, 90)]:
        out, st = model(tokens[:, a:b], st)
        outs.append(out)
    torch.testing.assert_close(torch.cat(outs, 1), logits, atol=1e-9, rtol=1e-9)
    assert st.seen.tolist() == [90, 90] and st.nbytes == state.nbytes


def test_hgrn2_lower_bounds_rise_with_depth(tmp_path):
    """Unless the layout sets it, block i of L gets lower_bound i / L (HGRN2's initial bounds)."""
    model = rnnlab.build_model(layout="hgrn2", n_layers=4, d_model=32)
    assert [b.mixer.config.lower_bound for b in model.blocks] == [0.0, 0.25, 0.5, 0.75]
    hybrid = rnnlab.build_model(layout="hgrn2,swa(window=8),hgrn2(lower_bound=0.9)", n_layers=6, d_model=32)
    bounds = [b.mixer.config.lower_bound for b in hybrid.blocks if b.name == "hgrn2"]
    assert bounds == [0.0, 0.9, 0.5, 0.9]
    model.save_pretrained(tmp_path)
    loaded = rnnlab.load_model(tmp_path)
    assert [b.mixer.config.lower_bound for b in loaded.blocks] == [0.0, 0.25, 0.5, 0.75]


@pytest.mark.parametrize("layout, lengths", [
    ("gated_deltanet,mamba(d_state=4),aaren,titans(chunk_size=4),mlp", [5, 1, 17, 9]),  # recurrent: any lengths
    ("mamba2(d_state=8,head_dim=16),swa(window=4,sinks=1),attention", [6, 1, 11, 3]),  # attention: any lengths
])
def test_packed_model_equals_each_sequence_alone(layout, lengths):
    """model(tokens, state, cu_seqlens): the logits and final state rows of a packed row equal
    each sequence run alone from its own initial state (float64)."""
    torch.manual_seed(0)
    model = rnnlab.build_model(layout=layout, n_layers=5, d_model=32).double()
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist())
    tokens = torch.randint(0, 260, (1, sum(lengths)))
    # per-sequence initial states: the states after prompts of different lengths (a ragged batch)
    prompt_states = [model(torch.randint(0, 260, (1, 2 + 3 * n)))[1] for n in range(len(lengths))]
    s0 = rnnlab.ModelState.cat(prompt_states)
    logits, s = model(tokens, s0, cu_seqlens=cu)
    assert s.seen.tolist() == [2 + 3 * n + length for n, length in enumerate(lengths)]  # each row its own
    finals = []
    for n, (a, b) in enumerate(zip(cu.tolist(), cu.tolist()[1:])):
        want, s_n = model(tokens[:, a:b], s0.select(slice(n, n + 1)))
        torch.testing.assert_close(logits[:, a:b], want, rtol=1e-10, atol=1e-10)
        finals.append(s_n)
    assert torch.equal(s.seen, rnnlab.ModelState.cat(finals).seen)
    for got_layer, want_rows in zip(s.layers, zip(*(f.layers for f in finals))):
        if got_layer is None:
            continue
        want_layer = type(got_layer).cat(list(want_rows))  # caches of different lengths padded alike
        for k, t in want_layer.tensors().items():
            torch.testing.assert_close(got_layer.tensors()[k], t, rtol=1e-10, atol=1e-10)


def _saved_bytes(fn) -> int:
    """Bytes of the tensors autograd keeps for the backward while ``fn()`` runs (outside any
    recomputed block: ``torch.utils.checkpoint`` keeps its blocks' own out of this count)."""
    total = 0

    def pack(t):
        nonlocal total
        total += t.numel() * t.element_size()
        return t
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        return fn(), total


@pytest.mark.parametrize("packed", [False, True])
def test_recompute_gives_the_same_results_and_keeps_only_block_inputs(packed):
    """model.recompute = True: the same logits, final states and gradients (of the weights and of
    the initial state, float64), with packed sequences too; autograd keeps a small part of what it
    keeps without; calls without autograd are unchanged."""
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="gated_deltanet,mamba2(d_state=8,head_dim=16),swa(window=8)", n_layers=3,
                               d_model=32).double()
    lengths = [9, 20, 35] if packed else [64]
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist()) if packed else None
    tokens = torch.randint(0, 260, (1, sum(lengths)))
    with torch.no_grad():
        s0 = rnnlab.ModelState.cat([model(torch.randint(0, 260, (1, 5)))[1]] * len(lengths))
    s0 = rnnlab.ModelState(tuple(type(s).from_parts({k: t.detach().requires_grad_() if t.is_floating_point() else t
                                                     for k, t in s.tensors().items()}, s.scalars())
                                 for s in s0.layers), s0.seen)
    leaves = list(model.parameters()) + [t for s in s0.layers for t in s.tensors().values() if t.requires_grad]
    results = []
    for recompute in (False, True):
        model.recompute = recompute
        (logits, s), saved = _saved_bytes(lambda: model(tokens, s0, cu_seqlens=cu))
        finals = [t for layer in s.layers for t in layer.tensors().values()]
        loss = logits.square().mean() + sum(t.square().mean() for t in finals if t.is_floating_point())
        grads = torch.autograd.grad(loss, leaves, allow_unused=True)
        results.append((logits.detach(), [t.detach() for t in finals], grads, saved))
    (logits, finals, grads, saved), (logits_r, finals_r, grads_r, saved_r) = results
    torch.testing.assert_close(logits_r, logits, rtol=0, atol=0)
    for a, b in zip(finals_r + list(grads_r), finals + list(grads)):
        assert (a is None) == (b is None)
        if a is not None:
            torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-14)
    assert saved_r < saved / 4, (saved_r, saved)
    with torch.no_grad():
        torch.testing.assert_close(model(tokens, s0, cu_seqlens=cu)[0], logits, rtol=0, atol=0)


def test_packed_model_checks_cu_seqlens_and_state_rows():
    model = rnnlab.build_model(layout="gated_deltanet", n_layers=1, d_model=32)
    tokens = torch.randint(0, 260, (1, 7))
    with pytest.raises(ValueError, match="cu_seqlens must end at T = 7"):
        model(tokens, cu_seqlens=torch.tensor([0, 3, 6]))
    with pytest.raises(ValueError, match=r"cu_seqlens needs one packed row \(B = 1\)"):
        model(tokens.repeat(2, 1), cu_seqlens=torch.tensor([0, 3, 7]))
    _, s3 = model(torch.randint(0, 260, (3, 2)))
    with pytest.raises(StateError, match="layer 0"):  # 3 state rows for 2 sequences
        model(tokens, s3, cu_seqlens=torch.tensor([0, 3, 7]))


def test_gemma_options_equal_their_definitions():
    """embed_scale, norm_plus_one, the GeGLU MLP with biases and logit_softcap, each against the
    formula it stands for, computed by hand on the model's own weights (float64)."""
    torch.manual_seed(0)
    m = rnnlab.build_model(layout="rg_lru", n_layers=1, d_model=16, vocab_size=50, mlp="geglu", d_ff=24, mlp_bias=True,
                    norm_plus_one=True, embed_scale=4.0, logit_softcap=0.5, tie_embeddings=False).double()
    b = m.blocks[0]
    assert torch.equal(b.mixer_norm.weight, torch.zeros(16)) and torch.equal(m.norm.weight, torch.zeros(16))
    assert b.mlp.up_proj.bias is not None and torch.equal(b.mlp.down_proj.bias, torch.zeros(16))
    assert {"blocks.0.mlp.gate_proj.bias", "blocks.0.mlp_norm.weight", "norm.weight"} <= m.no_weight_decay()
    with torch.no_grad():
        for p in m.parameters():
            p.add_(0.1 * torch.randn_like(p))
        tokens = torch.randint(0, 50, (2, 9))
        norm = lambda mod, x: x / x.pow(2).mean(-1, keepdim=True).add(mod.eps).sqrt() * (1 + mod.weight)  # noqa: E731
        x = m.embed.weight[tokens] * 4.0
        x = x + b.mixer(norm(b.mixer_norm, x))[0]
        h = norm(b.mlp_norm, x)
        gate = torch.nn.functional.gelu(h @ b.mlp.gate_proj.weight.T + b.mlp.gate_proj.bias, approximate="tanh")
        x = x + (gate * (h @ b.mlp.up_proj.weight.T + b.mlp.up_proj.bias)) @ b.mlp.down_proj.weight.T + b.mlp.down_proj.bias
        raw = norm(m.norm, x) @ m.lm_head.weight.T
        got, _ = m(tokens)
    assert (raw.abs() > 0.5).any()  # the cap bites
    torch.testing.assert_close(got, 0.5 * torch.tanh(raw / 0.5), rtol=1e-12, atol=1e-12)
    assert got.abs().max() < 0.5


@pytest.mark.parametrize("bad,match", [(dict(mlp="reglu"), "mlp must be one of"), (dict(embed_scale=0.0), "embed_scale"),
                                       (dict(logit_softcap=-1.0), "logit_softcap"), (dict(mlp_bias=1), "mlp_bias"),
                                       (dict(norm_plus_one="yes"), "norm_plus_one"),
                                       (dict(embed_scale=float("inf")), "embed_scale")])
def test_gemma_options_refuse_bad_values(bad, match):
    with pytest.raises(ValueError, match=match):
        rnnlab.build_model(layout="rg_lru", n_layers=1, d_model=16, **bad)
