"""``rnnlab bench stream``: a million tokens through one stream, in flat memory.

Each model layout (default: a recurrent model ``gated_deltanet``, a hybrid
``gated_deltanet*3,swa(window=1024,sinks=4)`` and full ``attention``; ``--n-layers`` x ``--d-model``)
reads ``--tokens`` random tokens as one stream (:class:`rnnlab.Stream`, fed ``--chunk`` tokens at a
time with the state carried along: the same state a token-by-token stream would hold). At each
checkpoint of ``--at`` (default 10k, 100k, 1M tokens) the table shows the tokens/s so far, the
bytes of the model state and the process's resident memory (RSS). A recurrent or bounded-cache
model's state stays the same size however long the stream; full attention's KV cache grows with
every token and stops the run at ``--max-gb`` of state ("over budget").

The models run in this process one after another (the RSS of a later one includes what the
allocator kept from an earlier one: compare the growth within a model's rows). Prints a table,
writes JSON and a PNG (state and RSS against tokens), and ends with one JSON line.

``rnnlab bench stream [--tokens 1000000] [--chunk 1024] [--layouts ...] [--quick] [--json F]``
"""
from __future__ import annotations

import os
import resource
import sys
import time
from pathlib import Path

import torch

from . import report
from ..configs import Parser, float_in, int_at_least, parse_device

__all__ = ["main", "build_parser", "rss_bytes"]

DEFAULT_LAYOUTS = ("gated_deltanet", "gated_deltanet*3,swa(window=1024,sinks=4)", "attention")


def rss_bytes() -> int:
    """The process's resident memory now (Linux: /proc/self/statm), else its peak so far."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE")
    except (OSError, ValueError, IndexError):
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return peak if sys.platform == "darwin" else peak * 1024  # bytes on macOS, KiB elsewhere


def build_parser() -> Parser:
    p = Parser(prog="rnnlab bench stream", description=__doc__.split("\n\n")[0])
    p.add_argument("--tokens", type=int_at_least(1), default=1_000_000, help="tokens streamed through each model")
    p.add_argument("--at", nargs="+", type=int_at_least(1), help="checkpoints in tokens (default: 10k, 100k, "
                                                                 "1M and --tokens)")
    p.add_argument("--chunk", type=int_at_least(1), default=1024, help="tokens fed per call")
    p.add_argument("--layouts", nargs="+", help="model layouts (default: " + "; ".join(DEFAULT_LAYOUTS) + ")")
    p.add_argument("--n-layers", type=int_at_least(1), default=4, help="layers of each model")
    p.add_argument("--d-model", type=int_at_least(1), default=256, help="model width")
    p.add_argument("--max-gb", type=float_in(0, lo_open=True), default=4.0,
                   help="stop a model once its state passes this many GB")
    p.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    p.add_argument("--quick", action="store_true", help="smoke run: 20k tokens, d_model 64, window 64")
    p.add_argument("--json", help="results file (default: runs/bench/stream.json)")
    p.add_argument("--png", help="plot file (default: the JSON path with .png)")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    from .. import Stream, build_model
    from ..models.lm import LMConfig
    a = build_parser().parse_args(argv)
    device = parse_device(a.device)
    if a.quick:
        a.tokens, a.d_model = min(a.tokens, 20_000), 64
    layouts = a.layouts or [lay.replace("1024", "64") if a.quick else lay for lay in DEFAULT_LAYOUTS]
    for lay in layouts:  # names and options checked before the first long stream
        LMConfig(layout=lay, n_layers=a.n_layers, d_model=a.d_model)
    marks = sorted({m for m in (a.at or [10_000, 100_000, 1_000_000]) if m < a.tokens} | {a.tokens})
    print(f"rnnlab bench stream: {a.tokens:,} tokens per model in chunks of {a.chunk}, {a.n_layers} layers, "
          f"d_model {a.d_model}, {device}, {torch.get_num_threads()} threads")
    print(f"{'model':44} {'tokens':>10} | {'tokens/s':>10} {'state MB':>10} {'RSS MB':>9} | status")
    rows: list[dict] = []
    for lay in layouts:
        torch.manual_seed(0)
        model = build_model(layout=lay, n_layers=a.n_layers, d_model=a.d_model).to(device).eval()
        stream, g = Stream(model), torch.Generator().manual_seed(0)
        Stream(model).feed(torch.zeros(1, min(a.chunk, a.tokens), dtype=torch.long, device=device))  # warm-up
        fed, t0, status = 0, time.perf_counter(), "ok"
        for mark in marks:
            while fed < mark and status == "ok":
                n = min(a.chunk, mark - fed)
                stream.feed(torch.randint(0, model.config.vocab_size, (1, n), generator=g).to(device), chunk_size=n)
                fed += n
                if stream.state.nbytes > a.max_gb * 1e9:
                    status = f"over budget (state > {a.max_gb} GB at {fed:,} tokens)"
            row = dict(model=lay, tokens=fed, tokens_per_s=fed / (time.perf_counter() - t0),
                       state_bytes=stream.state.nbytes, rss_bytes=rss_bytes(), status=status)
            rows.append(row)
            print(f"{lay[:44]:44} {fed:10,d} | {row['tokens_per_s']:10,.0f} {row['state_bytes'] / 2**20:10.2f} "
                  f"{row['rss_bytes'] / 2**20:9.0f} | {status}", flush=True)
            if status != "ok":
                break
        del model, stream
    json_path = a.json or "runs/bench/stream.json"
    png_path = a.png or str(Path(json_path).with_suffix(".png"))
    Path(json_path).parent.mkdir(parents=True, exist_ok=True)
    from .plot import loglog
    series = lambda key: {lay: [(r["tokens"], r[key] / 2**20) for r in rows if r["model"] == lay]  # noqa: E731
                          for lay in layouts}
    loglog(png_path, [("model state (MB)", series("state_bytes")), ("process RSS (MB)", series("rss_bytes"))],
           "tokens streamed", "MB", f"rnnlab bench stream ({device})", reference="attention")
    report("stream", rows, json_path, png=png_path, tokens=a.tokens, chunk=a.chunk, d_model=a.d_model,
           n_layers=a.n_layers, device=str(device))
    return rows
