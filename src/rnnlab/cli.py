"""The ``rnnlab`` command: list | train | eval | generate | bench | convert | demo."""
from __future__ import annotations

import argparse
import dataclasses
import json
import sys
import time
from pathlib import Path

import torch

__all__ = ["main", "entry"]


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


# -- train / eval / data ----------------------------------------------------------------------------
def cmd_train(a) -> dict:
    import shutil
    from dataclasses import asdict
    from .configs import flag_values
    from .models.lm import LM, LMConfig, atomic_write
    from .train import distributed as D
    from .train.checkpoint import latest_checkpoint, load_checkpoint, run_exists
    from .train.run import MODEL_FIELDS, DataConfig, make_sources, open_data, resolve
    from .train.trainer import TrainConfig, train
    out = Path(a.out)
    flags = {"model": {k: v for k, v in flag_values(a, LMConfig).items() if k in MODEL_FIELDS},
             "train": {k: v for k, v in flag_values(a, TrainConfig).items() if k not in ("out_dir", "resume")},
             "data": flag_values(a, DataConfig)}
    given = resolve(a.preset, a.config, flags)
    if a.resume:  # the run's own settings, with what was given on top (checked for the model and data)
        if latest_checkpoint(out) is None:
            raise FileNotFoundError(f"--resume: {out} holds no checkpoint to continue (start without --resume)")
        saved_model, _, ts = load_checkpoint(out)
        saved_data = json.loads((out / "run.json").read_text())["data"]
        for section, saved, want in (("model", saved_model.to_dict(), given.model), ("data", saved_data, given.data)):
            clash = {k: (saved[k], v) for k, v in want.items() if saved.get(k) != v}
            if clash:
                raise ValueError(f"--resume continues the run as it was; these {section} settings differ from it: " +
                                 ", ".join(f"{k} = {v[1]!r} (the run has {v[0]!r})" for k, v in clash.items()))
        model_fields = saved_model.to_dict()
        train_fields = {k: v for k, v in ts["train_config"].items() if k not in ("out_dir", "resume")}
        data_cfg = DataConfig(**saved_data)
    else:
        if run_exists(out):
            raise FileExistsError(f"--out {out} already holds a training run; add --resume to continue it, "
                                  "or choose another --out")
        model_fields, train_fields, data_cfg = dict(given.model), {}, DataConfig(**given.data)
        LMConfig(**model_fields)  # check the model settings before reading any data
    cfg = TrainConfig(**{**train_fields, **given.train, "out_dir": str(out), "resume": a.resume})
    e = D.setup(a.device)
    try:
        train_data, val_data = open_data(data_cfg, out / "data", e.is_main, D.barrier, reuse=a.resume)
        tok = train_data.tokenizer()
        if model_fields.get("vocab_size", train_data.vocab_size) != train_data.vocab_size:
            raise ValueError(f"the data's tokenizer has {train_data.vocab_size} tokens, the run's model {model_fields['vocab_size']}")
        model_fields["vocab_size"] = train_data.vocab_size
        torch.manual_seed(data_cfg.seed)
        model = LM(LMConfig(**model_fields)).to(e.device)
        if e.is_main:
            print(f"model: {model.config.layout} x{model.config.n_layers}, d_model={model.config.d_model}, "
                  f"{model.num_params():,} parameters, {e.world_size} process(es) on {e.device}")
            print(f"data: {len(train_data):,} training tokens, {len(val_data):,} validation tokens, tokenizer {tok.spec}")
            out.mkdir(parents=True, exist_ok=True)
            atomic_write(out / "run.json", lambda p: Path(p).write_text(json.dumps({"data": asdict(data_cfg)}, indent=2)))
            tok_file = getattr(tok, "file", None)
            if tok_file is not None and not (out / "tokenizer.json").exists():
                shutil.copyfile(tok_file, out / "tokenizer.json")
        batches, val = make_sources(train_data, val_data, cfg, data_cfg.seed, e.rank, e.world_size,
                                    data_cfg.eval_batches)
        res = train(model, batches, cfg, val_batches=val)
    finally:
        D.cleanup()
    if e.is_main:
        state = "interrupted; continue with --resume" if res["interrupted"] else "done"
        print(f"{state}: step {res['step']}, checkpoint {res['checkpoint']}; metrics in {out}/metrics.jsonl, "
              f"curve in {out}/loss.png")
    if res["interrupted"]:
        raise SystemExit(130)  # saved, but not finished: scripts can tell
    return res


def cmd_eval(a) -> dict:
    import math
    import tempfile
    from . import load_model
    from .models.hf import load_tokenizer
    from .train import loss_by_position, plot_loss_by_position
    from .train.run import DataConfig, open_data
    model = load_model(a.model, device=_device(a.device)).eval()
    run = Path(a.model)
    if a.data is None and (run / "data" / "meta.json").is_file():
        data_cfg = DataConfig(data=[str(run / "data")])
    else:
        tok = load_tokenizer(a.model)
        data_cfg = DataConfig(data=a.data or [], tokenizer=getattr(tok, "spec", "bytes"), max_bytes=a.max_bytes)
    with tempfile.TemporaryDirectory() as tmp:
        _, val = open_data(data_cfg, tmp)
        seq_len = a.seq_len or _trained_seq_len(run) or 256
        g = torch.Generator().manual_seed(a.seed)
        curves, rows = {}, []
        for mult in a.lengths:
            T = mult * seq_len
            if len(val) < T + 2:
                print(f"(skipping {mult}x = {T} tokens: the validation text has only {len(val):,} tokens)")
                continue
            starts = torch.randint(0, len(val) - T - 1, (a.windows,), generator=g)
            curve = loss_by_position(model, val.windows(starts, T + 1), a.batch_size)
            curves[T] = curve
            bits = curve / math.log(2)
            q = max(1, T // 8)
            rows.append({"length": T, "times_training": mult, "windows": a.windows, "bits": float(bits.mean()),
                         "bits_first_eighth": float(bits[:q].mean()), "bits_last_eighth": float(bits[-q:].mean())})
    if not rows:
        raise ValueError("--data: the validation text is too short for any of --lengths")
    out = Path(a.out or (a.model if Path(a.model).is_dir() else "."))
    print(f"{'length':>8} {'x train':>8} {'bits/token':>11} {'first 1/8':>10} {'last 1/8':>10}")
    for r in rows:
        print(f"{r['length']:8d} {r['times_training']:7d}x {r['bits']:11.4f} {r['bits_first_eighth']:10.4f} "
              f"{r['bits_last_eighth']:10.4f}")
    from .bench import report
    plot_loss_by_position(curves, seq_len, out / "loss_by_position.png", title=f"{a.model}")
    print(f"(table: {out / 'eval.json'}, plot: {out / 'loss_by_position.png'})", file=sys.stderr)
    report("eval", rows, str(out / "eval.json"), model=str(a.model), train_seq_len=seq_len)
    return {"model": str(a.model), "train_seq_len": seq_len, "results": rows}


def _trained_seq_len(run: Path) -> int | None:
    from .train.checkpoint import latest_checkpoint
    try:
        ck = latest_checkpoint(run)
    except Exception:
        return None
    if ck is None:
        return None
    return torch.load(ck / "trainer.pt", map_location="cpu", weights_only=True)["train_config"]["seq_len"]


def cmd_data(a) -> dict:
    from .data import prepare_corpus
    meta = prepare_corpus(a.paths or None, a.out, tokenizer=a.tokenizer, shard_tokens=a.shard_tokens,
                          val_fraction=a.val_fraction, max_bytes=a.max_bytes or None)
    for split, st in meta["splits"].items():
        print(f"{split:6} {st['tokens']:>14,} tokens {st['documents']:>8,} documents {len(st['shards']):>4} shard(s)")
    print(f"-> {a.out} (vocab {meta['vocab_size']}, {meta['dtype']}); train with: rnnlab train --data {a.out} --out RUN")
    return meta


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


def cmd_demo(a) -> dict:
    import shutil
    from . import ByteTokenizer, Stream, load_model
    from .data import prepare_corpus
    root = Path(a.out)
    layout = a.layout or _demo_layout()
    print(f"== rnnlab demo: a recurrent hybrid ({layout!r}) and a Transformer of the same size, "
          f"{a.seconds:.0f} s of training each, then streaming with a saved and resumed state")
    for d in ("data", "hybrid", "transformer"):  # the demo's own directories: always a fresh start
        shutil.rmtree(root / d, ignore_errors=True)
    prepare_corpus(None, root / "data", max_bytes=20_000_000, progress=False)
    common = ["--n-layers", "4", "--d-model", "128", "--seq-len", "256", "--batch-size", "16", "--lr", "3e-3",
              "--min-lr", "3e-3", "--warmup", "30", "--steps", "100000", "--eval-every", "0", "--save-every", "100000",
              "--max-seconds", str(a.seconds), "--data", str(root / "data")] + (["--device", a.device] if a.device else [])
    results = {}
    for name, lay in (("hybrid", layout), ("transformer", "attention")):
        print(f"== training {name}: layout {lay!r}")
        results[name] = main(["train", "--layout", lay, "--out", str(root / name)] + common)
    print(f"\n{'model':12} {'layout':34} {'steps':>6} {'tokens/s':>9} {'MFU':>6} {'val bits/byte':>14}")
    for name, r in results.items():
        lay = layout if name == "hybrid" else "attention"
        print(f"{name:12} {lay:34} {r['step']:6d} {r['tokens_per_s']:9,.0f} {100 * r['mfu']:5.1f}% {r['val_bits']:14.3f}")
    dev = _device(a.device)
    model = load_model(root / "hybrid", device=dev).eval()
    tok = ByteTokenizer()
    prompt = "def read_config(path):\n    "
    stream = Stream(model)
    stream.feed(tok(prompt).to(dev))
    print(f"\n== streaming from the hybrid, one token at a time:\n{prompt}", end="")
    g = torch.Generator(device=dev).manual_seed(0)
    t0, n, sizes = time.time(), 0, []
    for t in stream.sample(160, temperature=0.8, top_k=40, generator=g):
        sys.stdout.write(tok.decode([int(t[0])]))
        sys.stdout.flush()
        n += 1
        if n % 40 == 0:
            sizes.append((stream.state.seen, stream.state.nbytes))
    rate = n / (time.time() - t0)
    state_file = root / "hybrid" / "stream.safetensors"
    stream.save(state_file)
    print(f"\n== {rate:.0f} tokens/s; state saved to {state_file}")
    resumed = Stream.load(model, state_file)
    print("== reloaded from the file, continuing:\n", end="")
    for t in resumed.sample(80, temperature=0.8, top_k=40, generator=g):
        sys.stdout.write(tok.decode([int(t[0])]))
    sizes.append((resumed.state.seen, resumed.state.nbytes))
    print("\n== state size while the context grows (bounded: recurrent layers + a 128-token window):")
    for seen, nbytes in sizes:
        print(f"   after {seen:4d} tokens: {nbytes:,} bytes")
    return results


# -- the parser -------------------------------------------------------------------------------------
def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rnnlab", description="Recurrent sequence models: train, run, measure.")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("list", help="the registered mixers with papers and state sizes; one mixer's options")
    s.add_argument("mixer", nargs="?", help="show this mixer's options with their defaults and meaning")
    s.add_argument("--d-model", type=int, default=256, help="model width for the state sizes shown (default: 256)")
    s.add_argument("--markdown", action="store_true", help="print the README's markdown table")

    from .configs import add_flags
    from .models.lm import LMConfig
    from .train.run import MODEL_FIELDS, PRESETS, DataConfig
    from .train.trainer import TrainConfig
    s = sub.add_parser("train", help="train a language model on text (default: the standard library's source)",
                       description="Train a language model. Settings come from the dataclasses' defaults, then "
                                   "--preset, then --config FILE.toml ([model], [train], [data] tables), then flags. "
                                   "Under torchrun, every process runs this command (DDP or FSDP2).")
    s.add_argument("--out", required=True, help="run directory: checkpoints/, metrics.jsonl, loss.png")
    s.add_argument("--resume", action="store_true", help="continue the run in --out from its latest checkpoint")
    s.add_argument("--config", help="a TOML file with [model], [train] and [data] tables (flags override it)")
    s.add_argument("--preset", choices=list(PRESETS), help="model and training sizes: " + "; ".join(
        f"{k}: " + ", ".join(f"{f}={v}" for sec in p.values() for f, v in sec.items()) for k, p in PRESETS.items()))
    s.add_argument("--device", help="cpu, cuda, cuda:1 ... (default: cuda if available, else cpu)")
    add_flags(s.add_argument_group("model (rnnlab.LMConfig)"), LMConfig,
              skip=tuple(f.name for f in dataclasses.fields(LMConfig) if f.name not in MODEL_FIELDS))
    add_flags(s.add_argument_group("training (rnnlab.train.TrainConfig)"), TrainConfig, skip=("out_dir", "resume"))
    add_flags(s.add_argument_group("data (rnnlab.train.run.DataConfig)"), DataConfig)

    s = sub.add_parser("eval", help="bits per token of a saved model or run, and loss by position at 1x..8x its training length")
    s.add_argument("--model", required=True, help="a run directory, a checkpoint or a saved model")
    s.add_argument("--data", nargs="+", help="text files/directories or a prepared directory (default: the run's "
                                             "own data, else the standard library's source)")
    s.add_argument("--max-bytes", type=int, default=DataConfig.max_bytes, help="read at most this many bytes of text "
                   f"(default: {DataConfig.max_bytes:,})")
    s.add_argument("--seq-len", type=int, help="the training length T (default: the run's, else 256)")
    s.add_argument("--lengths", type=int, nargs="+", default=[1, 2, 4, 8],
                   help="evaluate at these multiples of T (default: 1 2 4 8)")
    s.add_argument("--windows", type=int, default=16, help="random validation windows per length (default: 16)")
    s.add_argument("--batch-size", type=int, default=4, help="windows per forward pass (default: 4)")
    s.add_argument("--seed", type=int, default=1234, help="seed of the window positions (default: 1234)")
    s.add_argument("--out", help="where eval.json and loss_by_position.png go (default: the model directory)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")

    s = sub.add_parser("data", help="data preparation: `rnnlab data prepare PATHS --out DIR`")
    dsub = s.add_subparsers(dest="data_cmd", required=True)
    d = dsub.add_parser("prepare", help="tokenise text into memory-mapped token shards (uint16/uint32) + meta.json")
    d.add_argument("paths", nargs="*", help="files, directories or globs (default: the standard library's source)")
    d.add_argument("--out", required=True, help="output directory")
    d.add_argument("--tokenizer", default="bytes", help="'bytes' or a tokenizer.json / directory holding one (default: bytes)")
    d.add_argument("--shard-tokens", type=int, default=100_000_000, help="tokens per shard file (default: 100,000,000)")
    d.add_argument("--val-fraction", type=float, default=0.02, help="share of files held out for validation (default: 0.02)")
    d.add_argument("--max-bytes", type=int, default=0, help="read at most this many bytes for training (0 = all; default: 0)")

    s = sub.add_parser("generate", help="stream a continuation from a saved model, optionally from and to a state file")
    s.add_argument("--model", required=True, help="a run directory, a checkpoint or a saved model")
    s.add_argument("--prompt", default="", help="text to feed before sampling (default: none)")
    s.add_argument("--escapes", action="store_true", help="interpret backslash escapes such as \\n in --prompt")
    s.add_argument("--max-new-tokens", type=int, default=200, help="tokens to sample (default: 200)")
    s.add_argument("--temperature", type=float, default=0.8, help="sampling temperature; 0 = greedy (default: 0.8)")
    s.add_argument("--top-k", type=int, default=None, help="sample among the k most likely tokens (default: all)")
    s.add_argument("--top-p", type=float, default=None, help="nucleus sampling: the smallest set of tokens with "
                                                             "this much probability (default: off)")
    s.add_argument("--seed", type=int, default=0, help="seed of the sampler (default: 0)")
    s.add_argument("--state-in", help="continue the stream saved in this state file")
    s.add_argument("--state-out", help="save the stream's state to this file afterwards (atomically)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")

    s = sub.add_parser("bench", help="benchmarks: ops (kernels), hf (vs transformers), rnn (Newton vs loop), "
                                     "mixers (every mixer: train step, prefill, decode), speed (models | layers | "
                                     "decode | efficiency | peers, side by side with attention), tasks (synthetic task sweeps: "
                                     "MQAR, state tracking, passkey, JRT)", add_help=False)
    s.add_argument("what", choices=["ops", "hf", "rnn", "mixers", "speed", "tasks"],
                   help="which benchmark; `rnnlab bench WHAT --help` shows its options")

    s = sub.add_parser("convert", help="convert Hugging Face checkpoints from/to rnnlab")
    s.add_argument("--from-hf", help="a transformers checkpoint directory to read")
    s.add_argument("--to-hf", help="an rnnlab model directory to export")
    s.add_argument("--out", required=True, help="the directory to write")

    s = sub.add_parser("demo", help="train a recurrent hybrid and a Transformer for a minute each, compare, stream")
    s.add_argument("--seconds", type=float, default=75.0, help="training time per model in seconds (default: 75)")
    s.add_argument("--layout", default=None, help="the hybrid's layout (default: gated_deltanet*3,swa(window=128))")
    s.add_argument("--out", default="runs/demo", help="directory of the demo's runs (replaced; default: runs/demo)")
    s.add_argument("--device", help="cpu, cuda, ... (default: cuda if available, else cpu)")
    return p


def main(argv: list[str] | None = None):
    from .layers.state import StateError
    from .train.checkpoint import CheckpointError
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a, rest = p.parse_known_args(argv)
    if rest and a.cmd != "bench":
        p.error(f"unrecognized arguments: {' '.join(rest)}")
    handlers = {"list": cmd_list, "train": cmd_train, "eval": cmd_eval, "generate": cmd_generate,
                "convert": cmd_convert, "demo": cmd_demo, "data": cmd_data}
    try:
        if a.cmd == "bench":
            return cmd_bench(a, rest)
        return handlers[a.cmd](a)
    except (ValueError, FileNotFoundError, FileExistsError, StateError, CheckpointError) as e:
        # bad flags, values and files: one line that names them; anything else is a bug and keeps its traceback
        print(f"rnnlab {a.cmd}: error: {e}", file=sys.stderr)
        raise SystemExit(2) from None


def entry() -> int:
    """The ``rnnlab`` console command: :func:`main` without its Python return value (exit status 0)."""
    main()
    return 0


if __name__ == "__main__":
    entry()
