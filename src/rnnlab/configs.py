"""Dataclass configs as the one source of command-line flags, TOML files and help texts.

Every config field carries its meaning in the comment written beside it; :func:`field_docs` reads
those comments, :func:`add_flags` turns fields into ``--flag-name`` options whose help is that
comment plus the default, and :func:`apply` sets fields from a TOML table or parsed flags with
type checks that name the field.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import inspect
import re
import types
import typing
from typing import Any

__all__ = ["field_docs", "add_flags", "apply", "flag_values", "load_toml"]


@functools.lru_cache(maxsize=None)
def field_docs(cls: type) -> dict[str, str]:
    """``{field: comment}`` for the fields of dataclass ``cls`` (and its dataclass bases)."""
    docs: dict[str, str] = {}
    for klass in reversed(cls.__mro__):
        if dataclasses.is_dataclass(klass):
            try:
                source = inspect.getsource(klass)
            except (OSError, TypeError):
                continue
            for line in source.splitlines():
                m = re.match(r"\s+(\w+)\s*:[^#=]*(?:=[^#]*)?#\s*(.*)$", line)
                if m:
                    docs[m.group(1)] = m.group(2).strip()
    return docs


def _base_type(cls: type, name: str) -> type:
    hint = typing.get_type_hints(cls)[name]
    args = [a for a in typing.get_args(hint) if a is not type(None)]
    if typing.get_origin(hint) in (typing.Union, types.UnionType) and len(args) == 1:
        hint = args[0]
    return hint


def _default(f: dataclasses.Field) -> Any:
    if f.default is not dataclasses.MISSING:
        return f.default
    if f.default_factory is not dataclasses.MISSING:
        return f.default_factory()
    return None


def _flag(name: str) -> str:
    return "--" + name.replace("_", "-")


def add_flags(parser: argparse.ArgumentParser | argparse._ArgumentGroup, cls: type, skip: tuple[str, ...] = (),
              defaults: dict[str, Any] | None = None) -> list[str]:
    """Add one ``--flag`` per init field of dataclass ``cls`` (but ``skip``), with the field's
    comment and default as help. Flags default to "not given" (absent from the namespace) so
    files and presets can sit below them. Returns the field names added."""
    docs, names = field_docs(cls), []
    shown = defaults or {}
    for f in dataclasses.fields(cls):
        if not f.init or f.name in skip:
            continue
        t = _base_type(cls, f.name)
        default = shown.get(f.name, _default(f))
        help_text = f"{docs.get(f.name, '')} (default: {default!r})".replace("%", "%%")
        kw: dict[str, Any] = dict(dest=f.name, default=argparse.SUPPRESS, help=help_text)
        if t is bool:
            parser.add_argument(_flag(f.name), action=argparse.BooleanOptionalAction, **kw)
        elif typing.get_origin(t) is list:
            parser.add_argument(_flag(f.name), nargs="+", type=typing.get_args(t)[0], metavar="X", **kw)
        else:
            parser.add_argument(_flag(f.name), type=t, metavar=t.__name__.upper(), **kw)
        names.append(f.name)
    return names


def flag_values(namespace: argparse.Namespace, cls: type) -> dict[str, Any]:
    """The fields of ``cls`` given on the command line."""
    names = {f.name for f in dataclasses.fields(cls) if f.init}
    return {k: v for k, v in vars(namespace).items() if k in names}


def apply(cls: type, values: dict[str, Any], where: str) -> dict[str, Any]:
    """Check ``values`` against the fields of ``cls`` (names and types); returns them. ``where``
    names the source in errors (e.g. ``"run.toml [train]"``)."""
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    out = {}
    for k, v in values.items():
        if k not in fields:
            raise ValueError(f"{where}: unknown option {k!r}; known: {', '.join(sorted(fields))}")
        t = _base_type(cls, k)
        origin = typing.get_origin(t) or t
        ok = isinstance(v, origin) and not (origin is int and isinstance(v, bool))
        if origin is float and isinstance(v, int) and not isinstance(v, bool):
            v, ok = float(v), True
        if v is None and _default(fields[k]) is None:
            ok = True
        if not ok:
            raise ValueError(f"{where}: {k} must be {getattr(t, '__name__', t)}, got {v!r}")
        out[k] = v
    return out


def load_toml(path: str) -> dict[str, Any]:
    """Read a TOML file (clear errors for a missing file or bad syntax)."""
    try:
        import tomllib
    except ModuleNotFoundError:  # Python 3.10
        import tomli as tomllib
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except FileNotFoundError:
        raise FileNotFoundError(f"--config {path!r}: no such file") from None
    except tomllib.TOMLDecodeError as e:
        raise ValueError(f"--config {path!r} is not valid TOML: {e}") from None
