"""``rnnlab bench speed decode``: per-token latency and memory at growing contexts.

For each model layout (default: Gated DeltaNet, Mamba-2, the hybrid
``gated_deltanet*3,swa(window=1024,sinks=4)`` and full attention, all ``--n-layers`` x
``--d-model`` with heads of ``--head-dim``) and each context length L (ascending): the context is
prefilled with :class:`rnnlab.Stream` in chunks of ``--prefill-chunk`` (the state passed from chunk
to chunk, and from one context length to the next), then ``--steps`` single-token steps
``model(token, state)`` (greedy next token, the head included) are timed one by one after two
untimed ones; the median is the latency. Beside it:

* ``state``: bytes of the model state at L (the KV cache grows with L, a recurrent state does not);
* ``step MB``: peak tensor memory one step allocates (:func:`rnnlab.bench.measure.peak_memory`);
* the weight-streaming floor: a step must read every weight once, so it takes at least
  ``weight bytes / bandwidth`` (the bandwidth measured in the same run, ``torch.mv`` over a large
  matrix), and with the state read as well ``(weight + state bytes) / bandwidth``. Weight bytes
  count every parameter once (the embedding table too while it is tied to the output head).

With ``--compile`` each model runs twice: eagerly, then with its step compiled
(:meth:`rnnlab.LM.compile_step`, the first step compiling untimed), labelled ``+compile``.

A step slower than ``--budget-s`` (or a state above ``--budget-gb``) stops that layout's larger
contexts ("over budget").
"""
from __future__ import annotations

import torch

from .measure import peak_memory, timeit

__all__ = ["run_decode", "default_layouts", "bench_models"]


def default_layouts(a) -> list[tuple[str, str]]:
    """(label, layout) of the default decode models at the run's width."""
    from .speed import layout_item, width_options
    item = lambda name, **kw: layout_item(name, {**width_options(name, a.d_model, a.head_dim), **kw})  # noqa: E731
    window = 32 if a.quick else 1024
    r = min(3, a.n_layers - 1)  # recurrent layers per attention layer (the pattern must fit n_layers)
    hybrid = [(f"gated_deltanet*{r},swa(window={window},sinks=4)",
               f"{item('gated_deltanet')}*{r},{item('swa', window=window, sinks=4)}")] if r else []
    return [("gated_deltanet", item("gated_deltanet")), ("mamba2", item("mamba2")), *hybrid,
            ("attention", item("attention"))]


def bench_models(ctx):
    """(label, layout, model) for each layout of the run (``--layouts``, checked by the command, or
    :func:`default_layouts`), built one at a time: seeded, on the run's device and dtype, in eval mode."""
    from .. import build_model
    a = ctx.a
    for label, layout in ([(lay, lay) for lay in a.layouts] if a.layouts else default_layouts(a)):
        torch.manual_seed(0)
        model = build_model(layout=layout, n_layers=a.n_layers, d_model=a.d_model).to(ctx.device, ctx.dtype).eval()
        yield label, layout, model
        del model


def _weight_bytes(model) -> int:
    seen, n = set(), 0
    for p in model.parameters():
        if id(p) not in seen:
            seen.add(id(p))
            n += p.numel() * p.element_size()
    if not model.config.tie_embeddings:  # a step reads one row of an untied embedding table
        n -= model.embed.weight.numel() * model.embed.weight.element_size()
    return n


def run_decode(ctx):
    """Rows (layout, context): ms per token, state bytes, step peak, floors; and the plot panels."""
    a = ctx.a
    bw = ctx.bandwidth()
    print(f"{'model':44} {'context':>8} | {'ms/token':>10} {'floor w':>10} {'floor w+s':>10} | {'state MB':>9} "
          f"{'step MB':>9} | status   (floor: bytes read per token / {bw / 1e9:.1f} GB/s)")
    rows = []
    for label, layout, model in bench_models(ctx):
        for compiled in (False, True) if a.compile else (False,):
            rows += _contexts(ctx, f"{label} +compile" if compiled else label, layout, model.compile_step(compiled), bw)
    panels = [(f"decode latency, {a.n_layers} layers, d_model {a.d_model}", _points(rows, "ms_per_token")),
              ("model state (MB)", {k: [(x, y / 2 ** 20 if y else None) for x, y in v]
                                    for k, v in _points(rows, "state_bytes").items()})]
    return rows, panels, "context (tokens)", "ms per token  |  MB", "attention"


def _contexts(ctx, label: str, layout: str, model, bw: float) -> list[dict]:
    """One model's rows: the stream prefilled to each context in turn, then its steps timed."""
    from .. import Stream
    a = ctx.a
    rows = []
    wbytes = _weight_bytes(model)
    gen = torch.Generator().manual_seed(0)
    stream, fed = Stream(model), 0
    for L in sorted(a.contexts):
        row = dict(model=label, layout=layout, context=L, steps=a.steps, weight_bytes=wbytes,
                   floor_weights_s=wbytes / bw, ms_per_token=None, state_bytes=None, step_peak_bytes=None,
                   status="ok")
        rows.append(row)
        stopped = ctx.budget.stopped(label)
        if stopped:
            row["status"] = stopped
            _print(row)
            continue
        new = torch.randint(0, model.config.vocab_size, (a.batch, L - fed), generator=gen).to(ctx.device)
        if new.shape[1]:
            stream.feed(new, chunk_size=a.prefill_chunk)
        fed = L
        state, logits = stream.state, stream.logits
        row["state_bytes"] = state.nbytes
        row["floor_weights_state_s"] = (wbytes + state.nbytes) / bw
        box = {"state": state, "tok": logits.argmax(-1, keepdim=True)}

        @torch.no_grad()
        def step():
            out, box["state"] = model(box["tok"], box["state"])
            box["tok"] = out[:, -1].argmax(-1, keepdim=True)

        step()  # with --compile, the first step compiles
        t = timeit(step, ctx.device, a.steps, ctx.budget.seconds)
        row["ms_per_token"] = t.seconds * 1e3
        row["step_peak_bytes"] = peak_memory(step, ctx.device)
        why = ctx.budget.passed(label, L, seconds=t.seconds, nbytes=state.nbytes)
        if why:
            row["status"] = why
        _print(row)
    return rows


def _points(rows, key):
    out: dict[str, list] = {}
    for r in rows:
        out.setdefault(r["model"], []).append((r["context"], r.get(key)))
    return out


def _print(r):
    ms = lambda s: f"{s * 1e3:10.2f}" if s is not None else f"{'-':>10}"  # noqa: E731
    mb = lambda b: f"{b / 2 ** 20:9.1f}" if b is not None else f"{'-':>9}"  # noqa: E731
    lat = r["ms_per_token"]
    print(f"{r['model'][:44]:44} {r['context']:8d} | {ms(None if lat is None else lat / 1e3)} "
          f"{ms(r['floor_weights_s'])} {ms(r.get('floor_weights_state_s'))} | {mb(r['state_bytes'])} "
          f"{mb(r['step_peak_bytes'])} | {r['status']}", flush=True)
