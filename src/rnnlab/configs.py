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

__all__ = ["field_docs", "add_flags", "apply", "flag_values", "load_toml", "Parser", "HelpFormatter", "int_at_least", "float_in",
           "name_flags", "parse_device"]


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
    except IsADirectoryError:
        raise ValueError(f"--config {path!r}: is a directory; expected a TOML file") from None
    except (tomllib.TOMLDecodeError, UnicodeDecodeError) as e:  # bad syntax, or a binary file
        raise ValueError(f"--config {path!r} is not valid TOML: {e}") from None


# -- the command line's parser and value types -------------------------------------------------------
class HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help as written (descriptions and epilogs keep their lines), each option's default appended
    unless its help already names it."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        if ("default" in text.lower() or action.default in (None, False, argparse.SUPPRESS)
                or not action.option_strings or isinstance(action, (argparse._HelpAction, argparse._VersionAction))):
            return text
        return f"{text} (default: %(default)s)"


class Parser(argparse.ArgumentParser):
    """An ``ArgumentParser`` whose errors are one line on stderr (exit status 2): the command, the
    flag and what was expected, and where the help is — no usage block to scroll past. Help shows
    every option's default."""

    def __init__(self, *args, **kwargs):
        kwargs.setdefault("formatter_class", HelpFormatter)
        super().__init__(*args, **kwargs)

    def error(self, message: str) -> typing.NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (options: {self.prog} --help)\n")


def _bounded(kind: type, lo: float | None, hi: float | None, lo_open: bool, hi_open: bool, what: str):
    def convert(text: str):
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}") from None
        ok = value == value and abs(value) != float("inf")  # finite (not NaN, not inf)
        if lo is not None:
            ok = ok and (value > lo if lo_open else value >= lo)
        if hi is not None:
            ok = ok and (value < hi if hi_open else value <= hi)
        if not ok:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    convert.__name__ = what
    return convert


def int_at_least(lo: int):
    """An argparse ``type``: an int >= ``lo``."""
    return _bounded(int, lo, None, False, False, f"an integer >= {lo}")


def float_in(lo: float | None = None, hi: float | None = None, lo_open: bool = False, hi_open: bool = False):
    """An argparse ``type``: a finite float within the bounds given (``*_open``: bound excluded)."""
    if lo is None and hi is None:
        what = "a finite number"
    else:
        left = "" if lo is None else f"{'(' if lo_open else '['}{lo}"
        right = "" if hi is None else f"{hi}{')' if hi_open else ']'}"
        what = f"a number in {left or '(-inf'}, {right or 'inf)'}"
    return _bounded(float, lo, hi, lo_open, hi_open, what)


def name_flags(message: str, fields: typing.Iterable[str]) -> str:
    """``message`` with each of ``fields`` written as its command-line flag (``min_lr`` ->
    ``--min-lr``): an error raised by a dataclass then names the flag the user typed."""
    for name in sorted(set(fields), key=len, reverse=True):
        message = re.sub(rf"(?<![\w-]){re.escape(name)}(?!\w)", _flag(name), message)
    return message


def parse_device(name: str | None, flag: str = "--device"):
    """``torch.device`` for a ``--device`` value (None: cuda if available, else cpu), refusing
    names torch does not know and devices this machine does not have, with an error naming ``flag``."""
    import torch
    if name is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ValueError(f"{flag} {name!r} is not a device name; expected cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"{flag} {name}: this torch ({torch.__version__}) sees no CUDA device; use --device cpu")
    if dev.type == "cuda" and dev.index is not None and dev.index >= torch.cuda.device_count():
        raise ValueError(f"{flag} {name}: there are only {torch.cuda.device_count()} CUDA device(s)")
    if dev.type == "mps" and not torch.backends.mps.is_available():
        raise ValueError(f"{flag} {name}: MPS is not available on this machine")
    if dev.type not in ("cpu", "cuda", "mps"):
        raise ValueError(f"{flag} {name}: rnnlab runs on cpu, cuda or mps, not {dev.type}")
    return dev
