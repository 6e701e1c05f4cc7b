"""Every mixer in one model shape: training-step time, prefill throughput and decode latency.

For each registered mixer, a model with ``--n-layers`` blocks of that mixer (plus the MLPs) at
``--d-model`` is timed on random tokens:

* ``train``: forward + backward of the cross-entropy on a (batch, T) batch (median of repeats);
* ``prefill``: tokens/s of one forward pass without autograd over the same batch;
* ``decode``: ms per token of ``Stream.sample`` after a 16-token prompt (batch 1).

Every mixer runs with its defaults (LSTM/GRU/sLSTM sequentially: ``rnnlab bench rnn`` times their
Newton form). The mixers are timed one after another, so compare rows of one run only (the host
is shared).

``python -m rnnlab.bench.mixers [--mixers gla mamba ...] [--d-model 128] [--n-layers 2]
[--batch 8] [--T 256] [--quick] [--json out.json]``. Prints a table and a final JSON line.
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch
import torch.nn.functional as F

from . import report
from ..configs import Parser, int_at_least
from .. import Stream, build_model
from ..models.registry import mixers

def run(name: str, d_model: int, n_layers: int, batch: int, T: int, repeats: int, decode_tokens: int) -> dict:
    torch.manual_seed(0)
    model = build_model(layout=name, n_layers=n_layers, d_model=d_model)
    tokens = torch.randint(0, 256, (batch, T + 1))
    steps = []
    for _ in range(repeats + 1):  # the first round warms up
        t0 = time.perf_counter()
        logits, _ = model(tokens[:, :-1])
        F.cross_entropy(logits.flatten(0, 1), tokens[:, 1:].flatten()).backward()
        steps.append(time.perf_counter() - t0)
    with torch.no_grad():
        t0 = time.perf_counter()
        model(tokens[:, :-1])
        prefill = time.perf_counter() - t0
        stream = Stream(model.eval())
        stream.feed(tokens[:1, :16])
        t0 = time.perf_counter()
        n = sum(1 for _ in stream.sample(decode_tokens))
        decode = (time.perf_counter() - t0) / n
    return dict(mixer=name, params=model.num_params(), d_model=d_model,
                n_layers=n_layers, batch=batch, T=T, train_step_s=statistics.median(steps[1:]),
                prefill_tok_s=batch * T / prefill, decode_ms_per_token=decode * 1e3)


def build_parser() -> Parser:
    p = Parser(prog="rnnlab bench mixers", description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", nargs="+", default=None, help="default: every registered mixer")
    p.add_argument("--d-model", type=int_at_least(1), default=128, help="model width")
    p.add_argument("--n-layers", type=int_at_least(1), default=2, help="layers of each model")
    p.add_argument("--batch", type=int_at_least(1), default=8, help="batch size B")
    p.add_argument("--T", type=int_at_least(1), default=256, help="tokens per sequence")
    p.add_argument("--repeats", type=int_at_least(1), default=2, help="timed calls; the median is reported")
    p.add_argument("--decode-tokens", type=int_at_least(1), default=32, help="tokens decoded one at a time")
    p.add_argument("--quick", action="store_true", help="d_model 32, batch 2, T 32, 1 repeat, 4 decode tokens")
    p.add_argument("--json", help="also write the results to this file")
    return p


def main(argv: list[str] | None = None) -> list[dict]:
    p = build_parser()
    a = p.parse_args(argv)
    names = a.mixers or mixers()
    unknown = sorted(set(names) - set(mixers()))
    if unknown:
        p.error(f"unknown mixer(s) {unknown}; known: {', '.join(mixers())}")
    if a.quick:
        a.d_model, a.batch, a.T, a.repeats, a.decode_tokens = 32, 2, 32, 1, 4
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads; {a.n_layers} layers, d_model {a.d_model}, "
          f"batch {a.batch} x T {a.T}, float32")
    print(f"{'mixer':17} {'params':>9} {'train step':>11} {'prefill tok/s':>14} {'decode ms/tok':>14}")
    rows = []
    for name in names:
        r = run(name, a.d_model, a.n_layers, a.batch, a.T, a.repeats, a.decode_tokens)
        rows.append(r)
        print(f"{name:17} {r['params']:9,d} {r['train_step_s'] * 1e3:9.0f}ms {r['prefill_tok_s']:14,.0f} "
              f"{r['decode_ms_per_token']:14.2f}", flush=True)
    report("mixers", rows, a.json)
    return rows


if __name__ == "__main__":
    main()
