"""Interoperability with Hugging Face ``transformers`` checkpoints (local directories only).

``from_hf(dir)`` reads ``config.json`` + safetensors written by ``transformers`` and returns an
rnnlab :class:`LM` with the same logits; ``to_hf(model, dir)`` writes the reverse. Each supported
architecture is a pair of functions between configs plus a table of parameter-name templates that
maps weights one-to-one in both directions (``{i}`` is the block index). Needs no download; the
``transformers`` package itself is needed only to run the exported model.
"""
from __future__ import annotations

import glob
import itertools
import json
import math
import os
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from safetensors.torch import load_file, save_file

from .lm import LM, LMConfig, atomic_write

__all__ = ["from_hf", "to_hf", "load_tokenizer", "HF_ARCHITECTURES"]


@dataclass(frozen=True)
class _Arch:
    """How one ``transformers`` architecture maps onto rnnlab."""

    hf_class: str  # e.g. "LlamaForCausalLM"
    model_type: str  # config.json's model_type
    to_config: Callable[[dict], LMConfig]  # HF config dict -> LMConfig
    from_config: Callable[[LM], dict]  # rnnlab model -> HF config dict
    names: tuple[tuple[str, str], ...]  # (HF name template, rnnlab name template)


def _check_plain(c: LMConfig, arch: str) -> None:
    """Raise unless ``c`` uses none of the LM options ``arch`` lacks (the Gemma-style ones)."""
    extras = [name for name, plain in (("norm_plus_one", False), ("embed_scale", 1.0), ("logit_softcap", None),
                                        ("mlp_bias", False)) if getattr(c, name) != plain]
    if extras:
        raise ValueError(f"{arch} has no counterpart of {', '.join(extras)} (set to "
                         f"{', '.join(repr(getattr(c, n)) for n in extras)})")


# -- Llama ---------------------------------------------------------------------------------------
def _rope_theta(cfg: dict) -> float:
    params = cfg.get("rope_parameters") or {}
    if (cfg.get("rope_scaling") or {}).get("rope_type", "default") not in ("default", None) or \
            params.get("rope_type", "default") != "default":
        raise ValueError("rope scaling is not supported (only the default RoPE)")
    return float(params.get("rope_theta", cfg.get("rope_theta", 10000.0)))


def _llama_config(cfg: dict) -> LMConfig:
    if cfg.get("hidden_act", "silu") != "silu" or cfg.get("mlp_bias", False):
        raise ValueError("only SiLU MLPs without bias are supported")
    H = cfg["num_attention_heads"]
    K = cfg.get("head_dim") or cfg["hidden_size"] // H
    att = (f"attention(num_heads={H},num_kv_heads={cfg.get('num_key_value_heads') or H},head_dim={K},"
           f"rope_theta={_rope_theta(cfg)!r},bias={bool(cfg.get('attention_bias', False))})")
    return LMConfig(vocab_size=cfg["vocab_size"], d_model=cfg["hidden_size"], n_layers=cfg["num_hidden_layers"],
                    layout=att, mlp="swiglu", d_ff=cfg["intermediate_size"], norm_eps=cfg["rms_norm_eps"],
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _llama_export(model: LM) -> dict:
    c = model.config
    kinds = {b.name for b in c.blocks}
    if kinds != {"attention"} or not c.mixer_mlp or c.mlp != "swiglu":
        raise ValueError(f"only all-attention models with SwiGLU MLPs export to Llama; this one has {sorted(kinds)}")
    _check_plain(c, "Llama")
    a = model.blocks[0].mixer.config
    if a.window is not None or any(b.mixer.config != a for b in model.blocks):
        raise ValueError("Llama export needs full attention with the same config in every block")
    if a.rope_fraction != 1.0 or a.out_bias != a.bias:
        raise ValueError("Llama export needs RoPE on every head dim and the same bias on q, k, v and o")
    return {"architectures": ["LlamaForCausalLM"], "model_type": "llama", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "intermediate_size": c.d_ff, "num_hidden_layers": c.n_layers,
            "num_attention_heads": a.num_heads, "num_key_value_heads": a.num_kv_heads, "head_dim": a.head_dim,
            "hidden_act": "silu", "rms_norm_eps": c.norm_eps, "tie_word_embeddings": c.tie_embeddings,
            "rope_theta": a.rope_theta, "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta},
            "attention_bias": a.bias, "mlp_bias": False, "max_position_embeddings": 1 << 20}


_LLAMA = _Arch("LlamaForCausalLM", "llama", _llama_config, _llama_export, (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.{i}.input_layernorm.weight", "blocks.{i}.mixer_norm.weight"),
    ("model.layers.{i}.self_attn.{p}_proj.{w}", "blocks.{i}.mixer.{p}_proj.{w}"),
    ("model.layers.{i}.post_attention_layernorm.weight", "blocks.{i}.mlp_norm.weight"),
    ("model.layers.{i}.mlp.{p}_proj.weight", "blocks.{i}.mlp.{p}_proj.weight"),
    ("model.norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
))


# -- Mamba and Mamba-2 ---------------------------------------------------------------------------
def _check_silu(cfg: dict) -> None:
    if cfg.get("hidden_act", "silu") != "silu":
        raise ValueError(f"hidden_act={cfg.get('hidden_act')!r} is not supported (only silu)")


def _mamba_config(cfg: dict) -> LMConfig:
    _check_silu(cfg)
    D = cfg["hidden_size"]
    if cfg.get("intermediate_size", cfg["expand"] * D) != cfg["expand"] * D:
        raise ValueError("intermediate_size must equal expand * hidden_size")
    mixer = (f"mamba(d_state={cfg['state_size']},expand={cfg['expand']},conv_size={cfg['conv_kernel']},"
             f"dt_rank={cfg['time_step_rank']},conv_bias={bool(cfg['use_conv_bias'])},bias={bool(cfg['use_bias'])})")
    return LMConfig(vocab_size=cfg["vocab_size"], d_model=D, n_layers=cfg["num_hidden_layers"], layout=mixer,
                    mixer_mlp=False, norm_eps=cfg["layer_norm_epsilon"],
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _mamba2_config(cfg: dict) -> LMConfig:
    _check_silu(cfg)
    limit = [float(v["__float__"]) if isinstance(v, dict) else float(v)  # JSON spells inf as a dict
             for v in cfg.get("time_step_limit", (0.0, float("inf")))]
    if limit != [0.0, float("inf")]:
        raise ValueError("a time_step_limit other than (0, inf) is not supported")
    if not cfg.get("rms_norm", True):
        raise ValueError("rms_norm=False is not supported")
    D, P = cfg["hidden_size"], cfg["head_dim"]
    if cfg["num_heads"] * P != cfg["expand"] * D:
        raise ValueError("num_heads * head_dim must equal expand * hidden_size")
    mixer = (f"mamba2(d_state={cfg['state_size']},expand={cfg['expand']},head_dim={P},n_groups={cfg['n_groups']},"
             f"conv_size={cfg['conv_kernel']},conv_bias={bool(cfg['use_conv_bias'])},bias={bool(cfg['use_bias'])},"
             f"norm_eps={cfg['layer_norm_epsilon']!r})")
    return LMConfig(vocab_size=cfg["vocab_size"], d_model=D, n_layers=cfg["num_hidden_layers"], layout=mixer,
                    mixer_mlp=False, norm_eps=cfg["layer_norm_epsilon"],
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", False)))


def _uniform_mixer(model: LM, name: str, mlp: bool = False):
    """The mixer config shared by every block of a pure ``name`` stack (with an MLP in every block
    when ``mlp``, else none); only logit soft-capping among the Gemma options, and only with ``mlp``."""
    c = model.config
    if {b.name for b in c.blocks} != {name} or c.mixer_mlp != mlp:
        raise ValueError(f"only pure {name} stacks {'with' if mlp else 'without'} MLPs export to this architecture")
    _check_plain(LMConfig(**{**c.to_dict(), "logit_softcap": None}) if mlp else c, name)
    m = model.blocks[0].mixer.config
    if any(b.mixer.config != m for b in model.blocks):
        raise ValueError(f"every {name} block must have the same config to export")
    return m


def _mamba_export(model: LM) -> dict:
    m, c = _uniform_mixer(model, "mamba"), model.config
    if m.allow_neg_eigval:
        raise ValueError("allow_neg_eigval has no transformers counterpart")
    return {"architectures": ["MambaForCausalLM"], "model_type": "mamba", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "state_size": m.d_state,
            "expand": m.expand, "intermediate_size": m.d_inner, "conv_kernel": m.conv_size,
            "time_step_rank": m.dt_rank, "use_conv_bias": m.conv_bias, "use_bias": m.bias,
            "layer_norm_epsilon": c.norm_eps, "hidden_act": "silu", "tie_word_embeddings": c.tie_embeddings,
            "residual_in_fp32": True}


def _mamba2_export(model: LM) -> dict:
    m, c = _uniform_mixer(model, "mamba2"), model.config
    if m.norm_eps != c.norm_eps:
        raise ValueError("transformers' Mamba-2 uses one epsilon for both norms; set them equal")
    return {"architectures": ["Mamba2ForCausalLM"], "model_type": "mamba2", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "num_hidden_layers": c.n_layers, "state_size": m.d_state,
            "expand": m.expand, "head_dim": m.head_dim, "num_heads": m.num_heads, "n_groups": m.n_groups,
            "conv_kernel": m.conv_size, "use_conv_bias": m.conv_bias, "use_bias": m.bias,
            "layer_norm_epsilon": c.norm_eps, "hidden_act": "silu", "rms_norm": True,
            "tie_word_embeddings": c.tie_embeddings, "time_step_limit": [0.0, float("inf")],
            "residual_in_fp32": True}


_MAMBA_NAMES = (
    ("backbone.embeddings.weight", "embed.weight"),
    ("backbone.layers.{i}.norm.weight", "blocks.{i}.mixer_norm.weight"),
    ("backbone.layers.{i}.mixer.conv1d.{w}", "blocks.{i}.mixer.conv1d.conv.{w}"),
    ("backbone.layers.{i}.mixer.{p}_proj.{w}", "blocks.{i}.mixer.{p}_proj.{w}"),
    ("backbone.layers.{i}.mixer.norm.weight", "blocks.{i}.mixer.norm.weight"),
    ("backbone.layers.{i}.mixer.{w}", "blocks.{i}.mixer.{w}"),
    ("backbone.norm_f.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
)
_MAMBA = _Arch("MambaForCausalLM", "mamba", _mamba_config, _mamba_export, _MAMBA_NAMES)
_MAMBA2 = _Arch("Mamba2ForCausalLM", "mamba2", _mamba2_config, _mamba2_export, _MAMBA_NAMES)


# -- RecurrentGemma (Griffin / Hawk) -------------------------------------------------------------
# transformers' RecurrentGemmaForCausalLM is rnnlab's LM with the Gemma options: the embedding
# scaled by sqrt(D) rounded to bfloat16 (transformers keeps the factor in a bfloat16 buffer),
# RMSNorm (1 + w), a GeGLU MLP with biases (intermediate_size / 2 wide), soft-capped logits, and
# its block_types cycled over the layers as the layout: "recurrent" is rg_lru, "attention" is swa
# with partial RoPE and a bias on the output projection only.
def _gemma_embed_scale(d_model: int) -> float:
    return float(torch.tensor(math.sqrt(d_model), dtype=torch.bfloat16))


def _rope_of(cfg: dict) -> tuple[float, float]:
    """(rope_theta, partial_rotary_factor) of a RecurrentGemma config (new or old spelling)."""
    params = cfg.get("rope_parameters") or {}
    if params.get("rope_type", "default") != "default" or (cfg.get("rope_scaling") or {}).get("rope_type") not in (None, "default"):
        raise ValueError("rope scaling is not supported (only the default RoPE)")
    theta = params.get("rope_theta", cfg.get("rope_theta", 10000.0))
    frac = params.get("partial_rotary_factor", cfg.get("partial_rotary_factor", 0.5))
    return float(theta), float(frac)


def _recurrent_gemma_config(cfg: dict) -> LMConfig:
    act = cfg.get("hidden_activation", "gelu_pytorch_tanh")
    if act != "gelu_pytorch_tanh":
        raise ValueError(f"hidden_activation={act!r} is not supported (only gelu_pytorch_tanh)")
    D, H, n = cfg["hidden_size"], cfg["num_attention_heads"], cfg["num_hidden_layers"]
    G, E = cfg.get("num_key_value_heads") or H, cfg.get("lru_width") or D
    theta, frac = _rope_of(cfg)
    cap = cfg.get("logits_soft_cap", 30.0)
    rec = f"rg_lru(lru_width={E},num_heads={H},conv_size={cfg.get('conv1d_width', 4)},init_layers={n})"
    att = (f"swa(window={cfg.get('attention_window_size', 2048)},num_heads={H},num_kv_heads={G},head_dim={D // H},"
           f"rope_theta={theta!r},rope_fraction={frac!r},bias={bool(cfg.get('attention_bias', False))},out_bias=True)")
    kinds = list(cfg.get("block_types") or ("recurrent", "recurrent", "attention"))[:n]
    unknown = sorted(set(kinds) - {"recurrent", "attention"})
    if unknown:
        raise ValueError(f"block_types {unknown} are not supported (only 'recurrent' and 'attention')")
    runs = [(k, len(list(g))) for k, g in itertools.groupby(kinds)]
    layout = ",".join((rec if k == "recurrent" else att) + (f"*{m}" if m > 1 else "") for k, m in runs)
    return LMConfig(vocab_size=cfg["vocab_size"], d_model=D, n_layers=n, layout=layout, mlp="geglu",
                    d_ff=cfg["intermediate_size"] // 2, mlp_bias=True, norm_eps=cfg.get("rms_norm_eps", 1e-6),
                    norm_plus_one=True, embed_scale=_gemma_embed_scale(D),
                    logit_softcap=None if cap is None else float(cap),
                    tie_embeddings=bool(cfg.get("tie_word_embeddings", True)))


def _recurrent_gemma_export(model: LM) -> dict:
    c = model.config
    rec = [b.mixer.config for b in model.blocks if b.name == "rg_lru"]
    att = [b.mixer.config for b in model.blocks if b.name in ("swa", "attention")]
    if len(rec) + len(att) != c.n_layers:
        raise ValueError(f"RecurrentGemma has rg_lru and local attention blocks only; this model has "
                         f"{sorted({b.name for b in c.blocks})}")
    wanted = dict(mixer_mlp=True, mlp="geglu", mlp_bias=True, norm_plus_one=True,
                  embed_scale=_gemma_embed_scale(c.d_model))
    wrong = [f"{k}={getattr(c, k)!r} (needs {v!r})" for k, v in wanted.items() if getattr(c, k) != v]
    if c.logit_softcap is None:
        wrong.append("logit_softcap=None (needs a cap)")
    if wrong:
        raise ValueError(f"RecurrentGemma export needs the Gemma options: {'; '.join(wrong)}")
    if any(r != rec[0] for r in rec) or any(a != att[0] for a in att):
        raise ValueError("RecurrentGemma export needs the same config in every rg_lru block and in every attention block")
    r, a = (rec or [None])[0], (att or [None])[0]
    if r is not None and r.c != 8.0:
        raise ValueError(f"RecurrentGemma fixes the RG-LRU's c at 8, this model has c={r.c}")
    if a is not None:
        if a.window is None or a.sinks or a.head_dim != c.d_model // a.num_heads or not a.out_bias:
            raise ValueError("RecurrentGemma's attention is a sliding window without sinks, head_dim = "
                             "d_model // num_heads and a bias on the output projection")
        if r is not None and r.num_heads != a.num_heads:
            raise ValueError(f"RecurrentGemma uses one head count for the RG-LRU gates and the attention; "
                             f"this model has {r.num_heads} and {a.num_heads}")
    H = a.num_heads if a is not None else r.num_heads
    return {"architectures": ["RecurrentGemmaForCausalLM"], "model_type": "recurrent_gemma",
            "vocab_size": c.vocab_size, "hidden_size": c.d_model, "intermediate_size": 2 * c.d_ff,
            "num_hidden_layers": c.n_layers, "num_attention_heads": H,
            "num_key_value_heads": a.num_kv_heads if a is not None else H, "head_dim": c.d_model // H,
            "lru_width": r.lru_width if r is not None else c.d_model,
            "conv1d_width": r.conv_size if r is not None else 4,
            "attention_window_size": a.window if a is not None else 2048,
            "block_types": _period(["recurrent" if b.name == "rg_lru" else "attention" for b in c.blocks]),
            "logits_soft_cap": c.logit_softcap, "rms_norm_eps": c.norm_eps, "hidden_activation": "gelu_pytorch_tanh",
            "rope_parameters": {"rope_type": "default", "rope_theta": a.rope_theta if a is not None else 10000.0,
                                "partial_rotary_factor": a.rope_fraction if a is not None else 0.5},
            "attention_bias": a.bias if a is not None else False, "tie_word_embeddings": c.tie_embeddings,
            "final_w_init_variance_scale": 2.0 / c.n_layers, "w_init_variance_scale": 0.01}


def _period(kinds: list[str]) -> list[str]:
    """The shortest pattern that, cycled, gives ``kinds`` (as RecurrentGemma and rnnlab's layouts cycle)."""
    n = len(kinds)
    return next(kinds[:p] for p in range(1, n + 1) if all(kinds[i] == kinds[i % p] for i in range(n)))


_RECURRENT_GEMMA = _Arch("RecurrentGemmaForCausalLM", "recurrent_gemma", _recurrent_gemma_config,
                         _recurrent_gemma_export, (
    ("model.embed_tokens.weight", "embed.weight"),
    ("model.layers.{i}.temporal_pre_norm.weight", "blocks.{i}.mixer_norm.weight"),
    ("model.layers.{i}.channel_pre_norm.weight", "blocks.{i}.mlp_norm.weight"),
    ("model.layers.{i}.temporal_block.conv_1d.{w}", "blocks.{i}.mixer.conv.conv.{w}"),
    ("model.layers.{i}.temporal_block.rg_lru.recurrent_param", "blocks.{i}.mixer.rg_lru_recurrent_param"),
    ("model.layers.{i}.temporal_block.rg_lru.{p}", "blocks.{i}.mixer.{p}"),  # the gates' weights and biases
    ("model.layers.{i}.temporal_block.{p}.{w}", "blocks.{i}.mixer.{p}.{w}"),  # linear_x/y/out, q/k/v/o_proj
    ("model.layers.{i}.mlp_block.{p}_proj.{w}", "blocks.{i}.mlp.{p}_proj.{w}"),
    ("model.final_norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
))


# -- xLSTM (xLSTM 7B) ----------------------------------------------------------------------------
# transformers' xLSTMForCausalLM: mlstm7b blocks, each with a SwiGLU MLP of width
# round_up(ffn_proj_factor · D, ffn_round_up_to_multiple_of), plain RMSNorms, an untied head (its
# class never ties it) and soft-capped logits.
def _xlstm_config(cfg: dict) -> LMConfig:
    if cfg.get("weight_mode", "single") != "single":
        raise ValueError(f"weight_mode={cfg.get('weight_mode')!r} is not supported (only 'single')")
    if cfg.get("use_bias", False):
        raise ValueError("use_bias=True is not supported (rnnlab's RMSNorm has no bias)")
    D = cfg.get("hidden_size") or cfg["embedding_dim"]
    n = cfg.get("num_hidden_layers") or cfg["num_blocks"]
    mult = cfg.get("ffn_round_up_to_multiple_of", 64)
    d_ff = int(((D * cfg.get("ffn_proj_factor", 2.667) + mult - 1) // mult) * mult)
    cap, gate_cap = cfg.get("output_logit_soft_cap", 30.0), cfg.get("gate_soft_cap", 15.0)
    mixer = (f"mlstm7b(num_heads={cfg.get('num_heads', 8)},qk_dim_factor={float(cfg.get('qk_dim_factor', 0.5))!r},"
             f"v_dim_factor={float(cfg.get('v_dim_factor', 1.0))!r},"
             f"gate_softcap={None if gate_cap is None else float(gate_cap)!r},eps={float(cfg.get('eps', 1e-6))!r},"
             f"norm_eps={float(cfg.get('norm_eps', 1e-6))!r},init_layers={n})")
    return LMConfig(vocab_size=cfg["vocab_size"], d_model=D, n_layers=n, layout=mixer, mlp="swiglu", d_ff=d_ff,
                    norm_eps=float(cfg.get("norm_eps", 1e-6)), logit_softcap=None if cap is None else float(cap),
                    tie_embeddings=False)


def _xlstm_export(model: LM) -> dict:
    c = model.config
    m = _uniform_mixer(model, "mlstm7b", mlp=True)
    if c.mlp != "swiglu" or c.tie_embeddings or m.bias:
        raise ValueError("xLSTM export needs SwiGLU MLPs, an untied head and no biases in the mLSTM layers")
    if m.norm_eps != c.norm_eps:
        raise ValueError("transformers' xLSTM uses one norm_eps for the RMSNorms and the heads' layer norm; set them equal")
    return {"architectures": ["xLSTMForCausalLM"], "model_type": "xlstm", "vocab_size": c.vocab_size,
            "hidden_size": c.d_model, "embedding_dim": c.d_model, "num_hidden_layers": c.n_layers,
            "num_blocks": c.n_layers, "num_heads": m.num_heads, "qk_dim_factor": m.qk_dim_factor,
            "v_dim_factor": m.v_dim_factor, "gate_soft_cap": m.gate_softcap, "eps": m.eps, "norm_eps": c.norm_eps,
            "use_bias": False, "weight_mode": "single", "add_out_norm": True, "tie_word_embeddings": False,
            "ffn_proj_factor": c.d_ff / c.d_model, "ffn_round_up_to_multiple_of": 64 if c.d_ff % 64 == 0 else c.d_ff,
            "output_logit_soft_cap": c.logit_softcap, "autocast_kernel_dtype": "float32",
            "inference_state_dtype": "float32", "mode": "inference"}


_XLSTM = _Arch("xLSTMForCausalLM", "xlstm", _xlstm_config, _xlstm_export, (
    ("backbone.embeddings.weight", "embed.weight"),
    ("backbone.blocks.{i}.norm_mlstm.weight", "blocks.{i}.mixer_norm.weight"),
    ("backbone.blocks.{i}.norm_ffn.weight", "blocks.{i}.mlp_norm.weight"),
    ("backbone.blocks.{i}.mlstm_layer.{p}.{w}", "blocks.{i}.mixer.{p}.{w}"),
    ("backbone.blocks.{i}.ffn.proj_up_gate.weight", "blocks.{i}.mlp.gate_proj.weight"),
    ("backbone.blocks.{i}.ffn.proj_up.weight", "blocks.{i}.mlp.up_proj.weight"),
    ("backbone.blocks.{i}.ffn.proj_down.weight", "blocks.{i}.mlp.down_proj.weight"),
    ("backbone.out_norm.weight", "norm.weight"),
    ("lm_head.weight", "lm_head.weight"),
))

HF_ARCHITECTURES: dict[str, _Arch] = {a.hf_class: a for a in (_LLAMA, _MAMBA, _MAMBA2, _RECURRENT_GEMMA, _XLSTM)}


# -- the generic machinery -----------------------------------------------------------------------
def _template_regex(template: str) -> re.Pattern:
    out = re.escape(template)
    for key in ("i", "p", "w"):
        out = out.replace(re.escape("{" + key + "}"), f"(?P<{key}>[A-Za-z0-9_]+)")
    return re.compile(f"^{out}$")


def _rename(name: str, table: tuple[tuple[str, str], ...], src: int) -> str | None:
    for pair in table:
        m = _template_regex(pair[src]).match(name)
        if m:
            return pair[1 - src].format(**m.groupdict())
    return None


def _arch_of(cfg: dict, path) -> _Arch:
    archs = cfg.get("architectures") or []
    for name in archs:
        if name in HF_ARCHITECTURES:
            return HF_ARCHITECTURES[name]
    for a in HF_ARCHITECTURES.values():
        if cfg.get("model_type") == a.model_type:
            return a
    raise ValueError(f"{path}: unsupported architecture {archs or cfg.get('model_type')!r}; "
                     f"supported: {', '.join(HF_ARCHITECTURES)}")


def from_hf(path: str | os.PathLike, dtype: torch.dtype = torch.float32) -> LM:
    """Load a ``transformers`` checkpoint directory (config.json + *.safetensors) as an rnnlab LM."""
    cfg_path = Path(path) / "config.json"
    if not cfg_path.is_file():
        raise FileNotFoundError(f"{path}: no config.json (expected a directory saved by transformers)")
    cfg = json.loads(cfg_path.read_text())
    arch = _arch_of(cfg, path)
    files = sorted(glob.glob(os.path.join(path, "*.safetensors")))
    if not files:
        raise FileNotFoundError(f"{path}: no *.safetensors weights (pytorch_model.bin is not read)")
    hf = {}
    for f in files:
        hf.update(load_file(f))
    model = LM(arch.to_config(cfg))
    sd = {}
    for name, t in hf.items():
        new = _rename(name, arch.names, 0)
        if new is None:
            raise ValueError(f"{path}: weight {name!r} does not map onto rnnlab's {arch.hf_class} layout")
        sd[new] = t
    if model.config.tie_embeddings:
        sd.pop("lm_head.weight", None)
        sd["lm_head.weight"] = sd["embed.weight"]
    missing, unexpected = model.load_state_dict(sd, strict=False)
    if missing or unexpected:
        raise ValueError(f"{path}: weights do not fit: missing {missing}, unexpected {unexpected}")
    return model.to(dtype)


def to_hf(model: LM, path: str | os.PathLike) -> None:
    """Write ``model`` as a ``transformers`` checkpoint directory (config.json + model.safetensors)."""
    arch = next((a for a in HF_ARCHITECTURES.values() if _exportable(a, model)), None)
    if arch is None:
        raise ValueError(f"no Hugging Face architecture fits layout {model.config.layout!r}; "
                         f"supported: {', '.join(HF_ARCHITECTURES)}")
    os.makedirs(path, exist_ok=True)
    cfg = arch.from_config(model)
    tensors = {}
    for name, t in model.state_dict().items():
        if model.config.tie_embeddings and name == "lm_head.weight":
            continue
        new = _rename(name, arch.names, 1)
        if new is None:
            raise ValueError(f"parameter {name!r} has no {arch.hf_class} counterpart")
        tensors[new] = t.detach().contiguous()
    atomic_write(Path(path) / "model.safetensors", lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    atomic_write(Path(path) / "config.json", lambda p: Path(p).write_text(json.dumps(cfg, indent=2) + "\n"))


def _exportable(arch: _Arch, model: LM) -> bool:
    try:
        arch.from_config(model)
        return True
    except ValueError:
        return False


def load_tokenizer(path: str | os.PathLike):
    """The ``tokenizer.json`` of a model directory as an :class:`rnnlab.data.HFTokenizer` (for a
    checkpoint ``RUN/checkpoints/step_N``, the run's), else the byte tokenizer."""
    from ..data.tokenizer import ByteTokenizer, HFTokenizer
    d = Path(path)
    places = [d] + ([d.parent.parent] if d.parent.name == "checkpoints" else [])
    for file in (p / "tokenizer.json" for p in places):
        if file.is_file():
            return HFTokenizer(file)
    return ByteTokenizer()
