"""Layout strings: which mixer each block of a model uses.

A layout is a comma-separated pattern of items, cycled over the model's blocks:

* ``name`` — a block with mixer ``name`` (and an MLP after it unless ``mixer_mlp=False``);
* ``name(opt=value, ...)`` — the same with config options, e.g. ``swa(window=256,sinks=4)``;
* ``item*n`` — the item repeated n times, e.g. ``gated_deltanet*3,attention``;
* ``mlp`` — a block with an MLP only (for layouts such as Samba's ``mamba,mlp,swa,mlp``).

Options a mixer has renamed are still read under their old names (with a FutureWarning);
:func:`upgrade_layout` rewrites a layout with the new names.
"""
from __future__ import annotations

import ast
import re
from dataclasses import dataclass
from typing import Any

from .registry import REGISTRY, get_spec, make_config, upgrade_options

__all__ = ["BlockSpec", "parse_layout", "upgrade_layout"]

_ITEM = re.compile(r"^\s*([A-Za-z_][A-Za-z0-9_]*)\s*(?:\((.*)\))?\s*(?:\*\s*(\d+))?\s*$")


@dataclass(frozen=True)
class BlockSpec:
    """One block of a model: a mixer name (or ``"mlp"``) with its config options."""

    name: str
    options: tuple[tuple[str, Any], ...] = ()


def _split_top(text: str) -> list[str]:
    parts, depth, cur = [], 0, ""
    for ch in text:
        depth += ch == "("
        depth -= ch == ")"
        if ch == "," and depth == 0:
            parts.append(cur)
            cur = ""
        else:
            cur += ch
    parts.append(cur)
    return parts


def _parse_value(text: str) -> Any:
    try:
        return ast.literal_eval(text)
    except (ValueError, SyntaxError):
        return text  # a bare word, e.g. feature_map=elu


def parse_layout(layout: str, n_layers: int, d_model: int) -> tuple[BlockSpec, ...]:
    """Expand ``layout`` to ``n_layers`` blocks, checking names and options.

    Raises ValueError (bad syntax, or n_layers < 1) or KeyError/TypeError (unknown mixer or option).
    """
    if not isinstance(layout, str) or not layout.strip():
        raise ValueError(f"layout must be a non-empty string such as 'gated_deltanet*3,attention', got {layout!r}")
    if not isinstance(n_layers, int) or n_layers < 1:
        raise ValueError(f"n_layers must be an int >= 1, got {n_layers!r}")
    pattern: list[BlockSpec] = []
    for item in _split_top(layout):
        m = _ITEM.match(item)
        if not m:
            raise ValueError(f"cannot parse layout item {item.strip()!r} in {layout!r}; "
                             "expected name, name(opt=value,...) or item*n")
        name, opts_text, times = m.group(1), m.group(2), int(m.group(3) or 1)
        if times < 1:
            raise ValueError(f"layout item {item.strip()!r} repeats its block {times} times; write item*n with n >= 1")
        if len(pattern) + times > n_layers:
            raise ValueError(f"layout {layout!r} has more blocks than n_layers = {n_layers}; "
                             "raise n_layers or shorten the layout (it is cycled over n_layers blocks)")
        options: dict[str, Any] = {}
        for kv in _split_top(opts_text) if opts_text and opts_text.strip() else []:
            if "=" not in kv:
                raise ValueError(f"layout option {kv.strip()!r} of {name!r} must be written key=value")
            key, val = kv.split("=", 1)
            options[key.strip()] = _parse_value(val.strip())
        if name == "mlp":
            if options:
                raise ValueError("an 'mlp' layout item takes no options (set mlp/d_ff on the model config)")
        else:
            options = upgrade_options(name, options)
            make_config(name, d_model, **options)  # checks the name and the options now
        pattern += [BlockSpec(name, tuple(sorted(options.items())))] * times
    return tuple(_with_depth(pattern[i % len(pattern)], i, n_layers) for i in range(n_layers))


def upgrade_layout(layout: str) -> str:
    """``layout`` with every option a mixer has renamed written under its new name (a
    FutureWarning for each), e.g. ``rg_lru(conv_width=4)*2,swa`` -> ``rg_lru(conv_size=4)*2,swa``.
    Everything else is kept as written; items that do not parse are left for :func:`parse_layout`."""
    if not isinstance(layout, str):
        return layout
    items = []
    for item in _split_top(layout):
        m = _ITEM.match(item)
        if m and m.group(2) and m.group(1) in REGISTRY and REGISTRY[m.group(1)].config.renamed:
            opts = [kv.split("=", 1) for kv in _split_top(m.group(2))]
            old = {kv[0].strip(): kv[1].strip() for kv in opts if len(kv) == 2}
            if len(old) == len(opts) and set(old) & set(REGISTRY[m.group(1)].config.renamed):
                new = upgrade_options(m.group(1), old)
                item = item[:m.start(2)] + ",".join(f"{key}={val}" for key, val in new.items()) + item[m.end(2):]
        items.append(item)
    return ",".join(items)


def _with_depth(spec: BlockSpec, index: int, n_layers: int) -> BlockSpec:
    """Fill the mixer's depth option (e.g. HGRN2's forget-gate lower bound) with index / n_layers
    when the layout leaves it unset."""
    if spec.name == "mlp":
        return spec
    key = get_spec(spec.name).depth_option
    if key is None or key in dict(spec.options):
        return spec
    return BlockSpec(spec.name, tuple(sorted(spec.options + ((key, index / n_layers),))))
