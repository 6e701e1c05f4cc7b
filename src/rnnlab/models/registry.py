"""The mixer registry: every mixer name with its layer, config, paper and state size.

One table, read by ``rnnlab.mixers()``, ``rnnlab.build_mixer``, the layout parser, ``rnnlab list``,
the README's mixer table and the shared property tests (so a mixer added here is tested at once).
"""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass, field
from typing import Any

from ..layers.attention import Attention, AttentionConfig, SWAConfig
from ..layers.base import Mixer, MixerConfig
from ..layers.aaren import Aaren, AarenConfig
from ..layers.minrnn import MinGRU, MinGRUConfig, MinLSTM, MinLSTMConfig
from ..layers.rnn import GRU, LSTM, GRUConfig, LSTMConfig
from ..layers.slstm import SLSTM, SLSTMConfig
from ..layers.gateloop import GateLoop, GateLoopConfig
from ..layers.gla import GLA, GLAConfig, HGRN2, HGRN2Config
from ..layers.griffin import RGLRU, RGLRUConfig
from ..layers.hgrn import HGRN, HGRNConfig
from ..layers.linear_attention import LinearAttention, LinearAttentionConfig, RetNet, RetNetConfig
from ..layers.lru import LRU, LRUConfig
from ..layers.based import Based, BasedConfig
from ..layers.jrt import JRT, JRTConfig
from ..layers.gsa import GSA, GSAConfig
from ..layers.titans import Titans, TitansConfig
from ..layers.ttt import TTT, TTTConfig, TTTMLPConfig
from ..layers.mlstm import MLSTM, MLSTM7B, MLSTM7BConfig, MLSTMConfig
from ..layers.s4d import S4D, S4DConfig
from ..layers.lssl import LSSL, LSSLConfig
from ..layers.lmu import LMU, LMUConfig
from ..layers.mega import Mega, MegaConfig
from ..layers.mamba import Mamba, MambaConfig
from ..layers.longhorn import Longhorn, LonghornConfig
from ..layers.mamba2 import Mamba2, Mamba2Config
from ..layers.rwkv import RWKV6, RWKV7, RWKV6Config, RWKV7Config
from ..layers.deltanet import DeltaNet, DeltaNetConfig, GatedDeltaNet, GatedDeltaNetConfig
from ..layers.deltaproduct import GatedDeltaProduct, GatedDeltaProductConfig
from ..layers.kda import KDA, KDAConfig
from ..layers.mom import MoM, MoMConfig

__all__ = ["UnknownMixerError", "OptionError", "MixerSpec", "REGISTRY", "mixers", "get_spec", "build_mixer", "make_config",
           "options_help", "upgrade_options"]


@dataclass(frozen=True)
class MixerSpec:
    """One registered mixer."""

    name: str  # the name used in layouts and on the command line
    layer: type[Mixer]  # the nn.Module class
    config: type[MixerConfig]  # its config dataclass
    description: str  # one line
    paper: str  # short citation
    state_size: str  # formula of the state size per layer, in the config's letters
    tiny: dict[str, Any] = field(default_factory=dict)  # config overrides for a tiny test model (d_model=32)
    status: str = "verified"  # "verified": property suite + paper-equation test pass
    depth_option: str | None = None  # a config field a model sets to block_index / n_layers unless the layout does


REGISTRY: dict[str, MixerSpec] = {}


class UnknownMixerError(KeyError, ValueError):
    """A mixer name that is not registered (a KeyError, and a ValueError for callers that treat
    any bad value alike)."""

    def __str__(self) -> str:
        return str(self.args[0]) if self.args else ""


class OptionError(TypeError, ValueError):
    """An option that a config does not have."""


def _register(spec: MixerSpec) -> None:
    if spec.name in REGISTRY:
        raise ValueError(f"mixer {spec.name!r} registered twice")
    REGISTRY[spec.name] = spec


_register(MixerSpec(
    "attention", Attention, AttentionConfig,
    "causal softmax attention, RoPE, grouped-query heads; KV cache as state (optional window/sinks)",
    "Vaswani et al. 2017", "2·G·K·L floats (grows with the L tokens seen)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "swa", Attention, SWAConfig,
    "sliding-window attention (window w), optional attention sinks s as in StreamingLLM",
    "Beltagy et al. 2020; Xiao et al. 2023", "2·G·K·(w-1+s) floats (bounded)",
    tiny=dict(num_heads=2, window=8, sinks=2, rope_fraction=0.5, out_bias=True)))

# -- linear attention family: linear_attention, retnet, gla, hgrn2 -----------------------------------
_register(MixerSpec(
    "linear_attention", LinearAttention, LinearAttentionConfig,
    "kernelised attention as an RNN: feature map (elu+1, relu, identity), optional normaliser",
    "Katharopoulos et al. 2020", "H·K·(V+1) floats (V without the normaliser)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "retnet", RetNet, RetNetConfig,
    "multi-scale retention: fixed decay 1-2^(-5-h) per head, group norm, swish gate",
    "Sun et al. 2023 (RetNet)", "H·K·V floats (V = 2K)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "gla", GLA, GLAConfig,
    "gated linear attention: low-rank data-dependent vector decay (τ=16), output gate, per-head norm",
    "Yang et al. 2023 (GLA)", "H·K·V floats",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "gateloop", GateLoop, GateLoopConfig,
    "linear attention with a data-controlled complex gate per key channel (decay and rotation)",
    "Katsch 2023 (GateLoop)", "2·H·K·V floats (complex, K = V = D/H)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "hgrn2", HGRN2, HGRN2Config,
    "HGRN2: forget gate with a lower bound rising with depth, key = 1 - forget, state expansion",
    "Qin et al. 2024 (HGRN2)", "H·K·(D/H) floats (K = expand_ratio)",
    tiny=dict(num_heads=2, expand_ratio=8), depth_option="lower_bound"))

# -- delta-rule family: deltanet, gated_deltanet, kda, gated_deltaproduct, longhorn --------------------
_register(MixerSpec(
    "deltanet", DeltaNet, DeltaNetConfig,
    "linear attention edited by the delta rule; L2-normed q/k, short convs; option negative eigenvalues",
    "Schlag et al. 2021; Yang et al. 2024", "H·K·V + (W-1)·H·(2K+V) floats",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "gated_deltanet", GatedDeltaNet, GatedDeltaNetConfig,
    "delta rule with a Mamba-2 style scalar decay per head, gated RMSNorm output",
    "Yang et al. 2024 (Gated DeltaNet)", "H·K·V + (W-1)·H·(2K+V) floats",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "kda", KDA, KDAConfig,
    "Kimi Delta Attention: delta rule with a decay per key channel (low-rank gate), sigmoid-gated RMSNorm",
    "Kimi Team 2025 (Kimi Linear)", "H·K·V + (W-1)·H·(2K+V) floats",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "gated_deltaproduct", GatedDeltaProduct, GatedDeltaProductConfig,
    "n_h delta-rule (Householder) steps per token, scalar decay once per token; b in (0, 2)",
    "Siems et al. 2025 (DeltaProduct)", "H·K·V + (W-1)·H·((n+1)K+n·V) floats (n = num_householder)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "mom", MoM, MoMConfig,
    "Mixture-of-Memories: a router writes each token into the top-k of M gated-delta memories (+ a shared one), reads them mixed",
    "Du et al. 2025 (MoM)", "E·H·K·V + (W-1)·H·(K+E·(K+V)) floats (E = M+1 memories)",
    tiny=dict(num_heads=2, num_memories=3, topk=2)))
_register(MixerSpec(
    "longhorn", Longhorn, LonghornConfig,
    "online regression k -> x per channel, closed-form diagonal update; no forget gate; Mamba block",
    "Liu et al. 2024 (Longhorn)", "E·N + (W-1)·E floats",
    tiny=dict(d_state=4)))

# -- RWKV time-mix: rwkv6, rwkv7 --------------------------------------------------------------------
_register(MixerSpec(
    "rwkv6", RWKV6, RWKV6Config,
    "RWKV-6 time-mix: data-dependent vector decay via low-rank token shift (ddlerp), bonus u, GroupNorm, SiLU gate",
    "Peng et al. 2024 (Eagle and Finch)", "H·K·V + D floats (H·K = D/2, H·V = D)",
    tiny=dict(num_heads=2, proj_low_rank_dim=4, gate_low_rank_dim=8)))
_register(MixerSpec(
    "rwkv7", RWKV7, RWKV7Config,
    "RWKV-7 time-mix: generalised delta rule, vector decay, in-context learning rate (no value residual)",
    "Peng et al. 2025 (RWKV-7 Goose)", "H·K·K + D floats (K = head_dim)",
    tiny=dict(head_dim=16, decay_low_rank_dim=8, a_low_rank_dim=8, gate_low_rank_dim=8), depth_option="depth"))

# -- xLSTM mLSTM and friends: mlstm, based, jrt, gsa, titans, ttt_linear, ttt_mlp ------------------
_register(MixerSpec(
    "mlstm", MLSTM, MLSTMConfig,
    "xLSTM matrix memory: exponential input gate, stabiliser, normaliser; the mLSTM block",
    "Beck et al. 2024 (xLSTM)", "H·(K·K + K + 1) + (W-1)·E floats (K = E/H)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "mlstm7b", MLSTM7B, MLSTM7BConfig,
    "xLSTM 7B's mLSTM layer: q/k/v and sigmoid output gate from x, soft-capped gates, no conv (transformers' xLSTM)",
    "Beck et al. 2025 (xLSTM 7B)", "H·(K·V + K + 1) floats (K = qk_dim/H, V = v_dim/H)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "based", Based, BasedConfig,
    "linear attention with a 2nd-order Taylor feature map on small q/k; pair with swa in the layout",
    "Arora et al. 2024 (Based)", "H·(1+F+F²)·(V+1) floats",
    tiny=dict(num_heads=2, feature_dim=4)))
_register(MixerSpec(
    "jrt", JRT, JRTConfig,
    "JRT-RNN prefix linear attention: the prompt (prefix_len) read non-causally by encoder k/v, then causal Based decoding",
    "Arora et al. 2024 (Just read twice)", "H·(1+F+F²)·(V+1) floats",
    tiny=dict(num_heads=2, feature_dim=4)))
_register(MixerSpec(
    "gsa", GSA, GSAConfig,
    "gated slot attention: M bounded slots written with a forget gate, read by softmax (two GLA passes)",
    "Zhang et al. 2024 (GSA)", "2·H·M·K floats (K = D/H)",
    tiny=dict(num_heads=2, num_slots=8)))
_register(MixerSpec(
    "titans", Titans, TitansConfig,
    "neural memory (MLP or linear) trained while reading: gradient step on ‖M(k)−v‖² with momentum and forgetting",
    "Behrouz et al. 2024 (Titans)", "3·H·2·F·K (MLP) or 3·H·K² (linear) + 3·(W-1)·D floats",
    tiny=dict(num_heads=2, chunk_size=4)))
_register(MixerSpec(
    "ttt_linear", TTT, TTTConfig,
    "TTT-Linear: a linear model per head learned while reading, a step per mini-batch on ½‖LN(f(k))−(v−k)‖²",
    "Sun et al. 2024 (TTT)", "2·H·(K²+K) floats (weights at the mini-batch start + summed gradient)",
    tiny=dict(num_heads=2, chunk_size=4)))
_register(MixerSpec(
    "ttt_mlp", TTT, TTTMLPConfig,
    "TTT-MLP: as ttt_linear with a 2-layer GELU MLP (F = 4K) as the inner model; base_lr 0.1",
    "Sun et al. 2024 (TTT)", "2·H·(2·F·K+F+K) floats (F = mlp_expand·K)",
    tiny=dict(num_heads=2, chunk_size=4, mlp_expand=2)))

# -- state-space models: mamba, mamba2, lru, rg_lru, s4d, lssl, lmu -------------------------------------
_register(MixerSpec(
    "mamba", Mamba, MambaConfig,
    "selective SSM (S6): data-dependent dt, B, C; conv + SiLU gate; option negative eigenvalues",
    "Gu & Dao 2023 (Mamba)", "E·N + (W-1)·E floats",
    tiny=dict(d_state=4)))
_register(MixerSpec(
    "mamba2", Mamba2, Mamba2Config,
    "SSD: scalar decay per head, B/C groups, gated RMSNorm; computed as gated linear attention",
    "Dao & Gu 2024 (Mamba-2)", "H·N·P + (W-1)·(E+2GN) floats",
    tiny=dict(d_state=8, head_dim=16)))
_register(MixerSpec(
    "lru", LRU, LRUConfig,
    "Linear Recurrent Unit: complex diagonal, exponential parametrisation, ring init, γ normalisation",
    "Orvieto et al. 2023 (LRU)", "N complex = 2N floats",
    tiny=dict(d_state=16)))
_register(MixerSpec(
    "rg_lru", RGLRU, RGLRUConfig,
    "Griffin/Hawk recurrent block: conv + Real-Gated LRU (a_t = a^(8 r_t), sqrt(1-a_t²) input norm) ⊙ GeLU branch",
    "De et al. 2024 (Griffin)", "E + (W-1)·E + 1 floats (E = lru_width)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "s4d", S4D, S4DConfig,
    "diagonal SSM with HiPPO-derived init (S4D-Lin or S4D-Real), learned step, zero-order hold",
    "Gu et al. 2022 (S4D)", "D·N/2 complex = D·N floats",
    tiny=dict(d_state=8)))
_register(MixerSpec(
    "lssl", LSSL, LSSLConfig,
    "dense HiPPO-LegS state space per channel, bilinear step, learned dt; convolution to train, recurrence to stream",
    "Gu et al. 2021 (LSSL)", "D·N floats",
    tiny=dict(d_state=8)))
_register(MixerSpec(
    "lmu", LMU, LMUConfig,
    "Legendre Memory Unit: fixed Legendre delay memory of order N over a window θ (ZOH), ReLU readout of [m; x]",
    "Voelker et al. 2019 (LMU); Liu et al. 2024 (LMUFormer)", "P·N floats (P = memory_dim, N = order)",
    tiny=dict(order=8, theta=16.0)))
_register(MixerSpec(
    "mega", Mega, MegaConfig,
    "Mega-chunk: damped multi-dimensional EMA, then single-head gated attention inside aligned chunks of c tokens",
    "Ma et al. 2023 (Mega)", "D·N + (c-1)·(Z+V) floats + a position (bounded)",
    tiny=dict(ndim=4, z_dim=8, v_dim=16, chunk_size=8)))

# -- elementwise, nonlinear and minimal RNNs: hgrn, mingru, minlstm, lstm, gru, slstm, aaren --------
_register(MixerSpec(
    "hgrn", HGRN, HGRNConfig,
    "HGRN: elementwise gated linear recurrence, forget gate with a lower bound rising with depth, gated norm",
    "Qin et al. 2023 (HGRN)", "E floats (E = expand_ratio·D)",
    tiny=dict(), depth_option="lower_bound"))
_register(MixerSpec(
    "mingru", MinGRU, MinGRUConfig,
    "minGRU: GRU with input-only gates, h = (1-z)h + z g(W x); coefficients from their logs, linear scan",
    "Feng et al. 2024 (Were RNNs all we needed?)", "E floats (E = expand·D)",
    tiny=dict()))
_register(MixerSpec(
    "minlstm", MinLSTM, MinLSTMConfig,
    "minLSTM: input-only normalised forget/input gates, h = f'h + i' g(W x); coefficients from their logs, linear scan",
    "Feng et al. 2024 (Were RNNs all we needed?)", "E floats (E = expand·D)",
    tiny=dict()))
_register(MixerSpec(
    "aaren", Aaren, AarenConfig,
    "Aaren: attention of a learned query per head over the prefix, as a scan with a running max",
    "Feng et al. 2024 (Attention as an RNN)", "H·(K+2) floats (max, denominator, numerator)",
    tiny=dict(num_heads=2)))
_register(MixerSpec(
    "lstm", LSTM, LSTMConfig,
    "LSTM with block-diagonal (multi-head) recurrence; sequential or Newton-parallel (parallel=True)",
    "Hochreiter & Schmidhuber 1997; DEER / ParaRNN", "2·E floats (h and c)",
    tiny=dict(num_heads=4, parallel=True)))
_register(MixerSpec(
    "gru", GRU, GRUConfig,
    "GRU (Cho et al. form) with block-diagonal recurrence; sequential or Newton-parallel (parallel=True)",
    "Cho et al. 2014; DEER / ParaRNN", "E floats (h)",
    tiny=dict(num_heads=32, parallel=True)))
_register(MixerSpec(
    "slstm", SLSTM, SLSTMConfig,
    "xLSTM sLSTM: exponential gating with stabiliser, block-diagonal recurrence, conv on i/f; sequential or Newton",
    "Beck et al. 2024 (xLSTM)", "4·D + (W-1)·D floats (h, c, n, m; conv)",
    tiny=dict(num_heads=4, parallel=True)))


def mixers() -> list[str]:
    """The registered mixer names, sorted."""
    return sorted(REGISTRY)


def get_spec(name: str) -> MixerSpec:
    """The registry entry for ``name``; a KeyError that lists the known names otherwise."""
    if name not in REGISTRY:
        raise UnknownMixerError(f"unknown mixer {name!r}; known mixers: {', '.join(mixers())}")
    return REGISTRY[name]


def upgrade_options(name: str, options: dict[str, Any]) -> dict[str, Any]:
    """``options`` of mixer ``name`` with the option names its config has renamed (``renamed``)
    written the new way, each with a FutureWarning naming the new option (a FutureWarning, not a
    DeprecationWarning, because Python shows it to users of a library by default)."""
    renamed = get_spec(name).config.renamed
    out = {}
    for key, value in options.items():
        new = renamed.get(key, key)
        if new != key:
            if new in options:
                raise OptionError(f"mixer {name!r}: {key} is the old name of {new}; give {new} only")
            warnings.warn(f"mixer {name!r}: option {key} is now called {new}; write {new}=...",
                          FutureWarning, stacklevel=3)
        out[new] = value
    return out


def make_config(name: str, d_model: int, **options: Any) -> MixerConfig:
    """The config of mixer ``name`` at width ``d_model`` with ``options`` set (names checked; old
    names of renamed options are accepted, see :func:`upgrade_options`)."""
    spec = get_spec(name)
    options = upgrade_options(name, options)
    names = {f.name for f in dataclasses.fields(spec.config) if f.init}
    unknown = set(options) - names
    if unknown:
        raise OptionError(f"mixer {name!r} has no option(s) {sorted(unknown)}; its options are {sorted(names - {'d_model'})}")
    from ..configs import apply
    try:
        options = apply(spec.config, options, f"mixer {name!r}")
    except ValueError as e:  # a value of the wrong type: an OptionError, like an unknown name
        raise OptionError(str(e)) from None
    return spec.config(d_model=d_model, **options)


def build_mixer(name: str, d_model: int, **options: Any) -> Mixer:
    """Build mixer ``name`` of width ``d_model``; extra keyword arguments set config fields.

    >>> layer = build_mixer("attention", d_model=64, num_heads=4)
    """
    return get_spec(name).layer(make_config(name, d_model, **options))


def options_help(name: str) -> list[tuple[str, Any, str]]:
    """The options of mixer ``name``: (field, default, the comment written beside the field in its
    config class), without d_model and derived fields."""
    from ..configs import field_docs
    comments = field_docs(get_spec(name).config)
    rows = []
    for f in dataclasses.fields(get_spec(name).config):
        note = comments.get(f.name, "")
        if f.name == "d_model" or not f.init or note.startswith("derived"):
            continue
        rows.append((f.name, f.default, note))
    return rows


def markdown_table(d_model: int = 256) -> str:
    """The README's mixer table: name, description, paper, state-size formula and bytes per layer
    (float32, batch 1, after 1024 tokens for mixers whose state grows) at width ``d_model``."""
    import torch

    rows = ["| mixer | what it is | paper | state per layer | bytes at d_model=%d | status |" % d_model,
            "|---|---|---|---|---|---|"]
    for name in mixers():
        spec = REGISTRY[name]
        layer = build_mixer(name, d_model)
        if layer.recurrent:
            nbytes = f"{layer.state_size():,}"
        else:
            with torch.no_grad():
                _, st = layer(torch.zeros(1, 1024, d_model))
            nbytes = f"{st.nbytes:,} (T=1024)"
        rows.append(f"| `{name}` | {spec.description} | {spec.paper} | {spec.state_size} | {nbytes} | {spec.status} |")
    return "\n".join(rows)


def update_readme(path: str = "README.md") -> None:
    """Rewrite the mixer table between the ``<!-- mixers:begin/end -->`` markers of ``path``."""
    import re
    from pathlib import Path

    p = Path(path)
    text = re.sub(r"<!-- mixers:begin -->\n.*?<!-- mixers:end -->",
                  lambda _: "<!-- mixers:begin -->\n" + markdown_table() + "\n<!-- mixers:end -->",
                  p.read_text(), flags=re.S)
    p.write_text(text)
