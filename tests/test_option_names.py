"""Option names: one name per meaning across the mixer configs, old names still read (with a
FutureWarning) and written the new way, and conv_size = 0 meaning no convolution."""
import dataclasses
import json
import warnings

import pytest
import torch
from torch import nn

import rnnlab
from rnnlab.configs import field_docs
from rnnlab.models.layout import upgrade_layout
from rnnlab.models.registry import REGISTRY, OptionError, build_mixer

D = 32
# the layers whose short convolution conv_size = 0 removes, and those whose convolution is always on
CONV_OPTIONAL = {"deltanet", "gated_deltanet", "kda", "gated_deltaproduct", "mom", "slstm"}
CONV_ALWAYS = {"mamba", "mamba2", "longhorn", "mlstm", "titans", "rg_lru"}


def _options(name: str) -> set[str]:
    return {f.name for f in dataclasses.fields(REGISTRY[name].config) if f.init}


def test_one_name_per_meaning():
    """Fields are named by what their comment says they are: a convolution's width is conv_size,
    a norm's epsilon norm_eps, negative eigenvalues allow_neg_eigval; and no config still has a
    field under a name it has renamed."""
    for name, spec in REGISTRY.items():
        docs, options = field_docs(spec.config), _options(name)
        assert not set(spec.config.renamed) & options, f"{name}: an old name is still a field"
        assert set(spec.config.renamed.values()) <= options, f"{name}: renamed to a field it does not have"
        for opt in options:
            doc = docs.get(opt, "").lower()
            if "conv" in doc and "width" in doc:
                assert opt == "conv_size", f"{name}.{opt}: a convolution width is called conv_size"
            if doc.startswith("epsilon of") or "norm epsilon" in doc:
                assert opt == "norm_eps", f"{name}.{opt}: a norm's epsilon is called norm_eps"
            if "negative eigenvalues" in doc:
                assert opt == "allow_neg_eigval", f"{name}.{opt}: negative eigenvalues are allow_neg_eigval"
    with_conv = {name for name in REGISTRY if "conv_size" in _options(name)}
    assert with_conv == CONV_OPTIONAL | CONV_ALWAYS


@pytest.mark.parametrize("name", sorted(CONV_OPTIONAL | CONV_ALWAYS))
def test_conv_size_0_is_no_convolution_or_refused(name):
    if name in CONV_ALWAYS:
        with pytest.raises(ValueError, match="conv_size must be >= 1"):
            build_mixer(name, D, **{**REGISTRY[name].tiny, "conv_size": 0})
        return
    torch.manual_seed(0)
    layer = build_mixer(name, D, **{**REGISTRY[name].tiny, "conv_size": 0})
    assert not any(isinstance(m, nn.Conv1d) for m in layer.modules())
    x = torch.randn(2, 5, D)
    y, state = layer(x)
    assert torch.isfinite(y).all()
    conv_states = {k: t for k, t in state.tensors().items() if k.startswith("conv")}
    assert conv_states and all(t.shape[1] == 0 for t in conv_states.values())
    y2, _ = layer(x[:, 3:], layer(x[:, :3])[1])  # streams: nothing but the recurrent state carries over
    torch.testing.assert_close(y2, y[:, 3:], atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("name", ["deltanet", "gated_deltanet"])
def test_no_convolution_is_silu_of_the_projections(name):
    """conv_size = 0 equals a width-1 convolution of weight 1 (SiLU of the projection alone), as
    the reference layer's use_short_conv=False."""
    none = build_mixer(name, D, num_heads=2, conv_size=0).double()
    one = build_mixer(name, D, num_heads=2, conv_size=1).double()
    sd = {k: v for k, v in one.state_dict().items() if "_conv." not in k}
    assert set(sd) == set(none.state_dict())
    none.load_state_dict(sd)
    with torch.no_grad():
        for conv in (one.q_conv, one.k_conv, one.v_conv):
            conv.conv.weight.fill_(1.0)
    x = torch.randn(1, 6, D, dtype=torch.float64)
    torch.testing.assert_close(none(x)[0], one(x)[0], atol=1e-12, rtol=1e-10)


def test_old_names_are_read_and_map_to_the_new():
    with pytest.warns(FutureWarning, match="conv_width is now called conv_size"):
        layer = build_mixer("rg_lru", D, num_heads=2, conv_width=3)
    assert layer.config.conv_size == 3 and layer.conv.width == 3
    with pytest.raises(OptionError, match="conv_width is the old name of conv_size"):
        build_mixer("rg_lru", D, conv_width=3, conv_size=3)
    with pytest.warns(FutureWarning, match="conv_size"):
        assert upgrade_layout("rg_lru(num_heads=2, conv_width = 3)*2,swa(window=4)") == \
            "rg_lru(num_heads=2,conv_size=3)*2,swa(window=4)"
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # nothing to rewrite: no warning, the text kept as written
        assert upgrade_layout("rg_lru( num_heads=2 ),attention") == "rg_lru( num_heads=2 ),attention"


def test_old_format_config_json_loads_and_saves_the_new_names(tmp_path):
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="rg_lru(num_heads=2,conv_size=3),deltanet(conv_size=1)", n_layers=2, d_model=D,
                               vocab_size=40)
    model.save_pretrained(tmp_path / "old")
    path = tmp_path / "old" / "config.json"
    meta = json.loads(path.read_text())
    meta["config"]["layout"] = "rg_lru(num_heads=2,conv_width=3),deltanet(conv_size=1)"  # as written before the rename
    path.write_text(json.dumps(meta))
    with pytest.warns(FutureWarning, match="conv_size"):
        loaded = rnnlab.load_model(tmp_path / "old")
    assert loaded.config.layout == "rg_lru(num_heads=2,conv_size=3),deltanet(conv_size=1)"
    assert loaded.blocks[0].mixer.config.conv_size == 3
    assert loaded.blocks[1].mixer.q_conv.width == 1  # deltanet's conv_size = 1 was, and is, a width-1 convolution
    tokens = torch.randint(0, 40, (1, 7))
    with torch.no_grad():
        assert torch.equal(loaded(tokens)[0], model(tokens)[0])
    loaded.save_pretrained(tmp_path / "new")
    text = (tmp_path / "new" / "config.json").read_text()
    assert "conv_width" not in text and "conv_size=3" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rnnlab.load_model(tmp_path / "new")


@pytest.mark.parametrize("name", ["gated_deltanet", "gated_deltaproduct", "mamba2", "kda", "mom"])
@pytest.mark.parametrize("bad", [(-1.0, 16.0), (4.0, 2.0), (float("nan"), 2.0), (1.0, float("inf")), (1.0,)])
def test_a_decay_init_range_that_would_give_nan_names_the_field(name, bad):
    with pytest.raises(ValueError, match="A_init_range"):
        rnnlab.build_mixer(name, d_model=64, A_init_range=bad)


@pytest.mark.parametrize("name,option", [("retnet", "value_factor"), ("gla", "gate_low_rank_dim"),
                                         ("kda", "gate_low_rank_dim"), ("rwkv6", "gate_low_rank_dim"),
                                         ("rwkv7", "gate_low_rank_dim")])
def test_zero_widths_are_refused_naming_the_option(name, option):
    """A width of 0 would build a layer with empty projections: it is refused, naming the option."""
    with pytest.raises(ValueError, match=f"{option} must be >= 1, got 0"):
        rnnlab.build_mixer(name, 64, **{option: 0})
