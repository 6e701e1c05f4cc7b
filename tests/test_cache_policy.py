"""KV-cache policies chosen at inference time: full, window, sinks + window, on a model trained
without them; the weights are shared, the state stays bounded."""
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
