"""The language model: embedding -> blocks (norm -> mixer -> residual, norm -> MLP -> residual)
-> norm -> tied output head.

``logits, state = model(tokens, state=None, cu_seqlens=None)``: tokens (B, T) int64 -> logits
(B, T, V) and a :class:`ModelState` (one state per block plus each row's count of tokens seen); with
``cu_seqlens`` one row packs several sequences, each with its own state row. The model obeys the
chunking law of its mixers: feeding a sequence in pieces, passing the state, equals one call.

Gemma-style options (all off by default): ``embed_scale`` multiplies the embedding,
``norm_plus_one`` makes every RMSNorm of the model scale by (1 + w), ``mlp="geglu"`` with
``mlp_bias`` is Gemma's MLP and ``logit_softcap`` bounds the logits by c·tanh(logits / c) — with
``rg_lru`` and partial-RoPE ``swa`` layouts they make Griffin and Hawk (RecurrentGemma).

Parameters: each mixer initialises its own (as its paper's reference does) and names those that
skip weight decay; the model initialises only what it owns — embedding, MLPs, norms, head — and
builds its blocks first, so for the same seed the first block's mixer starts from the same weights
as ``build_mixer`` alone. :meth:`LM.param_groups` gives the two AdamW groups.

Memory: with ``model.recompute = True`` a call that records autograd keeps only each block's input
(B, T, D) and runs the block again in the backward (activation checkpointing), so training holds
one block's intermediates at a time instead of every block's, for about one more forward's time.
"""
from __future__ import annotations

import itertools
import json
import math
import os
import tempfile
from dataclasses import dataclass, field, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn
from torch.utils.checkpoint import checkpoint

from ..layers.base import Mixer, check_prefix_len, check_tokens_input
from ..ops.bounds import check_cu_seqlens, state_rows
from ..layers.common import NORM_TYPES, RMSNorm
from ..layers.state import State, StateError
from .layout import BlockSpec, parse_layout, upgrade_layout
from .registry import OptionError, build_mixer

__all__ = ["LMConfig", "LM", "ModelState", "MLP", "build_model", "load_model", "atomic_write", "is_temp",
           "FORMAT_VERSION"]

FORMAT_VERSION = 1


@dataclass
class LMConfig:
    """Configuration of :class:`LM`. ``blocks`` is derived from ``layout`` and ``n_layers``."""

    vocab_size: int = 260  # token ids in [0, vocab_size); 260 = bytes + 4 specials
    d_model: int = 256  # model width D
    n_layers: int = 4  # number of blocks; the layout pattern is cycled over them
    layout: str = "attention"  # mixer pattern, e.g. "gated_deltanet*3,attention" (see models/layout.py)
    mlp: str = "swiglu"  # MLP kind: "swiglu", "geglu" (tanh-GELU gate, Gemma/RecurrentGemma) or "gelu"
    d_ff: int | None = None  # MLP hidden width; None = 8/3·D (swiglu, geglu) or 4·D (gelu), rounded up to 64
    mlp_bias: bool = False  # biases in the MLP's projections (RecurrentGemma: True)
    mixer_mlp: bool = True  # every mixer block also has an MLP (False: Mamba-style stacks, explicit "mlp" items)
    norm_eps: float = 1e-5  # RMSNorm epsilon
    norm_plus_one: bool = False  # the model's RMSNorms scale by (1 + w), w initialised to 0 (Gemma); False: by w, initialised to 1
    embed_scale: float = 1.0  # the embedding is multiplied by this before the first block (Gemma: sqrt(D); RecurrentGemma: sqrt(D) rounded to bfloat16)
    logit_softcap: float | None = None  # logits = c·tanh(logits / c) with c this cap (RecurrentGemma: 30); None = no cap
    tie_embeddings: bool = True  # output head shares the embedding matrix
    init_std: float = 0.02  # std of embedding, MLP, untied head (down_proj /sqrt(2·n_layers)); mixers init their own
    blocks: tuple[BlockSpec, ...] = field(init=False, repr=False)  # derived: one spec per block

    def __post_init__(self) -> None:
        for name in ("vocab_size", "d_model", "n_layers"):
            if not isinstance(getattr(self, name), int) or getattr(self, name) < 1:
                raise ValueError(f"{name} must be an int >= 1, got {getattr(self, name)!r}")
        if self.d_ff is not None and (not isinstance(self.d_ff, int) or self.d_ff < 1):
            raise ValueError(f"d_ff must be an int >= 1 or None, got {self.d_ff!r}")
        for name in ("norm_eps", "init_std", "embed_scale") + (("logit_softcap",) if self.logit_softcap is not None else ()):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value < math.inf:
                raise ValueError(f"{name} must be a finite number > 0, got {value!r}")
        for name in ("mlp_bias", "norm_plus_one"):
            if not isinstance(getattr(self, name), bool):
                raise ValueError(f"{name} must be true or false, got {getattr(self, name)!r}")
        if self.mlp not in MLP.KINDS:
            raise ValueError(f"mlp must be one of {', '.join(map(repr, MLP.KINDS))}, got {self.mlp!r}")
        if self.d_ff is None:
            raw = 4 * self.d_model if self.mlp == "gelu" else 8 * self.d_model / 3
            self.d_ff = int(64 * math.ceil(raw / 64))
        self.layout = upgrade_layout(self.layout)  # renamed mixer options: saved under their new names
        self.blocks = parse_layout(self.layout, self.n_layers, self.d_model)

    def to_dict(self) -> dict:
        """The JSON-able fields (without the derived ``blocks``)."""
        return {f.name: getattr(self, f.name) for f in fields(self) if f.init}


@dataclass(frozen=True)
class ModelState:
    """The state of a whole model: one state per block (None for MLP-only blocks) and the position
    of each row. Rows are sequences: they can be selected, split and concatenated, and each sits at
    its own position (a ragged batch: prompts of different lengths, packed calls)."""

    layers: tuple[State | None, ...]
    seen: torch.Tensor  # (B,) int64 tokens seen by each row: the position of its next token (an int
    # given here is every row's)

    def __post_init__(self) -> None:
        rows = self.batch_size
        seen = self.seen
        if isinstance(seen, int) and not isinstance(seen, bool):
            device = next((t.device for s in self.layers if s is not None for t in s.tensors().values()), None)
            seen = torch.full((1 if rows is None else rows,), seen, dtype=torch.int64, device=device)
        if not isinstance(seen, torch.Tensor) or seen.dtype != torch.int64 or seen.dim() != 1:
            what = f"{seen.dtype} tensor of shape {tuple(seen.shape)}" if isinstance(seen, torch.Tensor) else repr(seen)
            raise StateError(f"ModelState.seen must be a (B,) int64 tensor (or an int), got {what}")
        if rows is not None and seen.shape[0] != rows:
            raise StateError(f"ModelState.seen has {seen.shape[0]} rows, its layer states {rows}")
        object.__setattr__(self, "seen", seen)

    @property
    def batch_size(self) -> int | None:
        """Rows of the layer states (None when every block is an MLP)."""
        return next((s.batch_size for s in self.layers if s is not None), None)

    @property
    def nbytes(self) -> int:
        """Bytes held by all layer states."""
        return sum(s.nbytes for s in self.layers if s is not None)

    def to(self, device=None, dtype: torch.dtype | None = None) -> "ModelState":
        """A copy moved to ``device`` / cast to ``dtype`` (floating tensors only)."""
        return ModelState(tuple(None if s is None else s.to(device, dtype) for s in self.layers), self.seen.to(device))

    def detach(self) -> "ModelState":
        """A copy cut from the autograd graph."""
        return ModelState(tuple(None if s is None else s.detach() for s in self.layers), self.seen)

    def select(self, rows) -> "ModelState":
        """The state of the sequences ``rows`` (batch indices or a slice), every layer alike."""
        layers = tuple(None if s is None else s.select(rows) for s in self.layers)
        if isinstance(rows, slice):
            return ModelState(layers, self.seen[rows])
        return ModelState(layers, self.seen.index_select(0, torch.as_tensor(rows, dtype=torch.long,
                                                                             device=self.seen.device)))

    def split(self, sizes: int | list[int] = 1) -> list["ModelState"]:
        """The state cut along the batch into pieces of ``sizes`` rows (an int: equal pieces)."""
        B = self.seen.shape[0]
        if not isinstance(sizes, int) and sum(sizes) != B or isinstance(sizes, int) and sizes < 1:
            raise StateError(f"split sizes {sizes} do not add up to the batch size {B}")
        parts = [None if s is None else s.split(sizes) for s in self.layers]
        seen = self.seen.split(sizes)
        return [ModelState(tuple(None if p is None else p[i] for p in parts), t) for i, t in enumerate(seen)]

    @staticmethod
    def cat(states: list["ModelState"]) -> "ModelState":
        """One state whose rows are those of ``states`` in order, each at its own position."""
        if not states:
            raise StateError("ModelState.cat needs at least one state")
        layers = tuple(None if group[0] is None else type(group[0]).cat(list(group))
                       for group in zip(*(st.layers for st in states)))
        return ModelState(layers, torch.cat([st.seen for st in states]))


class MLP(nn.Module):
    """The MLP: (B, T, D) -> (B, T, D), one of

    * ``"swiglu"``: ``down(silu(gate(x)) * up(x))`` (Llama);
    * ``"geglu"``: ``down(gelu_tanh(gate(x)) * up(x))`` (Gemma, RecurrentGemma), GELU's tanh form;
    * ``"gelu"``: ``down(gelu(up(x)))`` (GPT-2), GELU's exact form.
    """

    KINDS = ("swiglu", "geglu", "gelu")

    def __init__(self, d_model: int, d_ff: int, kind: str = "swiglu", bias: bool = False):
        super().__init__()
        self.kind = kind
        if kind != "gelu":
            self.gate_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.up_proj = nn.Linear(d_model, d_ff, bias=bias)
        self.down_proj = nn.Linear(d_ff, d_model, bias=bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.kind == "gelu":
            h = F.gelu(self.up_proj(x))  # (B, T, F)
        elif self.kind == "geglu":
            h = F.gelu(self.gate_proj(x), approximate="tanh") * self.up_proj(x)
        else:
            h = F.silu(self.gate_proj(x)) * self.up_proj(x)
        return self.down_proj(h)


class Block(nn.Module):
    """Pre-norm residual block: x + mixer(norm(x)), then x + mlp(norm(x)); either part optional."""

    def __init__(self, spec: BlockSpec, config: LMConfig):
        super().__init__()
        self.name = spec.name
        has_mixer = spec.name != "mlp"
        self.mixer_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_plus_one) if has_mixer else None
        self.mixer: Mixer | None = build_mixer(spec.name, config.d_model, **dict(spec.options)) if has_mixer else None
        has_mlp = not has_mixer or config.mixer_mlp
        self.mlp_norm = RMSNorm(config.d_model, config.norm_eps, config.norm_plus_one) if has_mlp else None
        self.mlp = MLP(config.d_model, config.d_ff, config.mlp, config.mlp_bias) if has_mlp else None

    def forward(self, x: torch.Tensor, state: State | None, cu_seqlens: torch.Tensor | None = None,
                prefix_len: torch.Tensor | None = None) -> tuple[torch.Tensor, State | None]:
        if self.mixer is not None:  # LM.forward has checked the tokens, cu_seqlens, prefix_len and the state
            y, state = self.mixer.call_mix(self.mixer_norm(x), state, cu_seqlens, prefix_len)
            x = x + y
        if self.mlp is not None:
            x = x + self.mlp(self.mlp_norm(x))
        return x, state


class LM(nn.Module):
    """A causal language model over any layout of mixers. See the module docstring."""

    def __init__(self, config: LMConfig):
        super().__init__()
        self.config = config
        # the blocks draw their random numbers first: block 0's mixer starts as build_mixer(...) would
        blocks = nn.ModuleList(Block(spec, config) for spec in config.blocks)
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.blocks = blocks
        self.norm = RMSNorm(config.d_model, config.norm_eps, config.norm_plus_one)
        self.lm_head = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        self.recompute = False  # run each block again in the backward instead of keeping its activations
        self.reset_parameters()

    # -- parameters -----------------------------------------------------------------------------
    def reset_parameters(self) -> None:
        """Initialise what the model owns (the mixers initialise themselves): embedding and untied
        head N(0, init_std); MLP weights N(0, init_std), their down_proj scaled by
        1/sqrt(2·n_layers), biases zero; every norm the identity (weight 1, or 0 with norm_plus_one)."""
        std = self.config.init_std
        nn.init.normal_(self.embed.weight, 0.0, std)
        if self.lm_head.weight is not self.embed.weight:
            nn.init.normal_(self.lm_head.weight, 0.0, std)
        self.norm.reset_parameters()
        for block in self.blocks:
            for norm in (block.mixer_norm, block.mlp_norm):
                if norm is not None:
                    norm.reset_parameters()
            if block.mlp is not None:
                for name, lin in block.mlp.named_children():
                    scale = 1 / math.sqrt(2 * self.config.n_layers) if name == "down_proj" else 1.0
                    nn.init.normal_(lin.weight, 0.0, std * scale)
                    if lin.bias is not None:
                        nn.init.zeros_(lin.bias)

    def no_weight_decay(self) -> set[str]:
        """Names (as in ``named_parameters()``) of the parameters that skip weight decay: every
        mixer's :meth:`~rnnlab.layers.base.Mixer.no_weight_decay` and, of what the model owns, the
        norm weights and any biases. The embedding (tied to the head by default) is decayed, as
        in GPT-2 / nanoGPT."""
        names: set[str] = set()
        for i, block in enumerate(self.blocks):
            if block.mixer is not None:
                names |= {f"blocks.{i}.mixer.{n}" for n in block.mixer.no_weight_decay()}
        owned = [("embed", self.embed), ("norm", self.norm), ("lm_head", self.lm_head)]
        for i, block in enumerate(self.blocks):
            owned += [(f"blocks.{i}.{part}", getattr(block, part)) for part in ("mixer_norm", "mlp_norm", "mlp")
                      if getattr(block, part) is not None]
        for path, module in owned:
            for mname, m in module.named_modules(prefix=path):
                if isinstance(m, NORM_TYPES):
                    names |= {f"{mname}.{n}" for n, _ in m.named_parameters(recurse=False)}
                elif isinstance(m, nn.Linear) and m.bias is not None:
                    names.add(f"{mname}.bias")
        return names

    def param_groups(self, weight_decay: float) -> list[dict]:
        """The two AdamW parameter groups: ``[{"params": decayed, "weight_decay": weight_decay},
        {"params": not decayed, "weight_decay": 0.0}]``, the latter holding :meth:`no_weight_decay`.
        Every parameter is in exactly one group; the tied embedding/head counts once."""
        if isinstance(weight_decay, bool) or not isinstance(weight_decay, (int, float)) or not weight_decay >= 0:
            raise ValueError(f"weight_decay must be a float >= 0, got {weight_decay!r}")
        skip = self.no_weight_decay()
        decay, no_decay = [], []
        for name, p in self.named_parameters():  # shared (tied) tensors once
            (no_decay if name in skip else decay).append(p)
        return [{"params": decay, "weight_decay": float(weight_decay)},
                {"params": no_decay, "weight_decay": 0.0}]

    def num_params(self, non_embedding: bool = False) -> int:
        """Parameter count (shared tensors counted once); optionally without the embedding."""
        seen, n = set(), 0
        for p in self.parameters():
            if id(p) not in seen:
                seen.add(id(p))
                n += p.numel()
        if non_embedding:
            n -= self.embed.weight.numel()
        return n

    # -- the contract ---------------------------------------------------------------------------
    def init_state(self, batch_size: int, device=None, dtype=None) -> ModelState:
        """The state before the first token."""
        return ModelState(tuple(None if b.mixer is None else b.mixer.init_state(batch_size, device, dtype)
                                for b in self.blocks), torch.zeros(batch_size, dtype=torch.int64, device=device))

    def check_state(self, state: ModelState, batch_size: int) -> None:
        """Raise StateError unless ``state`` fits this model and batch size."""
        if not isinstance(state, ModelState):
            raise StateError(f"state must be a ModelState or None, got {type(state).__name__}")
        if len(state.layers) != len(self.blocks):
            raise StateError(f"state has {len(state.layers)} layer states, this model has {len(self.blocks)} blocks")
        for i, (b, s) in enumerate(zip(self.blocks, state.layers)):
            if b.mixer is None:
                if s is not None:
                    raise StateError(f"layer {i} is an MLP block and takes no state, got a {type(s).__name__}")
                continue
            try:
                b.mixer.check_state(s, batch_size)
            except StateError as e:
                raise StateError(f"layer {i} ({b.name}): {e}") from None
        if state.seen.shape[0] != batch_size:
            raise StateError(f"state.seen has {state.seen.shape[0]} rows, expected the batch size {batch_size}")

    def forward(self, tokens: torch.Tensor, state: ModelState | None = None,
                cu_seqlens: torch.Tensor | None = None,
                prefix_len: int | torch.Tensor | None = None) -> tuple[torch.Tensor, ModelState]:
        """tokens (B, T) -> logits (B, T, vocab_size), state after the last token.

        ``cu_seqlens``: None, or int64 (N + 1,) cumulative lengths of N sequences packed in one row
        (B = 1), passed to every mixer: each sequence starts from its own row of ``state`` (N rows;
        None: the initial state), ends in its own row of the returned state, and sees nothing of
        the others (:meth:`rnnlab.layers.base.Mixer.forward`).

        ``prefix_len``: None, an int or one int per row (sequence): the first tokens form a prompt
        that prefix-reading mixers (``jrt``) read non-causally; every other mixer ignores it."""
        check_tokens_input(tokens, self.config.vocab_size)
        B, T = tokens.shape
        cu = check_cu_seqlens(cu_seqlens, B, T)
        prefix = check_prefix_len(prefix_len, B, T, cu, tokens.device)
        if state is not None:
            self.check_state(state, state_rows(B, cu))
        x = self.embed(tokens.long())  # (B, T, D)
        if self.config.embed_scale != 1.0:
            x = x * self.config.embed_scale
        layers = (None,) * len(self.blocks) if state is None else state.layers
        step = self.__dict__.get("_compiled_step")
        if step is not None and T == 1 and cu is None and prefix is None and not torch.is_grad_enabled():
            x, new = _run_segments(step, x, layers)
        else:
            x, new = _run_blocks(self.blocks, x, layers, cu_seqlens, prefix,
                                 recompute=self.recompute and torch.is_grad_enabled())
        logits = self.lm_head(self.norm(x))  # (B, T, V)
        if self.config.logit_softcap is not None:
            cap = self.config.logit_softcap
            logits = torch.tanh(logits / cap) * cap
        seen = torch.zeros(state_rows(B, cu), dtype=torch.int64, device=tokens.device) if state is None else state.seen
        count = T if cu is None else cu_seqlens.to(seen.device).diff()  # () or (N,) tokens per row
        return logits, ModelState(tuple(new), seen + count)

    def compile_step(self, enabled: bool = True) -> "LM":
        """Run the one-token step (``T = 1``, no ``cu_seqlens`` or ``prefix_len``, no autograd:
        decoding) through ``torch.compile``; ``enabled=False`` goes back to eager. Returns the model.

        Consecutive blocks whose mixer ``step_compiles`` become one compiled graph each (a
        recurrent model: one graph); attention-like blocks run eagerly between them. The first
        step compiles (seconds to a minute); a new batch size recompiles once, with the batch
        dimension dynamic from then on. Outputs agree with the eager step to float rounding (the
        compiled graph fuses and reorders the elementwise work). Everything else (prefill, packed
        calls, training) runs as before. Where compiling fails (no C++ compiler), the step runs
        eagerly after one warning."""
        from ..ops.backends import compile_or_eager
        if not enabled:
            self.__dict__.pop("_compiled_step", None)
            return self
        segments = []  # (block indices, their step): runs of blocks that compile, and of blocks that do not
        for compiles, run in itertools.groupby(range(len(self.blocks)), key=lambda i: self.blocks[i].mixer is None
                                               or self.blocks[i].mixer.step_compiles):
            run = list(run)
            step = _blocks_step(self.blocks, run)
            segments.append((run, compile_or_eager(step) if compiles else step))
        self.__dict__["_compiled_step"] = segments  # kept out of the module tree and the state dict
        return self

    # -- generation -----------------------------------------------------------------------------
    def generate(self, prompt: torch.Tensor, max_new_tokens: int, **sampling) -> torch.Tensor:
        """Sample ``max_new_tokens`` after ``prompt`` (B, T); returns (B, max_new_tokens).
        Keyword arguments as in :func:`rnnlab.inference.generate`."""
        from ..inference.generate import generate
        out = list(generate(self, prompt, max_new_tokens, **sampling))
        return torch.stack(out, dim=1) if out else prompt.new_zeros(prompt.shape[0], 0)

    # -- save / load ----------------------------------------------------------------------------
    def save_pretrained(self, directory: str | os.PathLike) -> None:
        """Write ``config.json`` and ``model.safetensors`` to ``directory`` (atomically, each)."""
        os.makedirs(directory, exist_ok=True)
        meta = {"format_version": FORMAT_VERSION, "model_type": "rnnlab.LM", "config": self.config.to_dict()}
        tensors = {k: v.detach().contiguous() for k, v in self.state_dict().items()
                   if not (self.config.tie_embeddings and k == "lm_head.weight")}
        atomic_write(os.path.join(directory, "model.safetensors"),
                      lambda p: save_file(tensors, p, metadata={"format": "pt"}))
        atomic_write(os.path.join(directory, "config.json"),
                      lambda p: Path(p).write_text(json.dumps(meta, indent=2) + "\n"))

    @classmethod
    def from_pretrained(cls, directory: str | os.PathLike, device=None) -> "LM":
        """Load a model written by :meth:`save_pretrained`."""
        cfg_path = os.path.join(directory, "config.json")
        if not os.path.isfile(cfg_path):
            raise FileNotFoundError(f"{directory!s} holds no config.json: not a saved rnnlab model")
        try:
            with open(cfg_path) as f:
                meta = json.load(f)
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise ValueError(f"{cfg_path} is not valid JSON ({e})") from None
        if not isinstance(meta, dict) or meta.get("model_type") != "rnnlab.LM":
            kind = meta.get("model_type") if isinstance(meta, dict) else type(meta).__name__
            raise ValueError(f"{cfg_path} is not an rnnlab model config (model_type={kind!r})")
        if meta.get("format_version", 0) > FORMAT_VERSION:
            raise ValueError(f"{cfg_path} has format version {meta['format_version']}; this rnnlab reads <= {FORMAT_VERSION}")
        try:
            config = LMConfig(**meta["config"])
        except (KeyError, TypeError, ValueError) as e:
            raise ValueError(f"{cfg_path}: invalid model config ({e})") from None
        weights = os.path.join(directory, "model.safetensors")
        try:
            sd = load_file(weights, device=str(device or "cpu"))
        except FileNotFoundError:
            raise FileNotFoundError(f"{directory!s} holds config.json but no model.safetensors") from None
        except (SafetensorError, OSError) as e:
            raise ValueError(f"{weights} cannot be read: truncated or not a safetensors file ({e})") from None
        model = cls(config)
        if model.config.tie_embeddings and "embed.weight" in sd:
            sd["lm_head.weight"] = sd["embed.weight"]
        own = model.state_dict()
        missing, unexpected = sorted(set(own) - set(sd)), sorted(set(sd) - set(own))
        wrong = [k for k in own if k in sd and own[k].shape != sd[k].shape]
        if missing or unexpected or wrong:
            detail = "; ".join(f"{what} {names[:3]}{' ...' if len(names) > 3 else ''}" for what, names in
                               (("missing", missing), ("unexpected", unexpected), ("wrong shape", wrong)) if names)
            raise ValueError(f"{weights} does not fit {cfg_path} ({detail}): the files come from different models")
        model.load_state_dict(sd)
        return model.to(device) if device is not None else model


TEMP_PREFIX = ".tmp"  # names of unfinished writes: ours (``.tmp-*``) and the safetensors writer's own (``.tmpXXXXXX``)


def _run_blocks(blocks, x: torch.Tensor, layers, cu_seqlens=None, prefix=None,
                recompute: bool = False) -> tuple[torch.Tensor, list]:
    """x (B, T, D) through ``blocks`` in order, block i from ``layers[i]``: (x, their new states).
    ``recompute``: each block under ``torch.utils.checkpoint`` (it runs again in the backward)."""
    new = []
    for block, s in zip(blocks, layers):
        if recompute:
            x, s = checkpoint(block, x, s, cu_seqlens, prefix, use_reentrant=False)
        else:
            x, s = block(x, s, cu_seqlens, prefix)
        new.append(s)
    return x, new


def _blocks_step(blocks: nn.ModuleList, indices: list[int]):
    """The one-token step of the blocks ``indices`` of a model, as one function of (x, their states)."""
    chosen = tuple(blocks[i] for i in indices)

    def step(x: torch.Tensor, layers: tuple) -> tuple[torch.Tensor, list]:
        return _run_blocks(chosen, x, layers)
    return step


def _run_segments(segments, x: torch.Tensor, layers) -> tuple[torch.Tensor, list]:
    """The one-token step through :meth:`LM.compile_step`'s segments, each given its blocks' states."""
    new = []
    for indices, run in segments:
        x, s = run(x, tuple(layers[i] for i in indices))
        new += s
    return x, new


def is_temp(path: str | os.PathLike) -> bool:
    """True for a file a killed writer left behind (see :data:`TEMP_PREFIX`); never a finished file."""
    return os.path.basename(path).startswith(TEMP_PREFIX)


def atomic_write(path: str | os.PathLike, write) -> None:
    """Call ``write(tmp_path)`` then rename onto ``path``, so a crash never leaves half a file."""
    d = os.path.dirname(os.path.abspath(path))
    fd, tmp = tempfile.mkstemp(dir=d, prefix=".tmp-", suffix=os.path.basename(path))
    os.close(fd)
    try:
        write(tmp)
        umask = os.umask(0)
        os.umask(umask)
        os.chmod(tmp, 0o666 & ~umask)  # mkstemp makes 0600; give the file the mode a plain open() would
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def build_model(layout: str = "attention", n_layers: int = 4, d_model: int = 256, vocab_size: int = 260,
                **config) -> LM:
    """Build an :class:`LM`; keyword arguments set :class:`LMConfig` fields.

    >>> model = build_model(layout="gated_deltanet*3,attention", n_layers=8, d_model=256)
    """
    names = {f.name for f in fields(LMConfig) if f.init}
    unknown = set(config) - names
    if unknown:
        raise OptionError(f"build_model got unknown option(s) {sorted(unknown)}; LMConfig fields are {sorted(names)}")
    return LM(LMConfig(vocab_size=vocab_size, d_model=d_model, n_layers=n_layers, layout=layout, **config))


def load_model(directory: str | os.PathLike, device=None) -> LM:
    """Load a model saved with ``save_pretrained``, a training checkpoint, or a training run's
    directory (its latest checkpoint, named by ``checkpoints/latest``)."""
    pointer = Path(directory) / "checkpoints" / "latest"
    if not (Path(directory) / "config.json").is_file() and pointer.is_file():
        directory = pointer.parent / pointer.read_text().strip()
    return LM.from_pretrained(directory, device=device)
