"""``rnnlab bench speed ragged``: prefilling N prompts of different lengths, three ways.

For each model layout (as ``decode``: Gated DeltaNet, Mamba-2, a hybrid with sliding-window
attention and full attention, ``--n-layers`` x ``--d-model``) and each number of prompts N in
``--prompts`` (default 1 2 4 8 16 32), N prompt lengths are drawn uniformly from [T/8, T] with T
the largest ``--T`` (seeded, the same for every layout), and the prompts are prefilled:

* ``packed``: one call on one packed row with ``cu_seqlens`` (:meth:`rnnlab.Stream.feed` with a
  list): each prompt's state is exact, the batch holds exactly the tokens given;
* ``padded``: one call on an (N, longest) batch, right-padded. It computes ``N x longest`` tokens,
  and for a recurrent model the pads run into the state (exact only with masking a recurrent
  state cannot do): the comparison is of cost, not of results;
* ``one by one``: N calls, one prompt each (exact, no batching).

Each is timed (median of ``--repeats`` after a warm-up) in the same run, alternating.
"""
from __future__ import annotations

import torch

from .measure import timeit

__all__ = ["run_ragged"]


def run_ragged(ctx):
    """Rows (layout, N): ms of packed, padded and one-by-one prefill; and the plot panels."""
    from .. import Stream
    from .speed_decode import bench_models
    a = ctx.a
    T = max(a.T)
    counts = a.prompts or ([1, 2, 4] if a.quick else [1, 2, 4, 8, 16, 32])
    g = torch.Generator().manual_seed(0)
    lengths = {n: torch.randint(max(1, T // 8), T + 1, (n,), generator=g).tolist() for n in counts}
    print(f"{'model':44} {'N':>4} {'tokens':>8} {'padded to':>10} | {'packed ms':>10} {'padded ms':>10} "
          f"{'1-by-1 ms':>10} | fastest")
    rows = []
    labels = []
    for label, layout, model in bench_models(ctx):
        labels.append(label)
        V = model.config.vocab_size
        for n in counts:
            prompts = [torch.randint(0, V, (m,), generator=g).to(ctx.device) for m in lengths[n]]
            longest = max(lengths[n])
            padded = torch.zeros(n, longest, dtype=torch.long, device=ctx.device)
            for i, p in enumerate(prompts):
                padded[i, :len(p)] = p
            ways = {"packed": lambda: Stream(model).feed(prompts),
                    "padded": lambda: model(padded),
                    "one_by_one": lambda: [model(p[None]) for p in prompts]}
            with torch.no_grad():
                for fn in ways.values():
                    fn()  # warm-up
                times = {k: [] for k in ways}
                for _ in range(a.repeats):  # alternate the three ways, so drifts hit all alike
                    for k, fn in ways.items():
                        times[k].append(timeit(fn, ctx.device, 1).seconds)
            ms = {k: 1e3 * sorted(v)[len(v) // 2] for k, v in times.items()}
            row = dict(model=label, layout=layout, prompts=n, tokens=sum(lengths[n]), padded_tokens=n * longest,
                       packed_ms=ms["packed"], padded_ms=ms["padded"], one_by_one_ms=ms["one_by_one"],
                       fastest=min(ms, key=ms.get))
            rows.append(row)
            print(f"{label[:44]:44} {n:4d} {row['tokens']:8d} {row['padded_tokens']:10d} | {ms['packed']:10.1f} "
                  f"{ms['padded']:10.1f} {ms['one_by_one']:10.1f} | {row['fastest']}", flush=True)
    panels = []
    for label in labels:
        mine = [r for r in rows if r["model"] == label]
        panels.append((label, {way: [(r["prompts"], r[f"{way}_ms"]) for r in mine]
                               for way in ("packed", "padded", "one_by_one")}))
    return rows, panels, "prompts N", "prefill ms", "padded"
