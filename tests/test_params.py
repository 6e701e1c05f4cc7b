"""Parameters belong to their layers: each mixer initialises its own (the same alone and inside a
model) and names the ones that skip weight decay; the model's AdamW groups follow those names."""
from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import rnnlab
from rnnlab.layers.attention import Attention, AttentionConfig
from rnnlab.layers.common import RMSNorm
from rnnlab.models.registry import REGISTRY, build_mixer
from rnnlab.train.trainer import TrainConfig, train

NAMES = rnnlab.mixers()
D = 32


def _options(name: str) -> dict:
    """The tiny options of ``name``, with its depth option set explicitly (a model would fill it)."""
    spec = REGISTRY[name]
    opts = dict(spec.tiny)
    if spec.depth_option is not None:
        opts.setdefault(spec.depth_option, 0.0)
    return opts


def _layout(name: str, opts: dict) -> str:
    return f"{name}({','.join(f'{k}={v!r}' for k, v in sorted(opts.items()))})"


def _model(name: str, n_layers: int = 2, **opts):
    return rnnlab.build_model(layout=_layout(name, {**_options(name), **opts}), n_layers=n_layers, d_model=D)


# -- (a) the same weights alone and in a model ---------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_lone_mixer_and_first_block_start_alike(name):
    opts = _options(name)
    torch.manual_seed(123)
    lone = build_mixer(name, D, **opts)
    torch.manual_seed(123)
    model = rnnlab.build_model(layout=_layout(name, opts), n_layers=1, d_model=D)
    inner = model.blocks[0].mixer.state_dict()
    alone = lone.state_dict()
    assert alone.keys() == inner.keys()
    for k in alone:
        assert torch.equal(alone[k], inner[k]), f"{name}: {k} differs between build_mixer and the model's block"
    # the comparison means something: another seed gives other weights
    torch.manual_seed(124)
    other = build_mixer(name, D, **opts).state_dict()
    assert any(not torch.equal(alone[k], other[k]) for k in alone), f"{name}: init does not depend on the seed"


@pytest.mark.parametrize("name", NAMES)
def test_reset_parameters_initialises_every_parameter(name):
    """reset_parameters owns the whole init: parameters overwritten with NaN come back finite."""
    torch.manual_seed(0)
    m = build_mixer(name, D, **_options(name))
    with torch.no_grad():
        for p in m.parameters():
            p.fill_(math.nan)
    m.reset_parameters()
    bad = [n for n, p in m.named_parameters() if not torch.isfinite(p).all()]
    assert not bad, f"{name}: reset_parameters left {bad} uninitialised"


def test_model_reset_leaves_mixers_alone():
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="mamba,gla", n_layers=2, d_model=D)
    before = {k: v.clone() for k, v in model.state_dict().items()}
    with torch.no_grad():
        model.embed.weight.zero_()
        model.blocks[1].mlp.down_proj.weight.zero_()
        model.norm.weight.fill_(3.0)
    model.reset_parameters()
    after = model.state_dict()
    for k in before:
        if ".mixer." in k:
            assert torch.equal(before[k], after[k]), f"LM.reset_parameters changed the mixer's {k}"
    assert model.embed.weight.abs().sum() > 0 and model.blocks[1].mlp.down_proj.weight.abs().sum() > 0
    assert torch.equal(model.norm.weight, torch.ones(D))
    # the model's own init: N(0, init_std), MLP down_proj scaled by 1/sqrt(2 n_layers)
    assert abs(model.embed.weight.std().item() - 0.02) < 0.002
    down = torch.cat([b.mlp.down_proj.weight.flatten() for b in model.blocks])
    assert abs(down.std().item() - 0.02 / 2) < 0.002


# -- (b) the weight-decay groups ------------------------------------------------------------------------
KNOWN_NO_DECAY = {  # parameters the references exempt from weight decay (besides biases and norms)
    "mamba": {"A_log", "D"},
    "mamba2": {"A_log", "D", "dt_bias"},
    "gated_deltanet": {"A_log", "dt_bias"},
    "longhorn": {"D"},
    "s4d": {"log_A_real", "A_imag", "log_dt"},
    "lru": {"nu_log", "theta_log", "gamma_log"},
    "lssl": {"log_dt"},
    "mlstm": {"igate.bias", "fgate.bias", "skip", "norm_weight"},
    "slstm": {"bias", "R", "norm_weight"},
    "titans": {"gate_bias"},
    "rwkv6": {"x_mu", "x_bias", "bonus"},
    "rwkv7": {"x_mix", "k_k", "k_a", "r_k"},
}


@pytest.mark.parametrize("name", NAMES)
def test_param_groups_follow_the_layers(name):
    torch.manual_seed(0)
    model = _model(name)
    decayed, kept = model.param_groups(0.1)
    assert decayed["weight_decay"] == 0.1 and kept["weight_decay"] == 0.0
    ids_d, ids_k = [id(p) for p in decayed["params"]], [id(p) for p in kept["params"]]
    every = [id(p) for p in model.parameters()]
    assert sorted(ids_d + ids_k) == sorted(every), "every parameter in exactly one group"
    assert not set(ids_d) & set(ids_k)
    params = dict(model.named_parameters())
    for i, block in enumerate(model.blocks):
        declared = block.mixer.no_weight_decay()
        assert KNOWN_NO_DECAY.get(name, set()) <= declared, f"{name}: {KNOWN_NO_DECAY[name] - declared} not declared"
        for n in declared:
            assert id(params[f"blocks.{i}.mixer.{n}"]) in ids_k, f"{name}: declared {n} is in the decayed group"
        for mname, m in block.mixer.named_modules():  # Linear weights are decayed in every reference here
            if isinstance(m, nn.Linear):
                assert id(m.weight) in ids_d, f"{name}: {mname}.weight should be decayed"
        for norm in (block.mixer_norm, block.mlp_norm):
            assert id(norm.weight) in ids_k
    assert id(model.norm.weight) in ids_k
    assert id(model.embed.weight) in ids_d


def test_learned_lssl_A_is_declared_and_fixed_A_is_no_parameter():
    torch.manual_seed(0)
    learned = build_mixer("lssl", D, d_state=8, learn_A=True)
    fixed = build_mixer("lssl", D, d_state=8)
    assert "A" in learned.no_weight_decay() and "A" in dict(learned.named_parameters())
    assert "A" not in fixed.no_weight_decay() and "A" in dict(fixed.named_buffers())
    model = rnnlab.build_model(layout="lssl(d_state=8,learn_A=True)", n_layers=1, d_model=D)
    assert id(model.blocks[0].mixer.A) in {id(p) for p in model.param_groups(0.1)[1]["params"]}


def test_tied_embedding_counts_once_and_untied_head_is_decayed():
    torch.manual_seed(0)
    tied = rnnlab.build_model(layout="attention", n_layers=1, d_model=D)
    groups = tied.param_groups(0.1)
    assert sum(len(g["params"]) for g in groups) == len(list(tied.parameters()))
    assert sum(p.numel() for g in groups for p in g["params"]) == tied.num_params()
    untied = rnnlab.build_model(layout="attention", n_layers=1, d_model=D, tie_embeddings=False)
    assert id(untied.lm_head.weight) in {id(p) for p in untied.param_groups(0.1)[0]["params"]}


def test_trainer_does_not_decay_ssm_parameters():
    """One training step with no scored target (zero gradients) only applies the decay: A_log and D
    stay, matrices shrink by lr·weight_decay."""
    torch.manual_seed(0)
    model = rnnlab.build_model(layout="mamba(d_state=4)", n_layers=1, d_model=D)
    mixer = model.blocks[0].mixer
    A_log, Dskip, w = mixer.A_log.detach().clone(), mixer.D.detach().clone(), mixer.out_proj.weight.detach().clone()
    x = torch.randint(0, 260, (2, 8))
    unscored = iter([(x, torch.full_like(x, -100))])
    train(model, unscored, TrainConfig(steps=1, batch_size=2, seq_len=8, warmup=0, lr=0.1, weight_decay=0.5),
          progress=False)
    assert torch.equal(mixer.A_log, A_log) and torch.equal(mixer.D, Dskip)
    torch.testing.assert_close(mixer.out_proj.weight.detach(), w * (1 - 0.1 * 0.5))


def test_bad_weight_decay_and_bad_declaration_are_clear_errors():
    model = rnnlab.build_model(layout="attention", n_layers=1, d_model=D)
    for bad in (-0.1, "0.1", None, math.nan):
        with pytest.raises(ValueError, match="weight_decay"):
            model.param_groups(bad)

    class Misnamed(Attention):
        no_decay_params = ("A_logg",)

    layer = Misnamed(AttentionConfig(d_model=D, num_heads=2))
    with pytest.raises(AttributeError, match="A_logg"):
        layer.no_weight_decay()


# -- (c) declared names exist ---------------------------------------------------------------------------
@pytest.mark.parametrize("name", NAMES)
def test_no_weight_decay_names_are_parameters(name):
    torch.manual_seed(0)
    m = build_mixer(name, D, **_options(name))
    names = m.no_weight_decay()
    params = dict(m.named_parameters())
    assert names <= params.keys(), f"{name}: {names - params.keys()} are not parameters"
    # biases and norm weights are found by module type, not by rank
    for mname, mod in m.named_modules():
        if isinstance(mod, (nn.Linear, nn.Conv1d)) and mod.bias is not None:
            assert f"{mname}.bias" in names
        if isinstance(mod, RMSNorm):
            assert f"{mname}.weight" in names


# -- (d) two defaults from the references ---------------------------------------------------------------
def test_retnet_decays_are_exact_in_float64():
    torch.manual_seed(0)
    m = build_mixer("retnet", D, num_heads=4).double()
    h = torch.arange(4, dtype=torch.float64)
    gamma = 1 - 2.0 ** (-5 - h)  # the closed form, in float64
    assert (m.log_decay(torch.float64).exp() - gamma).abs().max().item() <= 1e-15
    # and the layer uses it: its state after T tokens is sum_t gamma^(T-1-t) k_t v_t^T
    x = torch.randn(1, 40, D, dtype=torch.float64)
    _, st = m(x)
    k = m.k_proj(x)[0].view(40, 4, -1)  # (T, H, K)
    v = m.v_proj(x)[0].view(40, 4, -1)  # (T, H, V)
    S = torch.zeros_like(st.S[0])
    for t in range(40):
        S = gamma[:, None, None] * S + torch.einsum("hk,hv->hkv", k[t], v[t])
    err = (st.S[0] - S).abs().max().item() / S.abs().max().item()
    assert err <= 1e-12, f"retnet float64 state is {err:.2g} (relative) off the closed-form recurrence"


def test_mlstm_norm_eps_is_xlstm_default():
    assert build_mixer("mlstm", D, num_heads=2).config.norm_eps == 1e-5
