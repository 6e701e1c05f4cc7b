"""The ``rnnlab`` command: list | train | eval | generate | bench | convert | demo."""
from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["main"]


def _device(name: str | None) -> torch.device:
    return torch.device(name or ("cuda" if torch.cuda.is_available() else "cpu"))


# -- list -------------------------------------------------------------------------------------------
def cmd_list(a) -> None:
    from .models.registry import REGISTRY, build_mixer, get_spec, markdown_table, mixers, options_help
    if a.markdown:
        print(markdown_table(a.d_model))
        return
    if a.mixer:
        spec = get_spec(a.mixer)
        layer = build_mixer(a.mixer, a.d_model)
        print(f"{spec.name} — {spec.paper}\n{spec.description}\n")
        print(f"options (in a layout: {spec.name}(option=value,...); in Python: build_mixer({spec.name!r}, d_model, option=value)):")
        for field_name, default, note in options_help(a.mixer):
            print(f"  {field_name + ' = ' + repr(default):34} {note}")
        size = f"{layer.state_size():,} bytes" if layer.recurrent else "grows with the tokens seen"
        print(f"\nstate per layer: {spec.state_size}; at d_model={a.d_model}: {size} (float32, batch 1)")
        return
    print(f"{'mixer':18} {'state bytes/layer':>18}  {'paper':34} description")
    for name in mixers():
        spec = REGISTRY[name]
        layer = build_mixer(name, a.d_model)
        size = f"{layer.state_size():,}" if layer.recurrent else f"{spec.state_size.split(' (')[0]}"
        print(f"{name:18} {size:>18}  {spec.paper[:34]:34} {spec.description}")
    print(f"\nstate sizes at d_model={a.d_model}, float32, batch 1; formulas: rnnlab list --markdown")


# -- train / eval -----------------------------------------------------------------------------------
def cmd_train(a) -> dict:
    from . import build_model, load_model
    from .data.corpus import load_corpus
    from .train import TrainConfig, train
    dev = _device(a.device)
    out = Path(a.out)
    if a.resume and (out / "config.json").is_file():
        model = load_model(out, device=dev)
    else:
        model = build_model(layout=a.layout, n_layers=a.n_layers, d_model=a.d_model).to(dev)
    print(f"model: {model.config.layout} x{model.config.n_layers}, d_model={model.config.d_model}, "
          f"{model.num_params():,} parameters, device {dev}")
    train_data, val_data = load_corpus(a.data, max_bytes=a.max_bytes)
    print(f"data: {len(train_data):,} training bytes, {len(val_data):,} validation bytes")
    cfg = TrainConfig(steps=a.steps, batch_size=a.batch_size, seq_len=a.seq_len, lr=a.lr, min_lr=a.lr / 10,
                      warmup=min(50, a.steps // 10 + 1), eval_every=a.eval_every, out_dir=str(out),
                      autocast="bf16" if a.bf16 else None, max_seconds=a.max_seconds)
    res = train(model, train_data, val_data, cfg)
    print(f"saved to {out}/ (config.json, model.safetensors, metrics.jsonl, loss.png)")
    return res


def cmd_eval(a) -> dict:
    from . import load_model
    from .data.corpus import load_corpus
    from .train import evaluate_bpb
    model = load_model(a.model, device=_device(a.device))
    _, val = load_corpus(a.data, max_bytes=a.max_bytes)
    bpb = evaluate_bpb(model, val, a.seq_len, a.batches)
    res = {"model": str(a.model), "val_bytes": len(val), "seq_len": a.seq_len, "bits_per_byte": bpb}
    print(f"{'model':30} {'seq_len':>8} {'bits/byte':>10}\n{str(a.model)[-30:]:30} {a.seq_len:8d} {bpb:10.4f}")
    print(json.dumps(res))
    return res


# -- generate ---------------------------------------------------------------------------------------
def cmd_generate(a) -> str:
    from . import Stream, load_model
    from .models.hf import load_tokenizer
    model = load_model(a.model, device=_device(a.device)).eval()
    tok = load_tokenizer(a.model)
    stream = Stream.load(model, a.state_in) if a.state_in else Stream(model)
    prompt = a.prompt.encode().decode("unicode_escape") if a.escapes else a.prompt
    if prompt:
        stream.feed(tok(prompt).to(next(model.parameters()).device))
    g = torch.Generator(device=next(model.parameters()).device).manual_seed(a.seed)
    text, pending = [], []
    for t in stream.sample(a.max_new_tokens, a.temperature, a.top_k, a.top_p, generator=g):
        pending.append(int(t[0]))
        piece = tok.decode(pending)
        if not piece.endswith("\ufffd"):  # print whole characters as they complete
            sys.stdout.write(piece)
            sys.stdout.flush()
            text.append(piece)
            pending = []
    if pending:
        text.append(tok.decode(pending))
        sys.stdout.write(text[-1])
    sys.stdout.write("\n")
    if a.state_out:
        stream.save(a.state_out)
        print(f"[state after {stream.state.seen} tokens, {stream.state.nbytes:,} bytes -> {a.state_out}]",
              file=sys.stderr)
    return "".join(text)


# -- bench / convert --------------------------------------------------------------------------------
def cmd_bench(a, rest: list[str]) -> None:
    import importlib
    mod = importlib.import_module(f"rnnlab.bench.{a.what}")
    mod.main(rest)


def cmd_convert(a) -> None:
    from . import load_model
    from .models.hf import from_hf, to_hf
    if bool(a.from_hf) == bool(a.to_hf):
        raise SystemExit("rnnlab convert: give exactly one of --from-hf DIR or --to-hf DIR")
    if a.from_hf:
        model = from_hf(a.from_hf)
        model.save_pretrained(a.out)
        print(f"converted {a.from_hf} -> {a.out} ({model.num_params():,} parameters, layout {model.config.layout})")
    else:
        to_hf(load_model(a.to_hf), a.out)
        print(f"exported {a.to_hf} -> {a.out} (loadable with transformers' AutoModelForCausalLM)")


# -- demo -------------------------------------------------------------------------------------------
def _demo_layout() -> str:
    from .models.registry import mixers
    return "gated_deltanet*3,swa(window=128)" if "gated_deltanet" in mixers() else "attention,swa(window=128)"


def cmd_demo(a) -> None:
    from . import ByteTokenizer, Stream, build_model, load_model
    from .data.corpus import load_corpus
    from .train import TrainConfig, evaluate_bpb, train
    torch.manual_seed(0)
    dev = _device(a.device)
    out = Path(a.out)
    layout = a.layout or _demo_layout()
    model = build_model(layout=layout, n_layers=4, d_model=128).to(dev)
    print(f"== rnnlab demo: a {model.num_params():,}-parameter model, layout {layout!r} x4, on {dev}")
    train_data, val_data = load_corpus(max_bytes=20_000_000)
    print(f"== data: the standard library's Python source, {len(train_data):,} bytes "
          f"(validation {len(val_data):,})")
    before = evaluate_bpb(model, val_data, 256, 4)
    print(f"== bits per byte before training: {before:.3f}  (a uniform guess over bytes: 8.0)")
    cfg = TrainConfig(steps=100_000, batch_size=16, seq_len=256, lr=3e-3, min_lr=3e-3, warmup=30,
                      eval_every=10**9, max_seconds=a.seconds, out_dir=str(out))
    if (out / "trainer_state.pt").exists():
        (out / "trainer_state.pt").unlink()  # the demo always starts fresh
    if (out / "metrics.jsonl").exists():
        (out / "metrics.jsonl").unlink()
    res = train(model, train_data, val_data, cfg)
    print(f"== after {res['step']} steps ({res['seconds']:.0f} s, {res['tokens_per_s']:,.0f} tokens/s): "
          f"{res['val_bpb']:.3f} bits per byte; saved to {out}/ with the loss curve {out}/loss.png")
    model = load_model(out, device=dev).eval()
    tok = ByteTokenizer()
    prompt = "def read_config(path):\n    "
    stream = Stream(model)
    stream.feed(tok(prompt).to(dev))
    print(f"== streaming a continuation, one token at a time:\n{prompt}", end="")
    g = torch.Generator(device=dev).manual_seed(0)
    t0, n = time.time(), 0
    for t in stream.sample(150, temperature=0.8, top_k=40, generator=g):
        sys.stdout.write(tok.decode([int(t[0])]))
        sys.stdout.flush()
        n += 1
    rate = n / (time.time() - t0)
    state_file = out / "stream.safetensors"
    stream.save(state_file)
    print(f"\n== {rate:.0f} tokens/s; state after {stream.state.seen} tokens: {stream.state.nbytes:,} bytes, "
          f"saved to {state_file}")
    resumed = Stream.load(model, state_file)
    print("== resumed from the file, continuing:\n", end="")
    for t in resumed.sample(80, temperature=0.8, top_k=40, generator=g):
        sys.stdout.write(tok.decode([int(t[0])]))
    print(f"\n== state after {resumed.state.seen} tokens: {resumed.state.nbytes:,} bytes")


# -- the parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnlab", description="Recurrent sequence models: train, run, measure.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("list", help="the registered mixers with papers and state sizes; one mixer's options")
    s.add_argument("mixer", nargs="?", help="show this mixer's options with their defaults and meaning")
    s.add_argument("--d-model", type=int, default=256)
    s.add_argument("--markdown", action="store_true", help="print the README's markdown table")

    s = sub.add_parser("train", help="train a language model on text (default: the stdlib's source)")
    s.add_argument("--layout", default="attention")
    s.add_argument("--n-layers", type=int, default=4)
    s.add_argument("--d-model", type=int, default=128)
    s.add_argument("--steps", type=int, default=500)
    s.add_argument("--batch-size", type=int, default=16)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--lr", type=float, default=3e-3)
    s.add_argument("--eval-every", type=int, default=100)
    s.add_argument("--data", nargs="+", help="files, directories or globs (default: the standard library)")
    s.add_argument("--max-bytes", type=int, default=None)
    s.add_argument("--max-seconds", type=float, default=None)
    s.add_argument("--out", required=True)
    s.add_argument("--device")
    s.add_argument("--bf16", action="store_true", help="bfloat16 autocast")
    s.add_argument("--resume", action="store_true", help="continue the run saved in --out")

    s = sub.add_parser("eval", help="bits per byte of a saved model on held-out text")
    s.add_argument("--model", required=True)
    s.add_argument("--data", nargs="+")
    s.add_argument("--max-bytes", type=int, default=None)
    s.add_argument("--seq-len", type=int, default=256)
    s.add_argument("--batches", type=int, default=16)
    s.add_argument("--device")

    s = sub.add_parser("generate", help="stream a continuation from a saved model")
    s.add_argument("--model", required=True)
    s.add_argument("--prompt", default="")
    s.add_argument("--escapes", action="store_true", help="interpret backslash escapes such as \\n in --prompt")
    s.add_argument("--max-new-tokens", type=int, default=200)
    s.add_argument("--temperature", type=float, default=0.8)
    s.add_argument("--top-k", type=int, default=None)
    s.add_argument("--top-p", type=float, default=None)
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--state-in", help="resume the stream saved in this file")
    s.add_argument("--state-out", help="save the stream's state to this file afterwards")
    s.add_argument("--device")

    s = sub.add_parser("bench", help="benchmarks: ops (kernels), hf (vs transformers), rnn (Newton vs loop), "
                                     "mixers (every mixer: train step, prefill, decode)")
    s.add_argument("what", choices=["ops", "hf", "rnn", "mixers"])

    s = sub.add_parser("convert", help="convert Hugging Face checkpoints from/to rnnlab")
    s.add_argument("--from-hf", help="a transformers checkpoint directory to read")
    s.add_argument("--to-hf", help="an rnnlab model directory to export")
    s.add_argument("--out", required=True)

    s = sub.add_parser("demo", help="train a small model for about a minute and stream from it")
    s.add_argument("--seconds", type=float, default=60.0)
    s.add_argument("--layout", default=None)
    s.add_argument("--out", default="runs/demo")
    s.add_argument("--device")
    return p


def main(argv: list[str] | None = None):
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a, rest = p.parse_known_args(argv)
    if rest and a.cmd != "bench":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"list": cmd_list, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "convert": cmd_convert, "demo": cmd_demo}
    try:
        if a.cmd == "bench":
            return cmd_bench(a, rest)
        return handlers[a.cmd](a)
    except (KeyError, ValueError, TypeError, FileNotFoundError) as e:
        msg = e.args[0] if isinstance(e, KeyError) and e.args else str(e)
        print(f"rnnlab {a.cmd}: error: {msg}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
