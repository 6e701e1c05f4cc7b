"""KV-cache policies chosen at inference time: full, window, sinks + window, on a model trained
without them; the weights are shared, the state stays bounded."""
import math

import pytest
import torch

import rnnlab
from rnnlab.inference import CachePolicy, parse_cache, with_cache


def test_parse_cache():
    assert parse_cache("full") == CachePolicy()
    assert parse_cache("window=64") == CachePolicy(window=64)
    assert parse_cache("sinks=4, window=1024") == parse_cache("window=1024,sinks=4") == CachePolicy(1024, 4)
    assert str(parse_cache("window=1024,sinks=4")) == "sinks=4,window=1024"
    for bad in ("", "sinks=4", "window=0", "window=x", "window=4,window=5", "ring=3"):
        with pytest.raises(ValueError, match="cache"):
            parse_cache(bad)


def test_policy_shares_weights_and_equals_a_model_built_with_it():
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="gated_deltanet,attention", n_layers=2, d_model=32).eval()
    view = with_cache(model, "sinks=2,window=8")
    assert view.config.layout.endswith("attention(sinks=2,window=8)")
    assert all(a.data_ptr() == b.data_ptr() for a, b in zip(model.state_dict().values(), view.state_dict().values()))
    built = rnnlab.build_model(layout="gated_deltanet,attention(window=8,sinks=2)", n_layers=2, d_model=32)
    built.load_state_dict(model.state_dict())
    x = torch.randint(0, 256, (2, 30))
    torch.testing.assert_close(view(x)[0], built.eval()(x)[0])
    assert not torch.allclose(view(x)[0], model(x)[0])  # past the window the policy changes the outputs
    with pytest.raises(ValueError, match="no attention layer"):
        with_cache(rnnlab.build_model(layout="gla", n_layers=1, d_model=32), "window=8")


def test_stream_under_sinks_and_window_stays_bounded():
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="attention", n_layers=2, d_model=32).eval()
    s = rnnlab.Stream(model, cache="sinks=4,window=16")
    sizes = []
    for _ in range(4):
        s.feed(torch.randint(0, 256, (1, 50)))
        sizes.append(s.state.nbytes)
    assert len(set(sizes)) == 1 and s.state.seen.tolist() == [200]
    full = rnnlab.Stream(model)
    full.feed(torch.randint(0, 256, (1, 100)))
    assert full.state.nbytes > sizes[0]


def test_sinks_keep_the_loss_flat_past_the_window_where_a_plain_window_jumps():
    """StreamingLLM's Figure 1 (Xiao et al. 2023) at small scale. A byte model trained with full
    attention on windows that all open with BOS parks attention on that first token; streamed
    through a window of W tokens, its loss jumps once BOS leaves the window, and keeping BOS as a
    sink restores the full-attention loss. Measured on held-out standard-library source, streams
    that open with BOS, bits per byte at positions W .. 4W (inside the training length T = 4W,
    where full attention is sound). At this scale a sink forms in most training runs, not all
    (README, "Streams at length"): the run is seeded (deterministic on CPU) with one where it does."""
    from rnnlab.data import RandomWindows, TokenData
    from rnnlab.data.corpus import load_corpus
    from rnnlab.train import TrainConfig, train
    W, T, bos = 16, 64, rnnlab.data.ByteTokenizer.bos_id
    text, held_out = load_corpus(max_bytes=200_000)
    model = rnnlab.build_model(layout="attention", n_layers=1, d_model=64, vocab_size=260)
    batches = RandomWindows(TokenData.from_tensor(text.long(), vocab_size=260), 16, T, seed=0, bos_id=bos)
    train(model, batches, TrainConfig(steps=200, batch_size=16, seq_len=T, lr=1e-2, warmup=20, eval_every=0),
          progress=False)
    starts = torch.randint(0, len(held_out) - T, (16,), generator=torch.Generator().manual_seed(1)).tolist()
    x = torch.stack([torch.cat([torch.tensor([bos]), held_out[s:s + T].long()]) for s in starts])  # (16, 1 + T)
    bits = {}
    for cache in ("full", f"window={W}", f"sinks=1,window={W}"):
        with torch.no_grad():
            logits, _ = with_cache(model.eval(), cache)(x[:, :-1])
        nll = torch.nn.functional.cross_entropy(logits.transpose(1, 2), x[:, 1:], reduction="none")  # (16, T)
        bits[cache] = float(nll[:, W:].mean()) / math.log(2)  # targets whose context no longer holds BOS
    assert bits[f"window={W}"] > bits["full"] + 0.2  # BOS evicted: the loss jumps
    assert abs(bits[f"sinks=1,window={W}"] - bits["full"]) < 0.1  # BOS kept as a sink: flat
